"""Site identities and the roster: signatures bind every field, files round-trip, bad files are clear."""

import json
import os
import stat

import pytest

from fedprune.secure.identity import (
    IdentityError,
    identity_public,
    load_identity,
    load_roster,
    main,
    new_identity,
    save_identity,
    save_roster,
    sign_advert,
    sign_survivors,
    survivors_message,
    verify_advert,
    verify_survivors,
)

ENC, MASK = bytes(range(32)), bytes(range(32, 64))
ADVERT = ("run-a", 3, 7, ENC, MASK)  # run, instance, client id, enc key, mask key


def test_an_advert_signature_verifies_and_any_changed_field_fails():
    key = new_identity()
    public, signature = identity_public(key), sign_advert(key, *ADVERT)
    assert len(public) == 32 and len(signature) == 64
    assert verify_advert(public, signature, *ADVERT)
    flipped = bytes([ENC[0] ^ 1]) + ENC[1:]
    for changed in [
        ("run-b", 3, 7, ENC, MASK),
        ("run-a", 4, 7, ENC, MASK),
        ("run-a", 3, 8, ENC, MASK),
        ("run-a", 3, 7, flipped, MASK),
        ("run-a", 3, 7, ENC, flipped),
        ("run-a", 3, 7, MASK, ENC),  # the two keys swapped
    ]:
        assert not verify_advert(public, signature, *changed), changed
    assert not verify_advert(identity_public(new_identity()), signature, *ADVERT)  # someone else's key
    assert not verify_advert(public, signature[:-1] + bytes([signature[-1] ^ 1]), *ADVERT)
    assert not verify_advert(public, signature[:63], *ADVERT)
    assert not verify_advert(public, signature, "run-a", 3, 7, ENC[:31], MASK)  # wrong key length


def test_a_survivor_set_signature_binds_run_instance_and_the_exact_set():
    key = new_identity()
    public = identity_public(key)
    signature = sign_survivors(key, "r", 0, {3, 1, 2})
    assert verify_survivors(public, signature, "r", 0, [1, 2, 3])  # order does not matter
    for run, instance, survivors in [
        ("s", 0, {1, 2, 3}),
        ("r", 1, {1, 2, 3}),
        ("r", 0, {1, 2}),
        ("r", 0, {1, 2, 3, 4}),
    ]:
        assert not verify_survivors(public, signature, run, instance, survivors)
    # an advert signature is never a survivor-set signature (different labels)
    assert not survivors_message("r", 0, {1}).startswith(b"fedprune/secagg/v1/signed-key-advert")


def test_the_run_field_is_length_prefixed():
    """("ab", instance) and ("a", ...) with bytes shifted cannot collide: the run carries its length."""
    key = new_identity()
    signature = sign_survivors(key, "ab", 1, {2})
    assert not verify_survivors(identity_public(key), signature, "a", 1, {2})


def test_identity_file_round_trip_is_private_and_atomic(tmp_path):
    key = new_identity()
    path = save_identity(key, tmp_path / "site" / "identity.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert identity_public(load_identity(path)) == identity_public(key)
    assert [p.name for p in path.parent.iterdir()] == ["identity.key"]  # no temporary left behind


def test_bad_identity_files_are_clear_errors(tmp_path):
    with pytest.raises(IdentityError, match="does not exist"):
        load_identity(tmp_path / "missing.key")
    path = save_identity(new_identity(), tmp_path / "open.key")
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_identity(path)
    for name, text, match in [("hex.key", "zz", "not hex"), ("short.key", "ab" * 31, "31 bytes")]:
        bad = tmp_path / name
        bad.write_text(text)
        bad.chmod(0o600)
        with pytest.raises(IdentityError, match=match):
            load_identity(bad)


def test_roster_file_round_trip_and_labelled_form(tmp_path):
    keys = [identity_public(new_identity()) for _ in range(3)]
    path = save_roster(keys, tmp_path / "roster.json")
    assert load_roster(path) == frozenset(keys)
    assert json.loads(path.read_text()) == sorted(k.hex() for k in keys)
    labelled = tmp_path / "labelled.json"
    labelled.write_text(json.dumps({f"site-{i}": k.hex() for i, k in enumerate(keys)}))
    assert load_roster(labelled) == frozenset(keys)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not JSON"),
        ("42", "JSON list of hex keys"),
        ('["zz"]', "not hex"),
        ('["abcd"]', "32-byte"),
        ("[]", "empty"),
    ],
)
def test_bad_roster_files_are_clear_errors(tmp_path, text, match):
    path = tmp_path / "roster.json"
    path.write_text(text)
    with pytest.raises(IdentityError, match=match):
        load_roster(path)


def test_a_roster_listing_an_identity_twice_is_an_error(tmp_path):
    key = identity_public(new_identity()).hex()
    path = tmp_path / "roster.json"
    path.write_text(json.dumps([key, key]))
    with pytest.raises(IdentityError, match="twice"):
        load_roster(path)
    with pytest.raises(IdentityError, match="does not exist"):
        load_roster(tmp_path / "missing.json")


def test_command_line_makes_an_identity_and_a_roster(tmp_path, capsys):
    assert main(["new", str(tmp_path / "a.key")]) == 0
    printed = capsys.readouterr().out.strip()
    assert bytes.fromhex(printed) == identity_public(load_identity(tmp_path / "a.key"))
    assert main(["new", str(tmp_path / "a.key")]) == 2  # never overwrites by accident
    assert "exists" in capsys.readouterr().err
    assert main(["public", str(tmp_path / "a.key")]) == 0
    assert capsys.readouterr().out.strip() == printed
    main(["new", str(tmp_path / "b.key")])
    assert (
        main(["roster", str(tmp_path / "roster.json"), str(tmp_path / "a.key"), str(tmp_path / "b.key")]) == 0
    )
    assert bytes.fromhex(printed) in load_roster(tmp_path / "roster.json")
