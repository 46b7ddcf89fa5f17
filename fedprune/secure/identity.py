"""Long-term site identities (Ed25519) that authenticate secure-aggregation messages.

Each site holds one Ed25519 private key (its *identity*, never sent anywhere). The *roster* is the
pinned set of every site's identity public key: public, the same file at every site and at the server.
A site signs its key advert of every protocol instance and, in the consistency round, the survivor set
it was told; its neighbours and the server check those signatures against the roster, so whoever routes
the messages can neither substitute its own keys for a site's nor show different sites different
survivor sets without being caught (Bonawitz et al. 2017, the malicious-server variant).

Signed bytes are an unambiguous encoding: a domain-separation label naming the message kind, then
length-prefixed or fixed-length fields (see :func:`advert_message`, :func:`survivors_message`).

Files: an identity is the hex of its 32 raw private bytes (mode 0600, written atomically); a roster is
JSON, a list of hex public keys or an object ``{label: hex public key}`` (labels are for people).
``python -m fedprune.secure.identity new PATH`` makes an identity and prints its public key;
``python -m fedprune.secure.identity roster OUT KEY...`` writes the roster of identity files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import struct
import sys
import tempfile
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

logger = logging.getLogger(__name__)

IDENTITY_BYTES = 32  # raw Ed25519 public and private keys
SIGNATURE_BYTES = 64
_LABEL = b"fedprune/secagg/v1/"
ADVERT_LABEL = _LABEL + b"signed-key-advert\x00"
SURVIVORS_LABEL = _LABEL + b"signed-survivor-set\x00"
_X25519_BYTES = 32

Roster = frozenset[bytes]


class IdentityError(ValueError):
    """An identity or roster file is missing or malformed."""


def new_identity() -> Ed25519PrivateKey:
    """A fresh identity (OS randomness)."""
    return Ed25519PrivateKey.generate()


def identity_public(identity: Ed25519PrivateKey) -> bytes:
    """The 32-byte raw public key of an identity (its entry in the roster)."""
    return identity.public_key().public_bytes_raw()


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` atomically to ``path``, readable by this user only (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")  # mkstemp creates it 0600
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_identity(identity: Ed25519PrivateKey, path: str | os.PathLike) -> Path:
    """Write the identity's private key (hex) to ``path`` atomically with mode 0600."""
    path = Path(path)
    _write_private(path, identity.private_bytes_raw().hex() + "\n")
    return path


def load_identity(path: str | os.PathLike) -> Ed25519PrivateKey:
    """Read an identity written by :func:`save_identity` (``IdentityError`` if missing, malformed or
    readable by other users)."""
    path = Path(path)
    if not path.is_file():
        raise IdentityError(f"identity file {path} does not exist")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(f"identity file {path} is accessible by other users; chmod 600 it")
    try:
        raw = bytes.fromhex(path.read_text().strip())
    except ValueError as error:
        raise IdentityError(f"identity file {path} is not hex") from error
    if len(raw) != IDENTITY_BYTES:
        raise IdentityError(f"identity file {path} holds {len(raw)} bytes, expected {IDENTITY_BYTES}")
    return Ed25519PrivateKey.from_private_bytes(raw)


def check_roster(keys: Iterable[bytes]) -> Roster:
    """A roster from public keys: each 32 bytes, a valid Ed25519 point, no repeats, at least one."""
    keys = list(keys)
    for key in keys:
        if not isinstance(key, bytes) or len(key) != IDENTITY_BYTES:
            raise IdentityError(f"roster entries must be {IDENTITY_BYTES}-byte public keys, got {key!r}")
        try:
            Ed25519PublicKey.from_public_bytes(key)
        except ValueError as error:
            raise IdentityError(f"roster entry {key.hex()} is not an Ed25519 public key") from error
    if len(set(keys)) != len(keys):
        raise IdentityError("roster lists an identity twice")
    if not keys:
        raise IdentityError("roster is empty")
    return frozenset(keys)


def save_roster(keys: Collection[bytes], path: str | os.PathLike) -> Path:
    """Write the roster as a JSON list of hex public keys (sorted), atomically."""
    path = Path(path)
    roster = check_roster(keys)
    _write_private(path, json.dumps(sorted(k.hex() for k in roster), indent=1) + "\n")
    path.chmod(0o644)  # public
    return path


def _roster_entries(data: object, path: Path) -> list[str]:
    if isinstance(data, dict):
        data = list(data.values())
    if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
        raise IdentityError(f"roster {path} must be a JSON list of hex keys or an object label -> hex key")
    return data


