"""A client counts only itself and its neighbours toward the threshold: a server cannot pad a survivor
list with ids the client does not know to unmask a sum of fewer than t clients."""

import numpy as np
import pytest

from fedprune.secure import IntegerCode, SecAggClient, SecAggServer, TooFewSurvivorsError, UnmaskRequest
from fedprune.secure.primitives import seeded_random_bytes

LENGTH = 8


def _masked_clients(n: int, threshold: int):
    code = IntegerCode(max_abs=100, max_clients=16)
    vectors = {10 + u: code.encode(np.arange(LENGTH) + u) for u in range(n)}
    clients = {u: SecAggClient(u, random_bytes=seeded_random_bytes(5, u)) for u in vectors}
    server = SecAggServer(LENGTH, threshold=threshold)
    peer_keys = server.collect_keys({u: c.advertise_keys() for u, c in clients.items()})
    inboxes = server.route_shares({u: clients[u].share_keys(peer_keys[u], threshold) for u in peer_keys})
    for u in inboxes:
        clients[u].masked_input(vectors[u], inboxes[u])
    return clients


@pytest.mark.parametrize("survivors", [{10, 998, 999}, {10, 11, 999}])
def test_unknown_ids_do_not_count_toward_the_threshold(survivors):
    clients = _masked_clients(4, threshold=3)
    assert clients[10].neighbours == {11, 12, 13}
    with pytest.raises(TooFewSurvivorsError, match="among this client and its neighbours, need 3"):
        clients[10].unmask(UnmaskRequest(frozenset(survivors), frozenset({12, 13})))


def test_enough_known_survivors_unmask():
    clients = _masked_clients(4, threshold=3)
    reply = clients[10].unmask(UnmaskRequest(frozenset({10, 11, 12}), frozenset({13})))
    assert set(reply.seed_shares) == {10, 11, 12} and set(reply.key_shares) == {13}
