import numpy as np
import pytest
import torch

from fedprune.secure import (
    FixedPoint,
    IntegerCode,
    InvalidMessageError,
    MaskedInput,
    SecAggClient,
    SecAggError,
    SecAggServer,
    TooFewSurvivorsError,
    UnmaskReply,
    UnmaskRequest,
    moment_clip,
    ring_graph,
    run_secure_sum,
    validate_masked_input,
)
from fedprune.secure.primitives import seeded_random_bytes
from fedprune.stats import sq_norm_sum

LENGTH = 32


def _counts(n: int, length: int = LENGTH, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    code = IntegerCode(max_abs=1000, max_clients=16)
    return {10 + u: code.encode(rng.integers(0, 1000, size=length)) for u in range(n)}


def _plain_sum(vectors: dict[int, np.ndarray], clients) -> np.ndarray:
    total = np.zeros(LENGTH, dtype=np.uint64)
    for u in clients:
        total += vectors[u]
    return total


def test_secure_sum_of_counts_is_exact():
    vectors = _counts(5)
    result = run_secure_sum(vectors, threshold=3, seed=0)
    assert np.array_equal(result.total, _plain_sum(vectors, vectors))
    assert result.survivors == set(vectors) and result.dropped == set() and result.rejected == {}
    assert (
        IntegerCode(1000, 16).decode_sum(result.total, 5).tolist()
        == sum(IntegerCode(1000, 16).decode_sum(v, 1) for v in vectors.values()).tolist()
    )


def test_secure_sum_of_float_statistics_is_within_the_bound():
    torch.manual_seed(0)
    activations = {u: torch.rand(6, 4) * 2 - 1 for u in range(4)}  # (tokens, in), |x| <= 1
    stats = {u: sq_norm_sum(x) for u, x in activations.items()}  # (in,) float64
    code = FixedPoint.for_bound(moment_clip(max_tokens=6, activation_bound=1.0), max_clients=4)
    result = run_secure_sum({u: code.encode(s) for u, s in stats.items()}, threshold=3, seed=1)
    decoded = torch.from_numpy(code.decode_sum(result.total, 4))
    exact = sum(stats.values())
    assert torch.all((decoded - exact).abs() <= code.error_bound(4) + 2**-52 * exact.abs())
    assert not torch.equal(decoded, torch.zeros(4))


def _leaves(message):
    """Every array and bytes value inside a received message (dataclasses and dicts, recursively)."""
    if isinstance(message, np.ndarray | bytes):
        yield message
    elif isinstance(message, dict):
        for value in message.values():
            yield from _leaves(value)
    elif hasattr(message, "__dataclass_fields__"):
        for name in message.__dataclass_fields__:
            yield from _leaves(getattr(message, name))


def test_server_never_receives_an_unmasked_input():
    vectors = _counts(4)
    result = run_secure_sum(vectors, threshold=3, drop_before_masking={11}, seed=2)
    raw = [v.tobytes() for v in vectors.values()]
    leaves = [leaf for record in result.transcript for leaf in _leaves(record.message)]
    arrays = [leaf for leaf in leaves if isinstance(leaf, np.ndarray)]
    assert len(arrays) == 3 and sum(isinstance(leaf, bytes) for leaf in leaves) > 20
    for leaf in leaves:
        if isinstance(leaf, np.ndarray):
            assert not any(np.array_equal(leaf, v) for v in vectors.values())
            assert not any(leaf.tobytes() in r or r in leaf.tobytes() for r in raw)
        else:
            assert not any(r in leaf for r in raw)
    for record in result.transcript:
        if isinstance(record.message, MaskedInput):
            # not merely different somewhere: it differs almost everywhere from the sender's input
            assert np.count_nonzero(record.message.vector == vectors[record.sender]) <= 1


def test_no_client_has_both_secrets_revealed():
    vectors = _counts(6)
    result = run_secure_sum(
        vectors, threshold=3, drop_before_masking={10, 12}, drop_after_masking={13}, seed=3
    )
    seeds_of, keys_of = set(), set()
    for record in result.transcript:
        if isinstance(record.message, UnmaskReply):
            seeds_of |= set(record.message.seed_shares)
            keys_of |= set(record.message.key_shares)
    assert keys_of == {10, 12} and seeds_of == {11, 13, 14, 15}
    assert not seeds_of & keys_of


def test_a_single_masked_vector_looks_uniform():
    size = 2**16
    counts = IntegerCode(max_abs=1, max_clients=3).encode(np.arange(size) % 2)  # 0/1 votes
    vectors = {1: counts, 2: counts, 3: counts}
    result = run_secure_sum(vectors, threshold=2, seed=4)
    masked = next(r.message.vector for r in result.transcript if isinstance(r.message, MaskedInput))

    def bit_imbalance(y: np.ndarray) -> float:
        return max(abs(float(((y >> np.uint64(b)) & np.uint64(1)).mean()) - 0.5) for b in range(64))

    def top_byte_chi_square(y: np.ndarray) -> float:
        observed = np.bincount((y >> np.uint64(56)).astype(np.int64), minlength=256)
        expected = size / 256
        return float(((observed - expected) ** 2 / expected).sum())

    # 6 standard deviations: 0.5 / sqrt(2^16) per bit; chi-square with 255 dof has sd sqrt(510) ~ 22.6
    assert bit_imbalance(masked) < 6 * 0.5 / 256
    assert top_byte_chi_square(masked) < 255 + 6 * 22.6
    # the same tests reject the unmasked input
    assert bit_imbalance(counts) >= 6 * 0.5 / 256
    assert top_byte_chi_square(counts) >= 255 + 6 * 22.6


@pytest.mark.parametrize("num_dropped", [0, 1, 2])
def test_dropping_up_to_n_minus_t_after_masking_keeps_the_sum(num_dropped):
    vectors = _counts(5)  # n = 5, t = 3
    dropped = set(list(vectors)[:num_dropped])
    result = run_secure_sum(vectors, threshold=3, drop_after_masking=dropped, seed=5)
    assert np.array_equal(result.total, _plain_sum(vectors, vectors))  # their inputs still count


def test_dropping_before_masking_sums_the_survivors():
    vectors = _counts(5)
    result = run_secure_sum(vectors, threshold=3, drop_before_masking={10}, drop_after_masking={14}, seed=6)
    assert result.dropped == {10}
    assert np.array_equal(result.total, _plain_sum(vectors, [11, 12, 13, 14]))


def test_dropping_more_than_n_minus_t_raises():
    vectors = _counts(5)
    with pytest.raises(TooFewSurvivorsError, match="answered the unmask request"):
        run_secure_sum(vectors, threshold=3, drop_after_masking={10, 11, 12}, seed=7)
    with pytest.raises(TooFewSurvivorsError, match="masked input"):
        run_secure_sum(vectors, threshold=3, drop_before_masking={10, 11, 12}, seed=7)
    with pytest.raises(TooFewSurvivorsError, match="key sharing"):
        run_secure_sum(vectors, threshold=3, drop_before_sharing={10, 11, 12}, seed=7)


def test_wrong_length_vector_is_excluded_and_the_rest_complete():
    vectors = _counts(5)
    vectors[12] = vectors[12][:-1]
    result = run_secure_sum(vectors, threshold=3, vector_length=LENGTH, seed=8)
    assert set(result.rejected) == {12} and "shape (31,)" in result.rejected[12]
    assert result.dropped == {12}
    assert np.array_equal(result.total, _plain_sum(vectors, [10, 11, 13, 14]))


def test_validate_masked_input_names_the_client():
    good = np.zeros(4, dtype=np.uint64)
    assert validate_masked_input(7, MaskedInput(7, good), 4, 64) is good
    bad = [
        (MaskedInput(7, good.astype(np.int64)), "dtype int64"),
        (MaskedInput(7, np.zeros(5, dtype=np.uint64)), "shape"),
        (MaskedInput(7, [0, 0, 0, 0]), "not a numpy array"),
        (MaskedInput(8, good), "not this client's"),
        (MaskedInput(7, np.array([0, 0, 0, 2**16], dtype=np.uint64)), "outside the modulus"),
    ]
    for message, reason in bad:
        with pytest.raises(InvalidMessageError, match=f"client 7: .*{reason}"):
            validate_masked_input(7, message, 4, 16)


def _clients(vectors, seed):
    return {u: SecAggClient(u, random_bytes=seeded_random_bytes(seed, u)) for u in vectors}


def test_step_by_step_rounds_exclude_a_bad_dtype():
    vectors = _counts(4)
    clients = _clients(vectors, seed=9)
    server = SecAggServer(LENGTH, threshold=3)
    peer_keys = server.collect_keys({u: c.advertise_keys() for u, c in clients.items()})
    inboxes = server.route_shares({u: clients[u].share_keys(peer_keys[u], 3) for u in peer_keys})
    masked = {u: clients[u].masked_input(vectors[u], inboxes[u]) for u in inboxes}
    masked[11] = MaskedInput(11, masked[11].vector.astype(np.float64))
    request = server.collect_masked_inputs(masked)
    assert request == UnmaskRequest(frozenset({10, 12, 13}), frozenset({11}))
    assert "dtype float64" in server.rejected[11]
    total = server.reconstruct_sum({u: clients[u].unmask(request) for u in request.survivors})
    assert np.array_equal(total, _plain_sum(vectors, [10, 12, 13]))


def test_clients_refuse_unsafe_or_repeated_requests():
    vectors = _counts(3)
    clients = _clients(vectors, seed=10)
    server = SecAggServer(LENGTH, threshold=2)
    peer_keys = server.collect_keys({u: c.advertise_keys() for u, c in clients.items()})
    inboxes = server.route_shares({u: clients[u].share_keys(peer_keys[u], 2) for u in peer_keys})
    for u in inboxes:
        clients[u].masked_input(vectors[u], inboxes[u])
    with pytest.raises(SecAggError, match="both survivors and dropped"):
        clients[10].unmask(UnmaskRequest(frozenset({10, 11}), frozenset({11})))
    with pytest.raises(SecAggError, match="not listed as a survivor"):
        clients[11].unmask(UnmaskRequest(frozenset({10, 12}), frozenset({11})))
    with pytest.raises(TooFewSurvivorsError):
        clients[12].unmask(UnmaskRequest(frozenset({12}), frozenset({10, 11})))
    with pytest.raises(SecAggError, match="out of order"):
        clients[12].unmask(UnmaskRequest(frozenset({10, 11, 12}), frozenset()))  # one answer only
    with pytest.raises(SecAggError, match="out of order"):
        clients[10].masked_input(vectors[10], inboxes[10])  # masks are single-use


def test_sparse_ring_graph_with_dropouts():
    vectors = _counts(8)
    graph = ring_graph(vectors, degree=4, seed=0)
    result = run_secure_sum(
        vectors, threshold=3, drop_before_masking={10}, drop_after_masking={15}, neighbours=graph, seed=12
    )
    assert np.array_equal(result.total, _plain_sum(vectors, [u for u in vectors if u != 10]))
    shares = [r.message for r in result.transcript if r.round == "share_keys"]
    assert all(len(bundle) == 4 for bundle in shares)  # each client talks to its 4 neighbours only


def test_small_modulus_end_to_end():
    code = IntegerCode(max_abs=100, max_clients=4, modulus_bits=16)
    votes = {u: code.encode(np.arange(LENGTH) % 7 - 3 + u) for u in range(4)}
    result = run_secure_sum(votes, threshold=2, modulus_bits=16, drop_before_masking={3}, seed=13)
    masked = [r.message.vector for r in result.transcript if isinstance(r.message, MaskedInput)]
    assert all(int(v.max()) < 2**16 for v in masked)
    expected = sum((np.arange(LENGTH) % 7 - 3 + u) for u in range(3))
    assert code.decode_sum(result.total, 3).tolist() == expected.tolist()


def test_fixed_seed_is_reproducible():
    vectors = _counts(3)

    def masked(seed):
        result = run_secure_sum(vectors, threshold=2, seed=seed)
        return [r.message.vector for r in result.transcript if isinstance(r.message, MaskedInput)]

    assert all(np.array_equal(a, b) for a, b in zip(masked(1), masked(1), strict=True))
    assert not np.array_equal(masked(1)[0], masked(2)[0])


@pytest.mark.parametrize("bad_key", [bytes(32), (1).to_bytes(32, "little")])  # low-order points 0 and 1
def test_a_low_order_public_key_excludes_its_sender_not_the_others(bad_key):
    """Routed on, a low-order key would make every neighbour's key agreement fail (all-zero secret)."""
    from dataclasses import replace

    vectors = _counts(4)
    clients = _clients(vectors, seed=11)
    server = SecAggServer(LENGTH, threshold=3)
    adverts = {u: c.advertise_keys() for u, c in clients.items()}
    adverts[12] = replace(adverts[12], mask_public=bad_key)
    peer_keys = server.collect_keys(adverts)
    assert "low-order" in server.rejected[12] and 12 not in peer_keys
    inboxes = server.route_shares({u: clients[u].share_keys(peer_keys[u], 3) for u in peer_keys})
    masked = {u: clients[u].masked_input(vectors[u], inboxes[u]) for u in inboxes}
    request = server.collect_masked_inputs(masked)
    total = server.reconstruct_sum({u: clients[u].unmask(request) for u in request.survivors})
    assert np.array_equal(total, _plain_sum(vectors, [10, 11, 13]))