def load_roster(path: str | os.PathLike) -> Roster:
    """Read a roster (``IdentityError`` on a missing file, bad JSON, bad or repeated keys)."""
    path = Path(path)
    if not path.is_file():
        raise IdentityError(f"roster file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise IdentityError(f"roster {path} is not JSON: {error}") from error
    entries = _roster_entries(data, path)
    try:
        keys = [bytes.fromhex(v) for v in entries]
    except ValueError as error:
        raise IdentityError(f"roster {path} holds a key that is not hex") from error
    try:
        return check_roster(keys)
    except IdentityError as error:
        raise IdentityError(f"roster {path}: {error}") from error


def _field(data: bytes) -> bytes:
    """A variable-length field: its 4-byte big-endian length, then the bytes."""
    return struct.pack(">I", len(data)) + data


def _context(run: str, instance: int) -> bytes:
    """The run (UTF-8, length-prefixed) and the instance (8 bytes): where a signature is valid."""
    return _field(run.encode()) + struct.pack(">Q", instance)


def advert_message(run: str, instance: int, client_id: int, enc_public: bytes, mask_public: bytes) -> bytes:
    """The bytes a site signs for its key advert: label, run, instance, client id, both 32-byte keys."""
    for key in (enc_public, mask_public):
        if not isinstance(key, bytes) or len(key) != _X25519_BYTES:
            raise ValueError(f"advert public keys must be {_X25519_BYTES} bytes")
    return ADVERT_LABEL + _context(run, instance) + struct.pack(">Q", client_id) + enc_public + mask_public


def survivors_message(run: str, instance: int, survivors: Collection[int]) -> bytes:
    """The bytes a survivor signs in the consistency round: label, run, instance, count, sorted ids."""
    ids = sorted(int(v) for v in survivors)
    return SURVIVORS_LABEL + _context(run, instance) + struct.pack(f">Q{len(ids)}Q", len(ids), *ids)


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """True iff ``signature`` is ``public``'s valid Ed25519 signature of ``message``."""
    if not isinstance(public, bytes) or len(public) != IDENTITY_BYTES:
        return False
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def sign_advert(
    identity: Ed25519PrivateKey,
    run: str,
    instance: int,
    client_id: int,
    enc_public: bytes,
    mask_public: bytes,
) -> bytes:
    """The identity's signature of a key advert (64 bytes)."""
    return identity.sign(advert_message(run, instance, client_id, enc_public, mask_public))


def verify_advert(
    public: bytes,
    signature: bytes,
    run: str,
    instance: int,
    client_id: int,
    enc_public: bytes,
    mask_public: bytes,
) -> bool:
    """True iff ``signature`` is ``public``'s signature of this advert."""
    try:
        message = advert_message(run, instance, client_id, enc_public, mask_public)
    except ValueError:
        return False
    return verify(public, signature, message)


def sign_survivors(identity: Ed25519PrivateKey, run: str, instance: int, survivors: Collection[int]) -> bytes:
    """The identity's signature of a survivor set (64 bytes)."""
    return identity.sign(survivors_message(run, instance, survivors))


def verify_survivors(
    public: bytes, signature: bytes, run: str, instance: int, survivors: Collection[int]
) -> bool:
    """True iff ``signature`` is ``public``'s signature of exactly this survivor set."""
    return verify(public, signature, survivors_message(run, instance, survivors))


def _new(args: argparse.Namespace) -> None:
    path = Path(args.path)
    if path.exists() and not args.force:
        raise IdentityError(f"{path} exists; pass --force to replace it")
    identity = new_identity()
    save_identity(identity, path)
    print(identity_public(identity).hex())


def _public(args: argparse.Namespace) -> None:
    print(identity_public(load_identity(args.path)).hex())


def _roster(args: argparse.Namespace) -> None:
    save_roster([identity_public(load_identity(p)) for p in args.identities], args.out)
    print(args.out)


def main(argv: Sequence[str] | None = None) -> int:
    """``new PATH`` (make an identity, print its public key), ``public PATH``, ``roster OUT KEY...``."""
    parser = argparse.ArgumentParser(
        prog="python -m fedprune.secure.identity", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="make a site identity (mode 0600) and print its public key")
    new.add_argument("path")
    new.add_argument("--force", action="store_true", help="replace an existing file")
    new.set_defaults(run=_new)
    public = commands.add_parser("public", help="print the public key of an identity (its roster entry)")
    public.add_argument("path")
    public.set_defaults(run=_public)
    roster = commands.add_parser("roster", help="write the roster of identity files")
    roster.add_argument("out")
    roster.add_argument("identities", nargs="+")
    roster.set_defaults(run=_roster)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except IdentityError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
