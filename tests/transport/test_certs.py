"""Development PKI and the ``qmpshadow certs init`` command."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qmpshadow.cli.main import main
from qmpshadow.errors import ConfigError
from qmpshadow.transport.certs import init_dev_pki, parse_names


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_dev_pki(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki = init_dev_pki(d, ["source", "shadow"])
    assert pki.created == ("ca", "source", "shadow") and pki.kept == ()
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    ca = _cert(d / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in ("source", "shadow"):
        assert stat.S_IMODE(os.stat(d / f"{name}.key").st_mode) == 0o600
        cert = _cert(d / f"{name}.pem")
        assert cert.issuer == ca.subject
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [name]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        cert.verify_directly_issued_by(ca)
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    # Idempotent: a second run keeps everything; a new name is added under the same CA.
    again = init_dev_pki(d, ["source", "shadow", "shadow-2"])
    assert again.kept == ("ca", "source", "shadow") and again.created == ("shadow-2",)
    assert _cert(d / "ca.pem") == ca
    _cert(d / "shadow-2.pem").verify_directly_issued_by(ca)
    # --force: a new CA, everything reissued.
    forced = init_dev_pki(d, ["source"], overwrite=True)
    assert forced.created == ("ca", "source")
    assert _cert(d / "ca.pem") != ca


def test_names_are_checked(tmp_path: Path) -> None:
    assert parse_names(" source, shadow ") == ["source", "shadow"]
    for bad in ("", ",", "Source", "a/b", "ca", "x,x", "-lead", "under_score", "a" * 64):
        with pytest.raises(ConfigError):
            parse_names(bad)
    (tmp_path / "source.pem").write_text("orphan")
    with pytest.raises(ConfigError, match=r"source\.key does not"):
        init_dev_pki(tmp_path, ["source"])


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "certs"
    assert main(["certs", "init", str(d), "--names", "source,shadow"]) == 0
    out = capsys.readouterr().out
    assert out.count("created") == 3 and str(d / "shadow.key") in out
    assert main(["certs", "init", str(d), "--names", "source"]) == 0
    assert capsys.readouterr().out.count("kept") == 2
    assert main(["certs", "init", str(d), "--names", "Bad/Name"]) == 2
    assert "not a lower-case DNS name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["certs", "init", str(d)])  # --names is required
