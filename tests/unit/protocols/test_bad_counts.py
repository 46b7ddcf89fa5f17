"""A site's reported counts are validated: an infinite, fractional, negative or huge token count is a
rejected reply (logged, the run goes on without that site), never a crash of the server."""

import math

import pytest

from cli.main import job_of
from fedprune.protocols.catalog import SITE_TASKS, validate
from fedprune.protocols.federation import Reply
from fedprune.protocols.messages import MessageError, reply_count
from fedprune.protocols.tasks import in_process_launcher

FED = ["federation.num_clients=3", "federation.min_clients=2", "data.calib_windows=12"]


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, -1, 2.5, 10**30, True, "12", None])
def test_a_count_that_is_not_a_whole_number_in_range_is_refused(value):
    with pytest.raises(MessageError, match="tokens"):
        reply_count({"tokens": value}, "tokens", 1000)


def test_a_count_in_range_is_read():
    assert reply_count({"tokens": 192.0}, "tokens", 192) == 192
    with pytest.raises(MessageError, match="missing"):
        reply_count({}, "tokens", 10)


@pytest.mark.parametrize(
    ("protocol", "task", "privacy"),
    [
        ("stats_sync", "query.start", "none"),
        ("mask_vote", "train.local_prune", "none"),
        ("mask_vote_sync", "train.secagg", "secagg"),
    ],
)
def test_one_site_reporting_infinite_tokens_is_left_out(make_cfg, tmp_path, protocol, task, privacy):
    def lying(site, request):
        answer = SITE_TASKS[task](site, request)
        if site.node_id != 101:
            return answer
        return Reply(arrays=answer.arrays, metrics={**answer.metrics, "tokens": math.inf})

    job = job_of(make_cfg(*FED, f"protocol={protocol}", f"privacy={privacy}"))
    metrics = validate(job).run(job, tmp_path, in_process_launcher(3, 2, {**SITE_TASKS, task: lying}))
    assert metrics["num_clients"] == 2
    reasons = [r["reason"] for r in metrics["rejected"] if r["node"] == 101]
    assert reasons and all("tokens" in reason for reason in reasons[:1])
    assert (tmp_path / "model").is_dir()


def test_secure_vote_counts_above_the_survivors_stop_the_run():
    import numpy as np

    from fedprune.protocols.secure_sums import SecureAggregationError, check_counts

    check_counts(np.array([0, 3, 2]), 3, "0.mlp.up_proj")  # at most one vote per survivor: fine
    with pytest.raises(SecureAggregationError, match="count of 4 from 3 sites"):
        check_counts(np.array([0, 4, 2]), 3, "0.mlp.up_proj")
