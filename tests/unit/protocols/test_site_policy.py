"""A site's floors on the server's SecurePlan: each refuses with a message naming the parameter and its
floor; plans the server makes from the same parameters pass."""

import dataclasses

import pytest

from fedprune.protocols.site_policy import (
    PolicyError,
    SitePolicy,
    min_sigma,
    release_rho,
    release_sensitivity,
)
from fedprune.secure.dp import calibrate_sigma, gaussian_rho, window_sensitivity
from fedprune.secure.plan import make_plan

SEQ_LEN, BOUND, BLOCKS, SLOTS = 16, 0.5, 2, 7


def _plan(threshold=3, sites=4, modulus_bits=64, epsilon=None, delta=1e-5, token_bound=BOUND):
    return make_plan(
        threshold=threshold,
        modulus_bits=modulus_bits,
        max_sites=sites,
        max_tokens=12 * SEQ_LEN,
        token_bound=token_bound,
        epsilon=epsilon,
        delta=delta if epsilon is not None else None,
        seq_len=SEQ_LEN,
        releases=BLOCKS,
        slots=SLOTS,
        stat_kind="hessian",
    )


def test_defaults_from_a_simulated_node_config():
    policy = SitePolicy.from_node_config({"partition-id": 0, "num-partitions": 4})
    assert policy == SitePolicy(sites=4)
    assert policy.honest_majority and policy.min_threshold == 2 and policy.min_modulus_bits == 32
    assert not policy.requires_dp and policy.budget is None


def test_node_config_keys_are_read_and_typed():
    node = {
        "num-partitions": 9,
        "secagg-sites": "5",
        "secagg-honest-majority": "false",
        "secagg-min-threshold": 3,
        "secagg-min-modulus-bits": "40",
        "dp-max-epsilon": "2.0",
        "dp-delta": 1e-6,
        "dp-max-token-bound": 1,
        "dp-budget-rho": "0.5",
        "dp-ledger": "/tmp/x.json",
    }
    policy = SitePolicy.from_node_config(node)
    assert (policy.sites, policy.honest_majority, policy.min_threshold, policy.min_modulus_bits) == (
        5,
        False,
        3,
        40,
    )
    assert (policy.dp_epsilon, policy.dp_delta, policy.max_token_bound) == (2.0, 1e-6, 1.0)
    assert policy.budget == 0.5 and str(policy.ledger) == "/tmp/x.json"
    with pytest.raises(ValueError, match="'secagg-honest-majority'"):
        SitePolicy.from_node_config({"secagg-honest-majority": "maybe"})
    with pytest.raises(ValueError, match="dp-delta"):
        SitePolicy.from_node_config({"dp-max-epsilon": 1, "dp-delta": 2})


def test_valid_plans_pass():
    SitePolicy(sites=4).check_plan(_plan(threshold=3))
    SitePolicy(sites=3).check_plan(_plan(threshold=2, sites=3))
    SitePolicy(sites=4, honest_majority=False).check_plan(_plan(threshold=2))
    SitePolicy().check_plan(_plan(threshold=3))  # n unknown: the plan's max_sites
    dp = SitePolicy(sites=4, dp_epsilon=4.0, max_token_bound=BOUND)
    plan = _plan(epsilon=4.0)
    dp.check_plan(plan)
    dp.check_sigma(plan, release_sensitivity(plan, SEQ_LEN, SLOTS, "hessian"), BLOCKS)
    dp.check_neighbours(plan, 3)


@pytest.mark.parametrize(
    ("policy", "plan", "message"),
    [
        (SitePolicy(sites=4), _plan(threshold=2), r"threshold=2 must be > 4/2"),
        (SitePolicy(), _plan(threshold=2), r"threshold=2 must be > 4/2"),  # n from max_sites
        (SitePolicy(sites=5, honest_majority=False, min_threshold=3), _plan(2, 5), "secagg-min-threshold=3"),
        (SitePolicy(sites=4), _plan(threshold=5), "threshold=5 exceeds max_sites=4"),
        (SitePolicy(sites=5), _plan(threshold=3, sites=4), "max_sites=4 but this site knows 5 sites"),
        (SitePolicy(sites=4), _plan(modulus_bits=16), r"modulus_bits=16 below the floor 32"),
        (SitePolicy(sites=4, min_modulus_bits=63), _plan(modulus_bits=62), "floor 63"),
        (SitePolicy(sites=4, dp_epsilon=1.0), _plan(), r"dp_sigma=0.0 but this site requires DP"),
        (
            SitePolicy(sites=4, max_token_bound=0.25),
            _plan(epsilon=4.0),
            r"token_bound=0.5 above dp-max-token",
        ),
    ],
)
def test_each_floor_refuses_naming_it(policy, plan, message):
    with pytest.raises(PolicyError, match=message):
        policy.check_plan(plan)


def test_sigma_floor_is_the_servers_calibration_for_the_sites_epsilon():
    sensitivity = window_sensitivity(SEQ_LEN, BOUND, SLOTS, "hessian")
    assert min_sigma(4.0, 1e-5, sensitivity, BLOCKS) == calibrate_sigma(4.0, 1e-5, sensitivity, BLOCKS)
    plan = _plan(epsilon=8.0)  # the server calibrated for epsilon 8: too little noise for epsilon 4
    strict = SitePolicy(sites=4, dp_epsilon=4.0)
    strict.check_plan(plan)  # structurally fine
    with pytest.raises(PolicyError, match=r"dp_sigma=.* below the floor .* dp-max-epsilon=4.0"):
        strict.check_sigma(plan, sensitivity, BLOCKS)
    SitePolicy(sites=4, dp_epsilon=8.0).check_sigma(plan, sensitivity, BLOCKS)  # the agreed epsilon: passes
    SitePolicy(sites=4, dp_epsilon=16.0).check_sigma(plan, sensitivity, BLOCKS)
    tiny = dataclasses.replace(plan, dp_sigma=plan.dp_sigma * 1e-3)  # a server that lowers sigma
    with pytest.raises(PolicyError, match="dp_sigma"):
        SitePolicy(sites=4, dp_epsilon=8.0).check_sigma(tiny, sensitivity, BLOCKS)


def test_release_rho_is_the_gaussian_mechanism_of_the_plan():
    plan = _plan(epsilon=4.0)
    sensitivity = release_sensitivity(plan, SEQ_LEN, 4, "sq_norm")
    assert sensitivity == pytest.approx(2**0.5 * SEQ_LEN * BOUND**2 * 2)  # √2·seq_len·A²·√4
    assert release_rho(plan, sensitivity) == gaussian_rho(sensitivity, plan.dp_sigma)


def test_routing_more_neighbours_than_sites_is_refused():
    with pytest.raises(PolicyError, match="neighbours=4 but this site knows 4 sites"):
        SitePolicy(sites=4).check_neighbours(_plan(), 4)
    with pytest.raises(PolicyError, match="neighbours=5"):
        SitePolicy().check_neighbours(_plan(), 5)  # unknown n: the plan's max_sites bounds it
