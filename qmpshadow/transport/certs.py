"""Development PKI: a CA and one certificate per agent, for mutual TLS between agents.

Layout of a directory (what :class:`~qmpshadow.transport.tcp.TlsConfig.from_dir` reads)::

    ca.pem  ca.key          the CA (keep ca.key off the agents' hosts in real use)
    NAME.pem  NAME.key      one per agent name, e.g. source, shadow

Keys are ECDSA P-256, unencrypted PKCS#8 PEM, mode 0600. Agent certificates carry the name as
CN and as their only SAN DNS name (the identity peers check), are usable for both TLS client
and server authentication, and are signed by the CA. Good enough for development and tests;
production deployments bring certificates from their own PKI.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qmpshadow.errors import ConfigError

__all__ = ["CertPair", "DevPki", "create_ca", "init_dev_pki", "issue", "load_pair", "parse_names"]

CA_NAME = "ca"
DEFAULT_CA_DAYS = 3650
DEFAULT_DAYS = 825
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


@dataclass(frozen=True, slots=True)
class CertPair:
    """Paths of one certificate and its key."""

    name: str
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class DevPki:
    """What :func:`init_dev_pki` produced: the CA, every agent, and which files are new."""

    directory: Path
    ca: CertPair
    agents: dict[str, CertPair]
    created: tuple[str, ...] = field(default=())
    kept: tuple[str, ...] = field(default=())


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid agent name (lower-case DNS name); ConfigError if not."""
    if len(name) > 253 or not _NAME.match(name):
        raise ConfigError(
            f"agent name {name!r} is not a lower-case DNS name (letters, digits, '-', '.'; "
            "e.g. 'source', 'shadow', 'shadow-2.vm1'): it becomes the certificate's SAN"
        )
    if name == CA_NAME:
        raise ConfigError(f"agent name {name!r} is reserved for the CA's files")
    return name


def parse_names(text: str) -> list[str]:
    """Split ``"source,shadow"`` into checked names; ConfigError for none, bad or duplicate."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"expected comma-separated agent names, e.g. source,shadow; got {text!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"agent names given twice: {', '.join(dup)}")
    return [check_name(n) for n in names]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write ``data`` to a new file of ``mode`` (never briefly readable by others)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        if not overwrite and path.exists():
            raise ConfigError(f"{path} exists; pass overwrite (--force) to replace it")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _save(
    directory: Path,
    name: str,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    overwrite: bool,
) -> CertPair:
    pair = CertPair(name, directory / f"{name}.pem", directory / f"{name}.key")
    _write(pair.key, _key_pem(key), 0o600, overwrite)
    _write(pair.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644, overwrite)
    return pair


def create_ca(
    directory: str | os.PathLike[str],
    *,
    common_name: str = "qmpshadow development CA",
    days: int = DEFAULT_CA_DAYS,
    overwrite: bool = False,
) -> CertPair:
    """Create ``ca.pem`` / ``ca.key`` in ``directory`` (created 0700 if missing).

    Raises ConfigError when they exist and not ``overwrite``, or ``days`` < 1.
    """
    if days < 1:
        raise ConfigError(f"certificate lifetime must be at least 1 day, got {days}")
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qmpshadow"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return _save(d, CA_NAME, cert, key, overwrite)


def load_pair(pair: CertPair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read a certificate and its EC key; ConfigError if unreadable or not a pair."""
    try:
        cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
        key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read {pair.cert} / {pair.key}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or (
        key.public_key().public_numbers() != cert.public_key().public_numbers()  # type: ignore[union-attr]
    ):
        raise ConfigError(f"{pair.key} is not the EC private key of {pair.cert}")
    return cert, key


def issue(
    directory: str | os.PathLike[str],
    name: str,
    *,
    ca: CertPair,
    days: int = DEFAULT_DAYS,
    extra_dns: Iterable[str] = (),
    overwrite: bool = False,
) -> CertPair:
    """Issue ``NAME.pem`` / ``NAME.key`` in ``directory``, signed by ``ca``.

    The certificate's identity is ``name`` (CN and first SAN DNS name); ``extra_dns`` adds
    SAN DNS names. Raises ConfigError for an invalid name, unreadable CA, existing files
    without ``overwrite``, or ``days`` < 1.
    """
    check_name(name)
    extras = [check_name(n) for n in extra_dns]
    if days < 1:
        raise ConfigError(f"certificate lifetime must be at least 1 day, got {days}")
    ca_cert, ca_key = load_pair(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qmpshadow"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in (name, *extras)]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _save(Path(directory), name, cert, key, overwrite)


def init_dev_pki(
    directory: str | os.PathLike[str],
    names: Sequence[str],
    *,
    days: int = DEFAULT_DAYS,
    overwrite: bool = False,
) -> DevPki:
    """Make ``directory`` hold a CA and a certificate for each of ``names``.

    Idempotent: an existing CA is reused and existing agent files are kept, unless
    ``overwrite`` (then everything is created anew, which invalidates the old certificates).
    Raises ConfigError for invalid names, a half-present pair (cert without key or the
    reverse), or unreadable files.
    """
    checked = [check_name(n) for n in names]
    if not checked:
        raise ConfigError("give at least one agent name, e.g. source,shadow")
    d = Path(directory)
    created: list[str] = []
    kept: list[str] = []

    def present(name: str) -> bool:
        cert, key = d / f"{name}.pem", d / f"{name}.key"
        if cert.exists() != key.exists():
            have, missing = (cert, key) if cert.exists() else (key, cert)
            raise ConfigError(
                f"{have} exists but {missing} does not: remove {have} or pass --force"
            )
        return cert.exists()

    ca = CertPair(CA_NAME, d / "ca.pem", d / "ca.key")
    if present(CA_NAME) and not overwrite:
        load_pair(ca)
        kept.append(CA_NAME)
    else:
        ca = create_ca(d, overwrite=overwrite)
        created.append(CA_NAME)
    agents: dict[str, CertPair] = {}
    for name in checked:
        if present(name) and not overwrite and CA_NAME not in created:
            agents[name] = CertPair(name, d / f"{name}.pem", d / f"{name}.key")
            kept.append(name)
        else:
            agents[name] = issue(d, name, ca=ca, days=days, overwrite=True)
            created.append(name)
    return DevPki(directory=d, ca=ca, agents=agents, created=tuple(created), kept=tuple(kept))
