"""Privacy config checks: fail before any model loads, naming the key."""

import math

import pytest

from cli.main import job_of, validate
from fedprune.config import ConfigError
from fedprune.protocols.secure_sums import default_threshold, plan_from_job
from tests.tiny_models import tiny_model

FED = ["protocol=stats_sync", "federation.num_clients=3", "data.calib_windows=12"]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["privacy=secagg", "privacy.name=shiny"], "privacy.name"),
        (["privacy=secagg", "protocol=centralized"], "privacy.name"),
        (["privacy=secagg", "protocol=local"], "privacy.name"),
        (["privacy=secagg", "protocol=hidenseek"], "privacy.name"),
        (["privacy=secagg", "privacy.threshold=4"], "privacy.threshold"),
        (["privacy=secagg", "privacy.threshold=1"], "privacy.threshold"),
        (["privacy=secagg", "privacy.token_bound=0"], "privacy.token_bound"),
        (["privacy=secagg", "privacy.value_words=3"], "privacy.value_words"),
        (["privacy=secagg", "privacy.value_words=1.25"], "privacy.value_words"),
        (["privacy=secagg", "privacy.value_words=true"], "privacy.value_words"),
        (["privacy=secagg_dp", "privacy.epsilon=0"], "privacy.epsilon"),
        (["privacy=secagg_dp", "privacy.delta=1"], "privacy.delta"),
        (["privacy=secagg_dp", "privacy.delta=0"], "privacy.delta"),
        (["privacy=secagg_dp", "protocol=mask_vote"], "privacy.name"),
    ],
)
def test_bad_privacy_config_names_the_key(make_cfg, overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate(make_cfg(*FED, *overrides))


@pytest.mark.parametrize("protocol", ["stats_sync", "mask_vote", "mask_vote_sync"])
def test_secagg_is_accepted_where_the_server_sums(make_cfg, protocol):
    validate(make_cfg(*FED, f"protocol={protocol}", "privacy=secagg", "privacy.threshold=3"))


def test_default_is_no_privacy_and_the_plan_follows_the_config(make_cfg):
    assert (
        make_cfg(*FED).privacy.name == "none"
        and plan_from_job(job_of(make_cfg(*FED)), tiny_model("llama")) is None
    )
    cfg = make_cfg(*FED, "privacy=secagg_dp", "privacy.epsilon=4", "privacy.delta=1e-6")
    plan = plan_from_job(job_of(cfg), tiny_model("llama"))
    assert plan.threshold == default_threshold(3) == 2 and plan.max_tokens == 12 * 16
    assert plan.dp_epsilon == pytest.approx(4.0) and plan.dp_delta == 1e-6 and plan.dp_sigma > 0
    assert plan.value_words == 1 and plan.value_code().words_per_value == 1  # noise >> resolution


def test_secagg_default_sends_a_word_and_a_half_per_statistic(make_cfg):
    plan = plan_from_job(job_of(make_cfg(*FED, "privacy=secagg")), tiny_model("llama"))
    assert plan.value_words == 1.5 and plan.value_code().words_per_value == 1.5
    assert plan.value_code().encoded_length(16) == 24
    for words in (1, 2):
        other = plan_from_job(
            job_of(make_cfg(*FED, "privacy=secagg", f"privacy.value_words={words}")), tiny_model("llama")
        )
        assert other.value_code().words_per_value == words


def test_owl_with_dp_counts_the_dense_release(make_cfg):
    """``allocation=owl`` with ``secagg_dp``: one more release (every dense layer's Σx²), so more noise
    for the same epsilon; the tiny llama has 2 blocks of 7 prunable layers."""
    dp = ["privacy=secagg_dp", "privacy.epsilon=4", "privacy.delta=1e-6", "protocol=stats_sync"]
    uniform = plan_from_job(job_of(make_cfg(*FED, *dp)), tiny_model("llama"))
    owl = plan_from_job(job_of(make_cfg(*FED, *dp, "allocation=owl")), tiny_model("llama"))
    assert owl.dp_epsilon == pytest.approx(4.0)
    # releases 2 blocks x 7 slots, plus the dense one of 14: twice the squared sensitivity
    assert owl.dp_sigma == pytest.approx(uniform.dp_sigma * math.sqrt((2 * 7 + 14) / (2 * 7)))


def test_a_roster_must_be_a_readable_roster_of_every_site(make_cfg, tmp_path):
    from fedprune.secure.identity import identity_public, new_identity, save_roster

    with pytest.raises(ConfigError, match="'privacy.roster': roster file .* does not exist"):
        validate(
            make_cfg(*FED, "protocol=stats_sync", "privacy=secagg", f"privacy.roster={tmp_path / 'no.json'}")
        )
    small = save_roster([identity_public(new_identity())], tmp_path / "one.json")
    with pytest.raises(ConfigError, match="lists 1 identities"):
        validate(make_cfg(*FED, "protocol=stats_sync", "privacy=secagg", f"privacy.roster={small}"))


def test_flwr_run_needs_a_roster_for_secure_aggregation(make_cfg):
    from server.server_app import check_federated

    with pytest.raises(ConfigError, match="'privacy.roster'.*identity-key=PATH roster=PATH"):
        check_federated(job_of(make_cfg(*FED, "protocol=stats_sync", "privacy=secagg")))
