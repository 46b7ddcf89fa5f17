"""An active server or network attacker against secure aggregation, performed, not mocked.

Key substitution: whoever routes the adverts gives a victim its own keys in place of the victim's
neighbours'. Without a roster this really unmasks the victim's vector (shown); with signed adverts the
victim aborts and its vector never leaves it. Survivor sets: a server that tells one client a different
survivor set (to collect a secret's seed share from some clients and its mask-key share from another)
is caught by the consistency round before any share is revealed.
"""

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedprune.secure import (
    IntegerCode,
    KeyAdvert,
    SecAggClient,
    SecAggError,
    SecAggServer,
    SurvivorSignature,
    TooFewSurvivorsError,
    UnmaskRequest,
    run_secure_sum,
)
from fedprune.secure.client import mask_sign, share_point
from fedprune.secure.driver import ReceivedMessage
from fedprune.secure.identity import identity_public, new_identity, sign_advert, sign_survivors
from fedprune.secure.messages import EncryptedShare, message_nbytes
from fedprune.secure.primitives import (
    add_keystreams_,
    open_sealed,
    pack_ids,
    pairwise_mask_seed,
    public_bytes,
    seal,
    share_aad,
    share_key,
)
from fedprune.secure.shamir import SHARE_BYTES, reconstruct_secret, share_from_bytes, share_to_bytes

LENGTH = 16
VICTIM = 10
THRESHOLD = 3


def _vectors(n: int = 4) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    code = IntegerCode(max_abs=1000, max_clients=16)
    return {10 + u: code.encode(rng.integers(0, 1000, size=LENGTH)) for u in range(n)}


def _identities(clients) -> dict:
    return {u: new_identity() for u in clients}


def _sum(vectors, clients) -> np.ndarray:
    total = np.zeros(LENGTH, dtype=np.uint64)
    for u in clients:
        total += vectors[u]
    return total


class KeySubstitution:
    """A router that replaces every neighbour advert routed to the victim by one whose private keys it
    holds, and forges the shares routed to the victim so that it masks with those keys."""

    def __init__(self, transcript: list[ReceivedMessage], sign=None):
        self.transcript = transcript  # what the server received so far
        self.enc: dict[int, X25519PrivateKey] = {}
        self.mask: dict[int, X25519PrivateKey] = {}
        self.sign = sign  # (v, genuine advert, fake enc, fake mask) -> (identity, signature)
        self.victim_enc = b""

    def __call__(self, round_name, receiver, message):
        if receiver != VICTIM:
            return message
        if round_name == "peer_keys":
            self.victim_enc = self._received("advertise_keys").enc_public
            return {v: self._fake(v, advert) for v, advert in message.items()}
        if round_name == "shares":
            return {v: self._forged_share(v) for v in message}
        return message

    def _fake(self, v: int, genuine: KeyAdvert) -> KeyAdvert:
        self.enc[v], self.mask[v] = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        enc, mask = public_bytes(self.enc[v]), public_bytes(self.mask[v])
        identity, signature = (b"", b"") if self.sign is None else self.sign(v, genuine, enc, mask)
        return KeyAdvert(v, enc, mask, identity, signature)

    def _forged_share(self, v: int) -> EncryptedShare:
        plaintext = pack_ids(v, VICTIM) + share_to_bytes(1) + share_to_bytes(2)  # any values open
        key = share_key(self.enc[v], self.victim_enc, v, VICTIM)
        return EncryptedShare(v, VICTIM, seal(key, plaintext, share_aad(v, VICTIM), lambda n: bytes(n)))

    def _received(self, round_name: str):
        return next(m.message for m in self.transcript if (m.round, m.sender) == (round_name, VICTIM))

    def unmask_victim(self) -> np.ndarray:
        """The victim's input, from what the server received: its sealed shares (opened with the fake
        keys), its masked vector and the pairwise masks it agreed with the fake keys."""
        bundle = self._received("share_keys")
        seed_points = {}
        for v, sealed in bundle.items():
            key = share_key(self.enc[v], self.victim_enc, VICTIM, v)
            plaintext = open_sealed(key, sealed.ciphertext, share_aad(VICTIM, v))
            seed_points[share_point(v)] = share_from_bytes(plaintext[16 + SHARE_BYTES :])
        seed = reconstruct_secret(seed_points, THRESHOLD).to_bytes(32, "big")
        y = self._received("masked_input").vector.copy()
        victim_mask = self._received("advertise_keys").mask_public
        streams = [(seed, -1)] + [
            (pairwise_mask_seed(self.mask[v], victim_mask), -mask_sign(VICTIM, v)) for v in sorted(self.mask)
        ]
        return add_keystreams_(y, streams)


def _attack(vectors, identities=None, sign=None):
    """Run the key-substitution attack; the attacker and the server's transcript."""
    transcript: list[ReceivedMessage] = []
    attacker = KeySubstitution(transcript, sign)
    kwargs = dict(identities=identities, router=attacker, transcript=transcript)
    try:  # the other clients' masks no longer cancel; what matters is what the server saw
        result = run_secure_sum(vectors, THRESHOLD, seed=3, **kwargs)
    except SecAggError:
        result = None
    return attacker, transcript, result


