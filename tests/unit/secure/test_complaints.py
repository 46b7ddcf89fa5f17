"""One bad sealed share does not stop secure aggregation: its receiver masks without the sender and
names it in a complaint; the server drops the sender (not the victim) and the sum of the others is exact.
References: the plain sum of the honest survivors' inputs."""

from dataclasses import replace

import numpy as np
import pytest

from fedprune.secure import (
    EncryptedShare,
    MaskedInput,
    SecAggClient,
    SecAggError,
    SecAggServer,
    TooFewSurvivorsError,
    UnmaskReply,
    message_nbytes,
    ring_graph,
)
from fedprune.secure.primitives import pack_ids, seal, seeded_random_bytes, share_aad, share_key
from fedprune.secure.shamir import PRIME, SHARE_BYTES, share_to_bytes
from fedprune.secure.wire import masked_from_arrays, masked_to_arrays
from tests.unit.secure.test_protocol import LENGTH, _counts, _plain_sum

BAD, VICTIM = 12, 10


def _share_rounds(vectors, threshold, seed, graph=None, silent=()):
    """Rounds 1 and 2 with seeded clients (``silent`` ones never share): clients, server, inboxes."""
    clients = {u: SecAggClient(u, random_bytes=seeded_random_bytes(seed, u)) for u in vectors}
    server = SecAggServer(LENGTH, threshold, graph)
    peer_keys = server.collect_keys({u: c.advertise_keys() for u, c in clients.items()})
    shares = {u: clients[u].share_keys(peer_keys[u], threshold) for u in peer_keys if u not in silent}
    return clients, server, server.route_shares(shares)


def _garbage(share: EncryptedShare, clients, server) -> bytes:
    return bytes(np.random.default_rng(1).integers(0, 256, len(share.ciphertext), dtype=np.uint8))


def _wrong_key(share: EncryptedShare, clients, server) -> bytes:
    """A well-formed plaintext sealed under a key the receiver does not share."""
    plaintext = pack_ids(share.sender, share.receiver) + share_to_bytes(1) + share_to_bytes(2)
    return seal(bytes(range(32)), plaintext, share_aad(share.sender, share.receiver), seeded_random_bytes(2))


def _out_of_field(share: EncryptedShare, clients, server) -> bytes:
    """Authentic (sealed under the sender's real share key), but its key share is not a field element."""
    sender, receiver = share.sender, share.receiver
    key = share_key(clients[sender]._enc_key, server.adverts[receiver].enc_public, sender, receiver)
    plaintext = pack_ids(sender, receiver) + (PRIME + 1).to_bytes(SHARE_BYTES, "big") + share_to_bytes(2)
    return seal(key, plaintext, share_aad(sender, receiver), seeded_random_bytes(3))


CORRUPTIONS = {
    "garbage": _garbage,
    "wrong key": _wrong_key,
    "truncated tag": lambda share, clients, server: share.ciphertext[:-5],
    "shorter than a nonce": lambda share, clients, server: share.ciphertext[:5],
    "empty": lambda share, clients, server: b"",
    "share outside the field": _out_of_field,
}


def _corrupt(inboxes, clients, server, sender: int, receiver: int, how: str = "garbage") -> None:
    share = inboxes[receiver][sender]
    inboxes[receiver][sender] = replace(share, ciphertext=CORRUPTIONS[how](share, clients, server))


def _masked_round(n, threshold, seed, victims=(VICTIM,), how="garbage"):
    """BAD's shares to ``victims`` corrupted ``how``; every client sends its masked input."""
    vectors = _counts(n)
    clients, server, inboxes = _share_rounds(vectors, threshold, seed)
    for victim in victims:
        _corrupt(inboxes, clients, server, BAD, victim, how)
    masked = {u: clients[u].masked_input(vectors[u], inboxes[u]) for u in inboxes}  # nobody aborts
    return vectors, clients, server, masked


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_a_bad_share_drops_its_sender_and_the_others_sum_exactly(how):
    vectors, clients, server, masked = _masked_round(5, threshold=3, seed=20, how=how)  # n = 5, t = 3
    assert masked[VICTIM].complaints == {BAD}
    assert all(not m.complaints for u, m in masked.items() if u != VICTIM)
    request = server.collect_masked_inputs(masked)
    assert request.survivors == {10, 11, 13, 14} and request.dropped == {BAD}  # BAD sent an input
    assert server.rejected == {BAD: f"share to client {VICTIM} failed to open"}
    replies = {u: clients[u].unmask(request) for u in request.survivors}
    assert BAD not in replies[VICTIM].key_shares  # it never held one
    assert all(BAD in replies[u].key_shares for u in (11, 13, 14))
    total = server.reconstruct_sum(replies)
    assert np.array_equal(total, _plain_sum(vectors, [10, 11, 13, 14]))
    assert not np.array_equal(total, _plain_sum(vectors, vectors))


