"""Hand-checked small cases: vote packing, statistics vectors, DP maths, the plan, the wire format."""

import math

import numpy as np
import pytest
import torch

from fedprune.payload import encode_stats, triu_of
from fedprune.secure import SecAggClient, SecAggError, SecAggServer
from fedprune.secure.codec import (
    decode_stats_vector,
    encode_stats_vector,
    field_bits,
    pack_votes,
    packed_length,
    slot_sizes,
    unpack_counts,
)
from fedprune.secure.dp import (
    calibrate_sigma,
    clip_tokens,
    epsilon_to_rho,
    gaussian_rho,
    psd_project,
    rho_to_epsilon,
    site_noise,
    window_sensitivity,
)
from fedprune.secure.plan import SecurePlan, make_plan
from fedprune.secure.wire import (
    instance_arrays,
    peers_from_arrays,
    peers_to_arrays,
    prefixed,
    reply_from_arrays,
    reply_to_arrays,
    request_from_arrays,
    request_to_arrays,
)
from fedprune.stat_kinds import moment_sums
from fedprune.stats import Stats, gram_sum, sq_norm_sum


def test_field_bits_and_packing_by_hand():
    assert [field_bits(n) for n in (1, 2, 3, 4, 7, 8, 15, 16)] == [1, 2, 2, 3, 3, 4, 4, 5]
    # 3 sites -> 2-bit fields, 32 per word; votes 1,0,1 -> 0b01_00_01 = 17
    assert pack_votes(np.array([True, False, True]), 3).tolist() == [17]
    assert packed_length(33, 3) == 2 and packed_length(10, 8, modulus_bits=16) == 3  # 4 fields per word


def test_packed_vote_sums_are_exact_counts():
    rng = np.random.default_rng(0)
    n, size = 7, 1000
    votes = rng.random((n, size)) < 0.5
    total = np.zeros(packed_length(size, n), dtype=np.uint64)
    for v in votes:
        total += pack_votes(v, n)
    assert np.array_equal(unpack_counts(total, size, n), votes.sum(axis=0))
    everyone = sum(pack_votes(np.ones(size, bool), n) for _ in range(n))  # all fields at max n, no carry
    assert (unpack_counts(everyone, size, n) == n).all()
    assert packed_length(size, n) * 8 == 8 * math.ceil(size / 21)  # 3 bits, 21 counts per word


def test_stats_vector_round_trip_within_the_stated_bound():
    plan = SecurePlan(threshold=2, modulus_bits=64, max_sites=3, max_tokens=8, token_bound=1.0)
    code, counts = plan.value_code(), plan.count_code()
    # worst case: every value exactly halfway between grid points, rounded half to even (rint):
    # 0.5, 1.5, 2.5 units -> 0, 2, 2, each off by half a unit; three sites -> error n/2 units, the bound
    half = math.ldexp(1.0, -(code.scale_bits + 1))
    values = torch.tensor([half, 3 * half, 5 * half], dtype=torch.float64)
    site = {"a": Stats("sq_norm", values, 4), "b": Stats("sq_norm", values * 2, 4)}
    arrays = encode_stats(site)
    assert slot_sizes("sq_norm", arrays["index"].tolist(), [3, 3]) == [3, 3]
    vectors = [encode_stats_vector(arrays, code, counts) for _ in range(3)]
    decoded = decode_stats_vector(sum(vectors), [3, 3], code, counts, 3)
    assert decoded["count"].tolist() == [12, 12]  # exact
    error = np.abs(decoded["total.0"] - 3 * arrays["total.0"])
    assert error.tolist() == [code.error_bound(3)] * 3  # the stated bound, attained
    assert np.array_equal(decoded["total.1"], 3 * arrays["total.1"])  # whole units: exact


def test_token_clipping_bounds_every_token_and_keeps_small_ones():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5
    clipped = clip_tokens(x, 1.0)
    assert torch.allclose(clipped[0], torch.tensor([0.6, 0.8])) and torch.equal(clipped[1], x[1])


