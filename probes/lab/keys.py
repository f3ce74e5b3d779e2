"""WireGuard key pairs for the lab, generated in-process (no ``wg genkey`` fork per key)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey


@dataclass(frozen=True, slots=True)
class WgKeyPair:
    private: str  # base64, as wg(8) prints it
    public: str

    def write_private(self, path: Path) -> Path:
        path.write_text(self.private + "\n")
        path.chmod(0o600)
        return path


def wg_keypair() -> WgKeyPair:
    key = X25519PrivateKey.generate()
    raw_priv = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
    raw_pub = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
    return WgKeyPair(base64.b64encode(raw_priv).decode(), base64.b64encode(raw_pub).decode())


def wg_psk() -> str:
    import os  # noqa: PLC0415

    return base64.b64encode(os.urandom(32)).decode()