def test_a_sender_bad_to_every_neighbour_needs_no_key_reconstruction():
    """No survivor masked with it, so nothing of its needs removing (its input is discarded)."""
    vectors, clients, server, masked = _masked_round(5, threshold=3, seed=21, victims=(10, 11, 13, 14))
    request = server.collect_masked_inputs(masked)
    assert server.rejected == {BAD: "shares to clients [10, 11, 13, 14] failed to open"}
    replies = {u: clients[u].unmask(request) for u in request.survivors}
    assert not any(r.key_shares for r in replies.values())
    assert np.array_equal(server.reconstruct_sum(replies), _plain_sum(vectors, [10, 11, 13, 14]))


def test_too_few_holders_of_the_bad_senders_key_stop_the_sum():
    """Two victims of five, t = 3: only two survivors hold shares of the bad sender's mask key."""
    vectors, clients, server, masked = _masked_round(5, threshold=3, seed=22, victims=(10, 11))
    request = server.collect_masked_inputs(masked)
    replies = {u: clients[u].unmask(request) for u in request.survivors}
    with pytest.raises(TooFewSurvivorsError, match="mask key s\\^SK of client 12 has 2 shares, need 3"):
        server.reconstruct_sum(replies)


def test_a_victim_left_with_fewer_than_threshold_shares_aborts():
    vectors = _counts(3)
    clients, server, inboxes = _share_rounds(vectors, threshold=3, seed=23)
    _corrupt(inboxes, clients, server, BAD, VICTIM)
    with pytest.raises(TooFewSurvivorsError, match="client 10: only 2 .* need 3"):
        clients[VICTIM].masked_input(vectors[VICTIM], inboxes[VICTIM])


def test_a_share_routed_from_a_non_neighbour_aborts_the_receiver():
    vectors = _counts(8)
    graph = ring_graph(vectors, degree=4, seed=0)
    clients, server, inboxes = _share_rounds(vectors, threshold=3, seed=24, graph=graph)
    stranger = min(set(vectors) - graph[VICTIM] - {VICTIM})
    inboxes[VICTIM][stranger] = EncryptedShare(stranger, VICTIM, b"\x00" * 160)
    with pytest.raises(SecAggError, match=f"routed shares from client {stranger}, not a neighbour"):
        clients[VICTIM].masked_input(vectors[VICTIM], inboxes[VICTIM])


def test_sparse_graph_with_a_bad_share_and_dropouts_is_exact():
    vectors = _counts(8)
    graph = ring_graph(vectors, degree=6, seed=0)  # each client misses one other
    clients, server, inboxes = _share_rounds(vectors, threshold=3, seed=25, graph=graph)
    bad, victim = 13, min(graph[13])
    _corrupt(inboxes, clients, server, bad, victim, "wrong key")
    gone = min(graph[bad] - {victim})  # a neighbour of the bad sender drops before masking
    masked = {u: clients[u].masked_input(vectors[u], inboxes[u]) for u in inboxes if u != gone}
    request = server.collect_masked_inputs(masked)
    assert request.dropped == {bad, gone} and victim in request.survivors
    late = max(request.survivors - {victim})  # sends its masked input, then never answers
    replies = {u: clients[u].unmask(request) for u in request.survivors if u != late}
    expected = _plain_sum(vectors, request.survivors)
    assert np.array_equal(server.reconstruct_sum(replies), expected)
    assert set(request.survivors) == set(vectors) - {bad, gone}