def test_without_a_roster_key_substitution_unmasks_the_victim():
    vectors = _vectors()
    attacker, transcript, _ = _attack(vectors)
    assert np.array_equal(attacker.unmask_victim(), vectors[VICTIM])


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        ("unsigned", "not in the roster"),
        ("genuine identity, old signature", "invalid signature"),
        ("attacker's own identity", "not in the roster"),
        ("one corrupt site's identity for every neighbour", "reuses another client's identity"),
        ("the victim's own identity", "reuses another client's identity"),
    ],
)
def test_with_a_roster_the_victim_aborts_and_its_vector_never_leaves_it(forge, reason):
    vectors = _vectors()
    identities = _identities(vectors)
    attacker_key, corrupt = new_identity(), identities[11]

    def sign(v, genuine, enc, mask):
        signer = {
            "attacker's own identity": attacker_key,
            "one corrupt site's identity for every neighbour": corrupt,
            "the victim's own identity": identities[VICTIM],
        }.get(forge)
        if forge == "unsigned":
            return b"", b""
        if signer is None:
            return genuine.identity, genuine.signature
        return identity_public(signer), sign_advert(signer, "run", 0, v, enc, mask)

    attacker, transcript, result = _attack(vectors, identities, sign)
    assert [m.round for m in transcript if m.sender == VICTIM] == ["advertise_keys"]  # nothing more
    assert result is not None and reason in result.aborted[VICTIM]
    # the victim is a dropout: the others' sum, exactly
    assert result.survivors == {11, 12, 13}
    assert np.array_equal(result.total, _sum(vectors, [11, 12, 13]))


def test_an_authenticated_sum_is_exact_and_counts_the_signature_bytes():
    vectors = _vectors(5)
    result = run_secure_sum(
        vectors, THRESHOLD, seed=1, identities=_identities(vectors), drop_after_masking={14}
    )
    assert np.array_equal(result.total, _sum(vectors, vectors)) and not result.rejected
    rounds = [m.round for m in result.transcript]
    assert rounds.count("consistency") == 5 and rounds.count("unmask") == 4
    advert = result.transcript[0].message
    assert len(advert.identity) == 32 and len(advert.signature) == 64
    assert message_nbytes(advert) == 8 + 32 + 32 + 32 + 64
    signature = next(m.message for m in result.transcript if m.round == "consistency")
    assert message_nbytes(signature) == 8 + 64


def test_an_authenticated_sum_survives_a_dropout_before_masking():
    vectors = _vectors(5)
    result = run_secure_sum(
        vectors, THRESHOLD, seed=2, identities=_identities(vectors), drop_before_masking={12}
    )
    assert result.dropped == {12}
    assert np.array_equal(result.total, _sum(vectors, [10, 11, 13, 14]))


def _server(identities, roster=None):
    roster = frozenset(identity_public(k) for k in identities.values()) if roster is None else roster
    return SecAggServer(LENGTH, THRESHOLD, roster=roster, run="run", instance=0), roster


def _client(u, identities, roster):
    return SecAggClient(u, identity=identities[u], roster=roster, run="run", instance=0)


def test_the_server_rejects_forged_and_unlisted_adverts():
    identities = _identities(range(10, 15))
    server, roster = _server(identities)
    adverts = {u: _client(u, identities, roster).advertise_keys() for u in identities}
    good = adverts[11]
    outsider = new_identity()
    fake_enc = public_bytes(X25519PrivateKey.generate())
    adverts[11] = KeyAdvert(11, fake_enc, good.mask_public, good.identity, good.signature)  # keys swapped in
    adverts[12] = KeyAdvert(
        12,
        adverts[12].enc_public,
        adverts[12].mask_public,
        identity_public(outsider),
        sign_advert(outsider, "run", 0, 12, adverts[12].enc_public, adverts[12].mask_public),
    )
    advert_13 = adverts[13]  # a genuine advert replayed for another instance
    replayed = SecAggServer(LENGTH, THRESHOLD, roster=roster, run="run", instance=1)
    routed = server.collect_keys(adverts)
    assert server.rejected == {11: "key advert signature is not valid", 12: "identity is not in the roster"}
    assert set(routed) == {10, 13, 14}
    with pytest.raises(TooFewSurvivorsError):
        replayed.collect_keys({13: advert_13})
    assert replayed.rejected == {13: "key advert signature is not valid"}


def test_a_duplicated_identity_is_rejected_by_the_server():
    vectors = _vectors(5)
    identities = _identities(vectors)
    identities[11] = identities[10]  # one site (key) behind two client ids
    result = run_secure_sum(vectors, THRESHOLD, seed=4, identities=identities)
    assert result.rejected == {
        10: "identity is used by another client too",
        11: "identity is used by another client too",
    }
    assert np.array_equal(result.total, _sum(vectors, [12, 13, 14]))


