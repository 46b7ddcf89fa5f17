"""Keys and certificates for a secured Flower deployment of fedprune (flwr 1.42), made with `cryptography`.

    python scripts/make_deployment_keys.py OUT_DIR [--hosts coordinator.example.org 10.0.0.5] [--sites 3]

writes into OUT_DIR:

- ``ca.crt``, ``ca.key``: a CA (keep ``ca.key`` offline; give ``ca.crt`` to every site and to `flwr`);
- ``server.crt``, ``server.key``: the SuperLink's TLS certificate, signed by the CA, valid for ``--hosts``
  (default ``127.0.0.1 localhost``) -> ``flower-superlink --ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``;
- ``site<i>``, ``site<i>.pub``: SuperNode authentication keys (EC P-384, OpenSSH format). In a real
  deployment each site makes its own pair (``--sites 0`` here, ``ssh-keygen -t ecdsa -b 384 -N ''``, or
  this script on the site) and sends only ``site<i>.pub`` to the coordinator, who registers it with
  ``flwr supernode register site<i>.pub``; the site starts ``flower-supernode
  --auth-supernode-private-key site<i>``.

Private keys are written unencrypted with mode 0600.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 30


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedprune"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(
    out: Path, common_name: str = "fedprune deployment CA"
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate and its key: ``out/ca.crt``, ``out/ca.key``."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", _pem_key(key), private=True)
    return cert, key


def make_server_cert(
    out: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str]
) -> None:
    """The SuperLink's certificate for ``hosts`` (IP addresses or DNS names): ``out/server.crt``, ``.key``."""
    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / "server.crt", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", _pem_key(key), private=True)


def make_site_key(out: Path, name: str) -> Path:
    """A SuperNode authentication key pair (EC P-384, OpenSSH): ``out/<name>`` and ``out/<name>.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(out / name, private, private=True)
    _write(out / f"{name}.pub", public + f" {name}\n".encode())
    return out / name


def make_all(out: Path, hosts: list[str], sites: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca(out)
    make_server_cert(out, ca_cert, ca_key, hosts)
    for site in range(sites):
        make_site_key(out, f"site{site}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="folder for the keys and certificates")
    parser.add_argument(
        "--hosts", nargs="+", default=["127.0.0.1", "localhost"], help="SuperLink's names/IPs"
    )
    parser.add_argument(
        "--sites", type=int, default=2, help="SuperNode key pairs to make (site0, site1, ...)"
    )
    args = parser.parse_args(argv)
    make_all(args.out, args.hosts, args.sites)
    print(
        f"wrote the CA, the SuperLink certificate for {' '.join(args.hosts)} and {args.sites} site key(s) to {args.out}"
    )


if __name__ == "__main__":
    main()
