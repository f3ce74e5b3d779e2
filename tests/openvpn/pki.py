"""Throwaway PKI for OpenVPN tests, generated at run time (never committed)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    serial: int


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


class ScratchPki:
    def __init__(self, directory: Path, cn: str = "tw-test-ca") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self._ca_cert = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(self._ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(self._ca_key, hashes.SHA256()))
        self.ca_file = self.dir / f"{cn}.crt"
        self.ca_file.write_bytes(self._ca_cert.public_bytes(serialization.Encoding.PEM))
        self._revoked: list[int] = []

    def issue(self, cn: str, eku: x509.ObjectIdentifier | None, *, days: float = 825,
              expired: bool = False) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        start, end = ((now - dt.timedelta(days=30), now - dt.timedelta(days=1)) if expired
                      else (now - dt.timedelta(hours=1), now + dt.timedelta(days=days)))
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self._ca_cert.subject)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False,
                                         False), critical=True))
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        out = Issued(self.dir / f"{cn}.crt", self.dir / f"{cn}.key", serial)
        out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(out.key, key)
        return out

    def server(self, cn: str = "server", **kw: object) -> Issued:
        return self.issue(cn, ExtendedKeyUsageOID.SERVER_AUTH, **kw)  # type: ignore[arg-type]

    def client(self, cn: str = "client") -> Issued:
        return self.issue(cn, ExtendedKeyUsageOID.CLIENT_AUTH)

    def crl(self, revoked: list[Issued]) -> Path:
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self._ca_cert.subject)
                   .last_update(now - dt.timedelta(hours=1))
                   .next_update(now + dt.timedelta(days=30)))
        for item in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(item.serial)
                .revocation_date(now - dt.timedelta(minutes=5)).build())
        path = self.dir / "crl.pem"
        path.write_bytes(builder.sign(self._ca_key, hashes.SHA256())
                         .public_bytes(serialization.Encoding.PEM))
        return path


def static_key_text(key: bytes) -> str:
    """An ``OpenVPN Static key V1`` file body for 256 bytes of key."""
    lines = [key[i:i + 16].hex() for i in range(0, len(key), 16)]
    return ("#\n# 2048 bit OpenVPN static key\n#\n-----BEGIN OpenVPN Static key V1-----\n"
            + "\n".join(lines) + "\n-----END OpenVPN Static key V1-----\n")
