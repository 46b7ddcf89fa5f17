"""What docs/architecture.md promises: a pruner with a new statistic kind needs no change to the
payload, the secure slots or the protocols. A toy kind (Σ|x| per input feature) and a toy pruner are
registered here only, and stats_sync (plain and under secure aggregation, real site tasks in process)
equals centralized pruning with them."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from cli.main import job_of
from fedprune.masks import select_mask
from fedprune.protocols.catalog import validate
from fedprune.protocols.tasks import in_process_launcher
from fedprune.pruners.base import PRUNERS, PruneResult, require_stats
from fedprune.stat_kinds import STAT_KINDS, SqNormKind


class AbsSumKind(SqNormKind):
    """Σ_t |x_tj| per input feature: a non-negative vector, so the sq_norm wire layout and checks fit."""

    name = "abs_sum"

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        xw = x.detach().reshape(-1, x.shape[-2], x.shape[-1])  # (windows, tokens, in)
        return xw.abs().sum(dim=1).double().sum(dim=0)  # (in,)


class L1ActPruner:
    """|W_ij| · mean |x_j|, per output row."""

    name = "l1act"
    stat_kind = "abs_sum"
    patterns = ("unstructured", "nm")
    updates_weights = False

    def prune(self, weight, stats, sparsity, pattern):
        mean = require_stats(self, stats).mean().to(weight.dtype)  # (in,)
        mask = select_mask(weight.abs() * mean.reshape(1, -1), sparsity, pattern, "row")
        return PruneResult(weight=weight * mask, mask=mask)


@pytest.fixture
def toy_pruner(monkeypatch):
    monkeypatch.setitem(STAT_KINDS, "abs_sum", AbsSumKind())
    monkeypatch.setitem(PRUNERS, "l1act", L1ActPruner)


def _masks(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {n: p.detach() == 0 for n, p in model.named_parameters() if n.endswith("proj.weight")}


def test_a_new_statistic_kind_goes_through_stats_sync_and_secure_aggregation(toy_pruner, make_cfg, tmp_path):
    fed = [
        "federation.num_clients=3",
        "federation.min_clients=3",
        "data.calib_windows=12",
        "pruner.name=l1act",
    ]
    runs = {}
    for name, extra in {
        "centralized": ["protocol=centralized"],
        "plain": ["protocol=stats_sync"],
        "secure": ["protocol=stats_sync", "privacy=secagg", "privacy.threshold=2", "privacy.token_bound=100"],
    }.items():
        job = job_of(make_cfg(*fed, *extra))
        runs[name] = validate(job).run(job, tmp_path / name, in_process_launcher(3, 3))
    expected = _masks(tmp_path / "centralized" / "model")
    assert any(mask.any() for mask in expected.values())
    for name in ("plain", "secure"):
        got = _masks(tmp_path / name / "model")
        assert all(torch.equal(got[n], expected[n]) for n in expected), name
        assert runs[name]["calib_tokens"] == runs["centralized"]["calib_tokens"]
    assert runs["secure"]["privacy"] == "secagg" and not runs["secure"]["rejected"]