def test_replacing_one_window_moves_a_statistic_by_at_most_the_sensitivity():
    # worst case, attained: one-token windows along orthogonal axes, each of norm A = 2
    x, y = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    bound = window_sensitivity(seq_len=1, bound=2.0, slots=1, kind="hessian")  # √2 · 4
    assert window_sensitivity(seq_len=1, bound=2.0, slots=1, kind="sq_norm") == pytest.approx(bound)
    assert torch.linalg.norm(gram_sum(x) - gram_sum(y)) == pytest.approx(bound)
    assert torch.linalg.norm(triu_of(gram_sum(x) - gram_sum(y))) == pytest.approx(bound)
    assert torch.linalg.norm(sq_norm_sum(x) - sq_norm_sum(y)) == pytest.approx(bound)
    # random clipped windows of 8 tokens never exceed it (both statistics)
    gen = torch.manual_seed(0)
    limit = window_sensitivity(seq_len=8, bound=1.0, slots=1, kind="hessian")
    moments_limit = window_sensitivity(seq_len=8, bound=1.0, slots=1, kind="moments")
    for _ in range(200):
        a = clip_tokens(torch.randn(8, 5, generator=gen) * 3, 1.0)
        b = clip_tokens(torch.randn(8, 5, generator=gen).abs() * 3, 1.0)
        assert torch.linalg.norm(gram_sum(a) - gram_sum(b)) <= limit + 1e-9
        assert torch.linalg.norm(sq_norm_sum(a) - sq_norm_sum(b)) <= limit + 1e-9
        assert torch.linalg.norm(moment_sums(a) - moment_sums(b)) <= moments_limit + 1e-9
    # the signed sum Σx moves by 2 · seq_len · bound when a window flips sign: above the other kinds' bound
    x = torch.full((8, 1), 1.0)
    assert torch.linalg.norm(moment_sums(x) - moment_sums(-x)) == pytest.approx(16.0)
    assert 16.0 <= moments_limit and 16.0 > limit


def test_zcdp_accounting_by_hand():
    assert window_sensitivity(seq_len=4, bound=0.5, slots=4, kind="hessian") == pytest.approx(
        math.sqrt(2) * 4 * 0.25 * 2
    )
    assert gaussian_rho(sensitivity=2.0, sigma=4.0, releases=3) == pytest.approx(3 * 4 / 32)
    rho, delta = 0.5, 1e-5
    assert rho_to_epsilon(rho, delta) == pytest.approx(0.5 + 2 * math.sqrt(0.5 * math.log(1e5)))
    assert epsilon_to_rho(rho_to_epsilon(rho, delta), delta) == pytest.approx(rho)
    sigma = calibrate_sigma(8.0, delta, sensitivity=2.0, releases=30)
    assert rho_to_epsilon(gaussian_rho(2.0, sigma, 30), delta) == pytest.approx(8.0)
    assert calibrate_sigma(4.0, delta, 2.0, 30) > sigma  # smaller epsilon, more noise
    with pytest.raises(ValueError):
        rho_to_epsilon(0.1, 1.0)


def test_distributed_noise_of_threshold_sites_has_the_central_variance():
    rng = np.random.default_rng(0)
    total = sum(site_noise((20000,), sigma=3.0, min_sites=4, rng=rng) for _ in range(4))
    assert total.std() == pytest.approx(3.0, rel=0.03)


def test_plan_calibrates_dp_and_travels_in_config():
    plan = make_plan(
        threshold=3,
        modulus_bits=64,
        max_sites=4,
        max_tokens=64,
        token_bound=1.0,
        epsilon=2.0,
        delta=1e-6,
        seq_len=16,
        releases=2,
        slots=4,
    )
    assert plan.dp_epsilon == pytest.approx(2.0) and plan.dp_sigma > 0
    assert plan.site_sigma == pytest.approx(plan.dp_sigma / math.sqrt(3))
    assert SecurePlan.from_config(plan.to_config()) == plan


def test_psd_projection():
    m = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # eigenvalues 3, -1
    p = psd_project(m)
    assert torch.allclose(p, torch.full((2, 2), 1.5, dtype=torch.float64))


def test_wire_round_trips_and_client_state_survives_a_restart():
    vectors = {5: np.arange(4, dtype=np.uint64), 9: np.ones(4, dtype=np.uint64), 12: np.zeros(4, np.uint64)}
    server = SecAggServer(4, threshold=2)

    def restart(clients):  # each message is handled by a fresh object rebuilt from the saved state
        return {u: SecAggClient.from_state(c.to_state()) for u, c in clients.items()}

    clients = {u: SecAggClient(u) for u in vectors}
    adverts = {u: c.advertise_keys() for u, c in clients.items()}
    clients = restart(clients)
    routed = {u: peers_from_arrays(peers_to_arrays(keys)) for u, keys in server.collect_keys(adverts).items()}
    assert routed[5][9] == adverts[9]
    shares = {u: clients[u].share_keys(routed[u], 2) for u in clients}
    clients = restart(clients)
    inboxes = server.route_shares(shares)
    masked = {u: clients[u].masked_input(vectors[u], inboxes[u]) for u in clients}
    clients = restart(clients)
    request = request_from_arrays(request_to_arrays(server.collect_masked_inputs(masked)))
    replies = {u: reply_from_arrays(u, reply_to_arrays(clients[u].unmask(request))) for u in clients}
    assert server.reconstruct_sum(replies).tolist() == [1, 2, 3, 4]