def _forged(masked: dict[int, MaskedInput], client: int, complaints: set[int]) -> None:
    masked[client] = replace(masked[client], complaints=frozenset(complaints))


@pytest.mark.parametrize("target", ["itself", "non-neighbour", "neighbour that never shared", "not a client"])
def test_a_complaint_against_anyone_but_a_sharing_neighbour_rejects_the_complainer(target):
    vectors = _counts(8)
    graph = ring_graph(vectors, degree=4, seed=0)
    complainer = 11
    quiet = min(graph[complainer])  # advertises keys, then never shares them
    clients, server, inboxes = _share_rounds(vectors, threshold=3, seed=26, graph=graph, silent={quiet})
    accused = {
        "itself": complainer,
        "non-neighbour": min(set(vectors) - graph[complainer] - {complainer}),
        "neighbour that never shared": quiet,
        "not a client": 99,
    }[target]
    masked = {u: clients[u].masked_input(vectors[u], inboxes[u]) for u in inboxes}
    _forged(masked, complainer, {accused})
    request = server.collect_masked_inputs(masked)
    assert set(server.rejected) == {complainer}
    assert "complains about" in server.rejected[complainer]
    assert request.dropped == {complainer} and request.survivors == set(vectors) - {complainer, quiet}
    replies = {u: clients[u].unmask(request) for u in request.survivors}
    assert np.array_equal(server.reconstruct_sum(replies), _plain_sum(vectors, request.survivors))


def test_a_malformed_complaint_set_rejects_the_complainer():
    vectors = _counts(4)
    clients, server, inboxes = _share_rounds(vectors, threshold=2, seed=27)
    masked = {u: clients[u].masked_input(vectors[u], inboxes[u]) for u in inboxes}
    masked[11] = replace(masked[11], complaints=[12])
    masked[12] = replace(masked[12], complaints=frozenset({True}))
    server.collect_masked_inputs(masked)
    assert set(server.rejected) == {11, 12}
    assert all("complaints are not a frozenset" in reason for reason in server.rejected.values())


def test_the_victim_refuses_a_request_that_lists_the_bad_sender_as_a_survivor():
    vectors, clients, server, masked = _masked_round(4, threshold=2, seed=28)
    honest = server.collect_masked_inputs(masked)
    lying = replace(honest, survivors=frozenset(vectors), dropped=frozenset())  # ignores the complaint
    restarted = SecAggClient.from_state(clients[VICTIM].to_state())  # the complaint survives a restart
    with pytest.raises(SecAggError, match="\\[12\\] are listed as survivors"):
        restarted.unmask(lying)
    assert BAD not in clients[VICTIM].unmask(honest).key_shares


def test_the_server_refuses_a_key_share_from_a_client_that_complained_about_its_owner():
    vectors, clients, server, masked = _masked_round(5, threshold=3, seed=29)
    request = server.collect_masked_inputs(masked)
    replies = {u: clients[u].unmask(request) for u in request.survivors}
    forged = replies[VICTIM]
    replies[VICTIM] = UnmaskReply(VICTIM, forged.seed_shares, {BAD: share_to_bytes(7)})
    total = server.reconstruct_sum(replies)
    assert "whose shares it held" in server.rejected[VICTIM]
    assert np.array_equal(total, _plain_sum(vectors, [10, 11, 13, 14]))  # the victim's input still counts


def test_complaints_travel_on_the_wire_and_count_in_the_payload_size():
    message = MaskedInput(10, np.arange(4, dtype=np.uint64), frozenset({12, 3}))
    arrays = masked_to_arrays(message)
    assert arrays["complaints"].tolist() == [3, 12]
    back = masked_from_arrays(10, arrays)
    assert back.complaints == {3, 12} and np.array_equal(back.vector, message.vector)
    assert masked_from_arrays(10, masked_to_arrays(MaskedInput(10, message.vector))).complaints == set()
    assert message_nbytes(message) == 8 + 32 + 2 * 8
    for bad in (np.array([12], dtype=np.int64), np.array([[12]], dtype=np.uint64), [12]):
        with pytest.raises(ValueError, match="complaints"):
            masked_from_arrays(10, {"masked": message.vector, "complaints": bad})
    with pytest.raises(KeyError):
        masked_from_arrays(10, {"masked": message.vector})