def _masked(n: int = 5):
    """An authenticated instance up to the masked inputs: clients, server, the server's request."""
    vectors = _vectors(n)
    identities = _identities(vectors)
    server, roster = _server(identities)
    clients = {u: _client(u, identities, roster) for u in vectors}
    peers = server.collect_keys({u: c.advertise_keys() for u, c in clients.items()})
    inboxes = server.route_shares({u: clients[u].share_keys(peers[u], THRESHOLD) for u in clients})
    request = server.collect_masked_inputs(
        {u: clients[u].masked_input(vectors[u], inboxes[u]) for u in clients}
    )
    return vectors, clients, server, request


def test_different_survivor_sets_for_different_clients_reveal_no_share():
    """The server tells client 10 that 14 dropped (to get 14's mask-key share from it) and the others
    that 14 survived (to get 14's seed share): client 10 sees that no one else signed its set."""
    vectors, clients, server, request = _masked()
    lie = UnmaskRequest(request.survivors - {14}, request.dropped | {14})
    signatures = {u: clients[u].check_consistency(request) for u in clients if u != 10}
    signatures[10] = clients[10].check_consistency(lie)
    with pytest.raises(SecAggError, match="signature of the survivor set is not valid"):
        clients[10].unmask(lie, signatures)  # all the others' signatures, forwarded
    _, clients, _, request = _masked()  # and forwarding only its own signature is too few
    lie = UnmaskRequest(request.survivors - {14}, request.dropped | {14})
    own = clients[10].check_consistency(lie)
    with pytest.raises(TooFewSurvivorsError, match="only 1 survivors signed"):
        clients[10].unmask(lie, {10: own})


def test_the_honest_server_keeps_a_wrong_signature_out_and_unmasks_the_rest():
    vectors, clients, server, request = _masked()
    signatures = {u: clients[u].check_consistency(request) for u in clients}
    signatures[12] = SurvivorSignature(12, bytes(64))
    forwarded = server.collect_signatures(signatures)
    assert set(forwarded) == {10, 11, 13, 14} and "not valid" in server.rejected[12]
    replies = {u: clients[u].unmask(request, forwarded) for u in forwarded}
    assert np.array_equal(server.reconstruct_sum(replies), _sum(vectors, vectors))


def test_a_client_refuses_requests_the_signatures_do_not_support():
    _, clients, _, request = _masked()
    signatures = {u: clients[u].check_consistency(request) for u in clients}
    with pytest.raises(SecAggError, match="differs from the survivor set it signed"):
        clients[10].unmask(UnmaskRequest(request.survivors - {14}, request.dropped | {14}), signatures)
    with pytest.raises(SecAggError, match="not valid"):  # a signature by someone outside the survivors
        clients[11].unmask(request, {**signatures, 99: SurvivorSignature(99, signatures[10].signature)})
    _, clients, _, request = _masked()  # clients that have not signed yet
    outsider_set = UnmaskRequest(request.survivors | {99}, frozenset())
    with pytest.raises(SecAggError, match=r"clients \[99\] are not its neighbours"):
        clients[12].check_consistency(outsider_set)
    with pytest.raises(SecAggError, match="not its neighbours"):
        clients[13].check_consistency(UnmaskRequest(request.survivors, frozenset({99})))
    clients[14].check_consistency(request)
    with pytest.raises(SecAggError, match="needs the request and the signatures"):
        clients[14].unmask(request)


def test_a_signature_from_another_instance_does_not_count():
    _, clients, _, request = _masked()
    signatures = {u: clients[u].check_consistency(request) for u in clients}
    other = sign_survivors(new_identity(), "run", 1, request.survivors)
    with pytest.raises(SecAggError, match="client 11's signature"):
        clients[10].unmask(request, {**signatures, 11: SurvivorSignature(11, other)})


def test_authenticated_state_survives_a_fresh_process_at_every_step():
    vectors = _vectors(4)
    identities = _identities(vectors)
    server, roster = _server(identities)
    clients = {u: _client(u, identities, roster) for u in vectors}

    def reload(u):
        clients[u] = SecAggClient.from_state(clients[u].to_state(), identity=identities[u], roster=roster)
        return clients[u]

    peers = server.collect_keys({u: c.advertise_keys() for u, c in clients.items()})
    inboxes = server.route_shares({u: reload(u).share_keys(peers[u], THRESHOLD) for u in clients})
    masked = {u: reload(u).masked_input(vectors[u], inboxes[u]) for u in clients}
    request = server.collect_masked_inputs(masked)
    forwarded = server.collect_signatures({u: reload(u).check_consistency(request) for u in clients})
    replies = {u: reload(u).unmask(request, forwarded) for u in clients}
    assert np.array_equal(server.reconstruct_sum(replies), _sum(vectors, vectors))
    with pytest.raises(SecAggError, match="disagree on authentication"):
        SecAggClient.from_state(clients[10].to_state())