def test_several_instances_travel_in_one_message_under_their_prefixes():
    a = {"enc.3": np.array([1, 2], dtype=np.uint8), "mask.3": np.array([3], dtype=np.uint8)}
    b = {"enc.3": np.array([9], dtype=np.uint8)}
    merged = {**prefixed(a, 0), **prefixed(b, 10)}
    assert sorted(merged) == ["0/enc.3", "0/mask.3", "10/enc.3"]
    assert instance_arrays(merged, 0) == a and instance_arrays(merged, 10) == b
    assert instance_arrays(merged, 1) == {}  # "10/" does not match instance 1


def test_keys_for_two_sums_agreed_first_then_a_dropout_carries_over():
    """As the Flower workflow runs it: both instances' keys and shares first, then sum 0 (site 12 drops
    before masking), then sum 1 without site 12; each instance has its own keys, so each sum is exact."""
    inputs = [
        {5: np.array([1, 2], np.uint64), 9: np.array([10, 20], np.uint64), 12: np.array([7, 7], np.uint64)},
        {5: np.array([3, 0], np.uint64), 9: np.array([0, 4], np.uint64), 12: np.array([9, 9], np.uint64)},
    ]
    servers = [SecAggServer(None, threshold=2) for _ in inputs]
    clients = [{u: SecAggClient(u) for u in inputs[0]} for _ in inputs]
    inboxes = []
    for server, instance in zip(servers, clients, strict=True):  # rounds "keys" and "share", once
        routed = server.collect_keys({u: c.advertise_keys() for u, c in instance.items()})
        inboxes.append(server.route_shares({u: instance[u].share_keys(routed[u], 2) for u in instance}))
    assert clients[0][5].to_state()["mask_key"] != clients[1][5].to_state()["mask_key"]  # fresh keys
    alive = [5, 9]
    for server, instance, box, vectors in zip(servers, clients, inboxes, inputs, strict=True):
        masked = {u: instance[u].masked_input(vectors[u], box[u]) for u in alive}
        request = server.collect_masked_inputs(masked, vector_length=2)
        assert request.dropped == frozenset({12})
        total = server.reconstruct_sum({u: instance[u].unmask(request) for u in alive})
        assert total.tolist() == (vectors[5] + vectors[9]).tolist()
    server, fresh = SecAggServer(None, threshold=2), {u: SecAggClient(u) for u in alive}
    routed = server.collect_keys({u: c.advertise_keys() for u, c in fresh.items()})
    box = server.route_shares({u: fresh[u].share_keys(routed[u], 2) for u in alive})
    masked = {u: fresh[u].masked_input(inputs[0][u], box[u]) for u in alive}
    with pytest.raises(SecAggError, match="no vector length"):
        server.collect_masked_inputs(masked)  # built without a length and given none


def test_a_dense_release_is_counted_in_the_noise():
    """OWL's sum of every dense block's statistics is one more Gaussian release: sigma is calibrated so
    that all releases together are (epsilon, delta)-DP, by hand: rho = (R·S + D)·Δ₁² / (2σ²)."""
    common = dict(
        threshold=3, modulus_bits=64, max_sites=4, max_tokens=64, token_bound=2.0, epsilon=3.0, delta=1e-5
    )
    common.update(seq_len=16, releases=5, slots=4, stat_kind="hessian")
    blocks_only = make_plan(**common)
    with_dense = make_plan(**common, dense_slots=20, dense_kind="sq_norm")
    one_slot = math.sqrt(2.0) * 16 * 2.0**2  # Δ of one statistic: √2 · seq_len · bound²
    log_term = math.log(1 / 1e-5)
    rho = (math.sqrt(log_term + 3.0) - math.sqrt(log_term)) ** 2  # epsilon = rho + 2 sqrt(rho ln 1/δ)
    assert blocks_only.dp_sigma == pytest.approx(one_slot * math.sqrt(5 * 4 / (2 * rho)))
    assert with_dense.dp_sigma == pytest.approx(one_slot * math.sqrt((5 * 4 + 20) / (2 * rho)))
    assert with_dense.dp_epsilon == pytest.approx(3.0) and blocks_only.dp_epsilon == pytest.approx(3.0)
