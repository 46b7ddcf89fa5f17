"""One of four sites sends finite but absurd statistics in stats_sync (privacy=none): the site is rejected
with its reason, the run completes, and the pruned model is centralized pruning on the pooled windows of
the other three sites. federation.robust needs the statistics in the clear: with secure aggregation it is
a config error."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from cli.main import job_of
from fedprune.config import ConfigError
from fedprune.data.sites import site_windows
from fedprune.job import prepare, prune_with_job_
from fedprune.protocols.catalog import SITE_TASKS, validate
from fedprune.protocols.federation import Reply
from fedprune.protocols.messages import BlockTask
from fedprune.protocols.tasks import in_process_launcher

SITES, BAD = 4, 102  # node ids 100..103; the bad one holds partition 2
FED = [f"federation.num_clients={SITES}", "federation.min_clients=2", "data.calib_windows=16"]


def _weights(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {n: p.detach() for n, p in model.named_parameters() if n.endswith("proj.weight")}


def _bigger(values: np.ndarray) -> np.ndarray:
    return values * 1000.0  # PSD and finite, 1000x the size per token


def _not_psd(values: np.ndarray) -> np.ndarray:
    """A Gram sum's upper triangle (row-major: (0, 0) at 0, (0, 1) at 1, (1, 1) at n) with |H01| above
    sqrt(H00·H11): the same diagonal (and size per token), not PSD."""
    n = int(round((np.sqrt(8 * values.size + 1) - 1) / 2))
    out = values.copy()
    out[1] = 3.0 * np.sqrt(out[0] * out[n]) + 1.0
    return out


def _negative_diagonal(values: np.ndarray) -> np.ndarray:
    out = values.copy()
    out[0] = -abs(out[0]) - 1.0
    return out


def _forging(forge, blocks=(0, 1)):
    """The train.stats task, with site BAD's statistics of ``blocks`` forged (``forge(wire values)``)."""

    def task(site, request):
        answer = SITE_TASKS["train.stats"](site, request)
        if site.node_id != BAD or BlockTask.from_record(request.config).block not in blocks:
            return answer
        arrays = {k: forge(v) if k.startswith("total.") else v for k, v in answer.arrays.items()}
        return Reply(arrays=arrays, metrics=answer.metrics)

    return task


def _run(make_cfg, out, forge, *overrides, blocks=(0, 1)):
    job = job_of(make_cfg(*FED, "protocol=stats_sync", *overrides))
    tasks = {**SITE_TASKS, "train.stats": _forging(forge, blocks)}
    return job, validate(job).run(job, out, in_process_launcher(SITES, 2, tasks))


def _centralized_without(job, site: int) -> dict[str, torch.Tensor]:
    """Centralized pruning (the centralized code, no federation) on the other sites' pooled windows."""
    prep = prepare(job)
    fed, data = job.federation, job.data
    ids = torch.cat(
        [
            site_windows(
                fed.partitioner, prep.data.calib_docs, s, SITES, data.calib_windows, data.seq_len, job.seed
            )
            for s in range(SITES)
            if s != site
        ]
    )
    prune_with_job_(job, prep, prep.model, ids)
    return {n: p.detach() for n, p in prep.model.named_parameters() if n.endswith("proj.weight")}


@pytest.mark.parametrize(
    ("pruner", "forge", "robust", "why"),
    [
        ("wanda", _bigger, True, "size per token"),
        ("sparsegpt", _bigger, True, "size per token"),
        ("sparsegpt", _not_psd, True, "not positive semi-definite"),
        ("sparsegpt", _negative_diagonal, False, "negative diagonal entry"),  # refused always
    ],
)
def test_absurd_site_is_rejected_and_the_rest_equals_centralized(
    make_cfg, tmp_path, pruner, forge, robust, why
):
    job, metrics = _run(make_cfg, tmp_path / "f", forge, f"pruner={pruner}", f"federation.robust={robust}")
    rejected = [r for r in metrics["rejected"] if r["node"] == BAD]
    assert [r["round"] for r in rejected] == [1, 2]  # both blocks' sums (round 0: query.start)
    assert all(r["reason"].startswith("implausible statistics: ") and why in r["reason"] for r in rejected)
    assert all(r["node"] == BAD for r in metrics["rejected"])  # no honest site
    assert metrics["num_clients"] == 3 and "sites_per_sum" not in metrics  # the same three in every sum
    assert metrics["calib_tokens"] == 12 * 16  # the other sites' windows only
    assert metrics.get("robust", False) is robust
    expected, got = _centralized_without(job, BAD - 100), _weights(tmp_path / "f" / "model")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name] == 0, got[name] == 0), name
        assert torch.allclose(expected[name], got[name], atol=1e-5, rtol=1e-4), name


def test_without_robust_a_1000x_site_enters_the_sum(make_cfg, tmp_path):
    """The check is what keeps the forged site out: without it, the masks are not the three sites'."""
    job, metrics = _run(make_cfg, tmp_path / "f", _bigger, "pruner=wanda")
    assert metrics["num_clients"] == SITES and not metrics["rejected"] and "robust" not in metrics
    expected, got = _centralized_without(job, BAD - 100), _weights(tmp_path / "f" / "model")
    assert any(not torch.equal(expected[name] == 0, got[name] == 0) for name in expected)


def test_sites_per_sum_shows_the_sum_a_site_was_left_out_of(make_cfg, tmp_path):
    _, metrics = _run(make_cfg, tmp_path, _bigger, "pruner=wanda", "federation.robust=true", blocks=(1,))
    assert metrics["sites_per_sum"] == [[100, 101, 102, 103], [100, 101, 103]]
    assert metrics["num_clients"] == 3 and [r["round"] for r in metrics["rejected"]] == [2]


@pytest.mark.parametrize("privacy", ["secagg", "secagg_dp"])
def test_robust_with_secure_aggregation_is_a_config_error(make_cfg, privacy):
    job = job_of(make_cfg(*FED, "protocol=stats_sync", f"privacy={privacy}", "federation.robust=true"))
    with pytest.raises(ConfigError, match=r"'federation.robust'.*in the clear"):
        validate(job)


def test_robust_scale_must_exceed_one(make_cfg):
    job = job_of(make_cfg(*FED, "protocol=stats_sync", "federation.robust=true", "federation.robust_scale=1"))
    with pytest.raises(ConfigError, match="'federation.robust_scale'"):
        validate(job)
    with pytest.raises(ConfigError, match="'federation.robust': must be true or false"):
        job_of(make_cfg(*FED, "protocol=stats_sync", "federation.robust=3"))
