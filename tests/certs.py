"""Throw-away PKI for the TLS tests: CAs and certificates written as PEM files per session.

Nothing here is committed: every key is generated when the tests start.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID_FOR = datetime.timedelta(days=2)
_CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class Pair:
    """A certificate and its key, as PEM files."""

    cert: str
    key: str


@dataclass(frozen=True)
class Pki:
    ca: str  # the CA that signed ``server``, ``renamed_server`` and ``client``
    server: Pair  # for localhost and 127.0.0.1
    renamed_server: Pair  # for pagedserve.internal only: dialled as 127.0.0.1, it needs an override
    client: Pair
    other_ca: str  # an unrelated CA
    stranger: Pair  # a client certificate signed by ``other_ca``
    wrong_key: str  # a key that belongs to none of the certificates
    encrypted_key: str  # the server's key under a password
    not_pem: str  # a file that is neither a certificate nor a key


RENAMED_SERVER = "pagedserve.internal"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> str:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password is not None
        else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    return str(path)


def _write_cert(path: Path, cert: x509.Certificate) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _builder(subject: str, issuer: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + _VALID_FOR)
    )


def _ca(out: Path, name: str) -> tuple[str, ec.EllipticCurvePrivateKey]:
    key = _key()
    cert = (
        _builder(name, name, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return _write_cert(out / f"{name}.pem", cert), key


def _leaf(
    out: Path,
    name: str,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    usage: x509.ObjectIdentifier,
) -> tuple[Pair, ec.EllipticCurvePrivateKey]:
    key = _key()
    builder = _builder(name, issuer, key).add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True
    ).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    pair = Pair(_write_cert(out / f"{name}.pem", cert), _write_key(out / f"{name}.key", key))
    return pair, key


def make_pki(out: Path) -> Pki:
    out.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca(out, "test-ca")
    other_ca, other_key = _ca(out, "other-ca")
    server_usage = ExtendedKeyUsageOID.SERVER_AUTH
    client_usage = ExtendedKeyUsageOID.CLIENT_AUTH
    server, server_key = _leaf(
        out, "server", "test-ca", ca_key, dns=("localhost",), ips=("127.0.0.1", "::1"),
        usage=server_usage,
    )
    renamed, _ = _leaf(
        out, "renamed-server", "test-ca", ca_key, dns=(RENAMED_SERVER,), usage=server_usage
    )
    client, _ = _leaf(out, "client", "test-ca", ca_key, usage=client_usage)
    stranger, _ = _leaf(out, "stranger", "other-ca", other_key, usage=client_usage)
    wrong_key = _write_key(out / "wrong.key", _key())
    encrypted = _write_key(out / "encrypted.key", server_key, password=b"secret")
    not_pem = out / "not-pem.txt"
    not_pem.write_text("this is not a PEM file\n")
    return Pki(ca, server, renamed, client, other_ca, stranger, wrong_key, encrypted, str(not_pem))
