"""Throwaway PKI for the lab: a CA and certificates generated fresh for every lab run.

EC P-256 keys via ``cryptography``: fast (a whole PKI in milliseconds) and no openssl CLI needed.
Nothing here is a secret worth keeping; the files live in the lab's scratch directory.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True, slots=True)
class CertFiles:
    cert: Path
    key: Path


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _write_key(key: PrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


class PKI:
    """A CA in ``directory`` that issues server and client certificates: a root, or an
    intermediate CA of ``parent`` (``parent.intermediate(name)``)."""

    def __init__(self, directory: Path, name: str = "tunnelwatch-lab-ca", *,
                 parent: PKI | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._cert: x509.Certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject if parent is None else parent._cert.subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650 if parent is None else 1825))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None if parent is None
                                                 else 0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key if parent is None else parent._key, hashes.SHA256())
        )
        self.ca_file = self.dir / f"{name}.crt"
        self.ca_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._revoked: list[int] = []

    def intermediate(self, name: str) -> PKI:
        """A CA signed by this one (its ``ca_file`` holds only its own certificate)."""
        return PKI(self.dir / name, name, parent=self)

    def issue(self, common_name: str, *, server: bool, days: int = 825,
              expired: bool = False, not_yet_valid: bool = False,
              rsa_bits: int | None = None) -> CertFiles:
        """A certificate signed by the CA: an EC P-256 key, or RSA of ``rsa_bits`` (what RSA
        key transport needs: a server with an EC key cannot offer it at all)."""
        key: PrivateKey = (ec.generate_private_key(ec.SECP256R1()) if rsa_bits is None
                           else rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits))
        now = dt.datetime.now(dt.UTC)
        if expired:
            start, end = now - dt.timedelta(days=30), now - dt.timedelta(days=1)
        elif not_yet_valid:
            start, end = now + dt.timedelta(days=2), now + dt.timedelta(days=days)
        else:
            start, end = now - dt.timedelta(days=1), now + dt.timedelta(days=days)
        eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True,
                                         key_agreement=rsa_bits is None,
                                         key_cert_sign=False, crl_sign=False,
                                         content_commitment=False,
                                         key_encipherment=rsa_bits is not None,
                                         data_encipherment=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        files = CertFiles(self.dir / f"{common_name}.crt", self.dir / f"{common_name}.key")
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, files.key)
        return files

    def revoke(self, files: CertFiles) -> None:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        self._revoked.append(cert.serial_number)

    def write_crl(self) -> Path:
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self._cert.subject)
                   .last_update(now - dt.timedelta(minutes=1))
                   .next_update(now + dt.timedelta(days=30)))
        for serial in self._revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(now - dt.timedelta(minutes=1)).build())
        crl = builder.sign(self._key, hashes.SHA256())
        path = self.dir / "crl.pem"
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return path
