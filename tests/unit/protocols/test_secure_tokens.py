"""With secure aggregation a site's token count never travels in the clear: every reply the server
receives reports 0 tokens, the count rides as the last word of the masked vector, and the server learns
only the survivors' total (metrics.json's ``calib_tokens`` is still the true total)."""

import numpy as np
import pytest

from cli.main import job_of
from fedprune.protocols.catalog import SITE_TASKS, validate
from fedprune.protocols.secure_sums import SecureAggregationError, summed_tokens
from fedprune.protocols.tasks import in_process_launcher
from fedprune.secure.plan import make_plan

FED = ["federation.num_clients=3", "federation.min_clients=3", "data.calib_windows=12"]
TOTAL = 12 * 16  # windows x tokens per window (the tiny corpus' seq_len)


def _recording(seen: list):
    def wrap(name, task):
        def recorded(site, request):
            answer = task(site, request)
            seen.append((name, site.node_id, answer.metrics.get("tokens")))
            return answer

        return recorded

    return {name: wrap(name, task) for name, task in SITE_TASKS.items()}


def _run(make_cfg, tmp_path, *overrides):
    seen: list = []
    job = job_of(make_cfg(*FED, *overrides))
    metrics = validate(job).run(job, tmp_path, in_process_launcher(3, 3, _recording(seen)))
    return metrics, seen


@pytest.mark.parametrize(
    "overrides",
    [
        ("protocol=stats_sync", "pruner=wanda"),
        ("protocol=stats_sync", "pruner=wanda", "allocation=owl"),
        ("protocol=mask_vote_sync", "pruner=wanda"),
        ("protocol=mask_vote", "pruner=wanda"),
    ],
    ids=["stats_sync", "stats_sync+owl", "mask_vote_sync", "mask_vote"],
)
def test_secure_runs_reveal_only_the_total_tokens(make_cfg, tmp_path, overrides):
    plain, plain_seen = _run(make_cfg, tmp_path / "plain", *overrides, "privacy=none")
    secure, secure_seen = _run(make_cfg, tmp_path / "secure", *overrides, "privacy=secagg")
    # control: in the clear every site reports its own count (the partitions' counts add up)
    assert any(tokens for _, _, tokens in plain_seen)
    assert plain["calib_tokens"] == TOTAL
    # secure: no reply of any task carries a count in the clear, yet the total is known exactly
    assert secure_seen and all(tokens == 0 for _, _, tokens in secure_seen), secure_seen
    assert secure["calib_tokens"] == TOTAL and secure["num_clients"] == 3


def test_a_summed_token_count_beyond_the_public_bound_stops_the_run():
    plan = make_plan(threshold=2, modulus_bits=64, max_sites=3, max_tokens=100, token_bound=10.0)
    code = plan.count_code()
    words = code.encode(np.array([100], dtype=np.int64)) + code.encode(np.array([100], dtype=np.int64))
    assert summed_tokens(words, 2, plan, "stats") == 200  # two sites at the bound: fine
    with pytest.raises(SecureAggregationError, match="201 tokens from 2 sites"):
        summed_tokens(words + np.uint64(1), 2, plan, "stats")
    with pytest.raises(SecureAggregationError, match="-1 tokens"):
        summed_tokens(code.encode(np.array([-1], dtype=np.int64)), 2, plan, "stats")
