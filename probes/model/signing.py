"""Request signing between agents and the mesh: one module, imported by both sides.

An agent POSTs a JSON :class:`probes.model.ObservationBatch` with four headers::

    X-Tunnelwatch-Agent:     <agent name, equal to batch.agent and every observation.vantage>
    X-Tunnelwatch-Key-Id:    <key id the mesh knows this agent's key under>
    X-Tunnelwatch-Timestamp: <Unix seconds, decimal ASCII, e.g. "1764134400" or "1764134400.25">
    X-Tunnelwatch-Signature: <hex HMAC-SHA256(key, timestamp + "." + body)>

The signed message is the timestamp header value exactly as sent, one ASCII dot, and the raw
request body bytes. The mesh rejects a timestamp outside its window (default +-300 s) and a
batch whose ``(epoch, batch_seq)`` is not above the last one it accepted from that agent, so a
captured request cannot be replayed. The epoch is the agent instance's (see
:class:`probes.model.ObservationBatch`): an agent that lost its state directory starts a newer
epoch and is heard at once, because only the holder of the key can sign one.

A key file holds the shared secret as text (e.g. 64 hex characters from :func:`generate_key`);
the key is the file's content with surrounding whitespace stripped, used as bytes verbatim.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
from pathlib import Path

HEADER_AGENT = "X-Tunnelwatch-Agent"
HEADER_KEY_ID = "X-Tunnelwatch-Key-Id"
HEADER_TIMESTAMP = "X-Tunnelwatch-Timestamp"
HEADER_SIGNATURE = "X-Tunnelwatch-Signature"

MIN_KEY_BYTES = 32  # a key or token shorter than 256 bits of hex/base64 is guessable
SECRET_MODE = 0o600  # what key and token files are written with
_OPEN_BITS = 0o066  # read or write for the group or for others: refused
_DIGITS = frozenset("0123456789.")


class KeyFileError(ValueError):
    """A key or token file is missing, unreadable, open to others, empty or too short. The
    message is one line naming the file and what to do."""


def generate_key() -> str:
    """A fresh random key (256 bits, hex) for a key file."""
    return secrets.token_hex(32)


def load_key(path: str | Path) -> bytes:
    """Read a key (or token) file: its stripped content, as bytes. Refused (:class:`KeyFileError`)
    when the group or others may read or write it, or when it holds fewer than
    :data:`MIN_KEY_BYTES` bytes: an empty operator token once made the admin API answer 401
    forever, and a 5-byte key passed `check-config`."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        key = path.read_bytes().strip()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    if mode & _OPEN_BITS:
        raise KeyFileError(f"key file {path} is open to the group or others (mode "
                           f"{mode & 0o777:04o}): chmod 600 {path}")
    if len(key) < MIN_KEY_BYTES:
        raise KeyFileError(f"key file {path} holds {len(key)} bytes; at least {MIN_KEY_BYTES} "
                           "needed (tunnelwatch keygen secret FILE makes one)")
    return key


def key_file_problem(path: str | Path) -> str | None:
    """What :func:`load_key` would refuse about ``path``, as one line; None when it is fine."""
    try:
        load_key(path)
    except KeyFileError as exc:
        return str(exc)
    return None


def write_key_file(path: str | Path, secret: str | bytes) -> Path:
    """Write a key or token file only its owner can read (mode 600, also when it existed)."""
    path = Path(path)
    data = secret.encode() if isinstance(secret, str) else secret
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SECRET_MODE)
    try:
        os.fchmod(fd, SECRET_MODE)
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


def format_timestamp(now: float) -> str:
    """The timestamp header for wall-clock time ``now`` (millisecond resolution)."""
    return f"{now:.3f}"


def sign(key: bytes, timestamp: str, body: bytes) -> str:
    """Hex HMAC-SHA256 over ``timestamp + "." + body``."""
    return hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


def verify(key: bytes, timestamp: str, body: bytes, signature: str) -> bool:
    """Constant-time check of a signature made by :func:`sign`."""
    if not (timestamp.isascii() and signature.isascii()):
        return False  # compare_digest refuses non-ASCII str; a hex signature never is
    expected = sign(key, timestamp, body)
    return hmac.compare_digest(expected, signature.strip().lower())


def parse_timestamp(timestamp: str) -> float | None:
    """The header's Unix seconds, or ``None`` when it is not a plain decimal number."""
    if not timestamp or not set(timestamp) <= _DIGITS or timestamp.count(".") > 1:
        return None
    try:
        value = float(timestamp)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def timestamp_fresh(timestamp: str, now: float, window_seconds: float) -> bool:
    """True when the header's time is within ``window_seconds`` of ``now`` (either side)."""
    value = parse_timestamp(timestamp)
    return value is not None and abs(now - value) <= window_seconds


def signed_headers(agent: str, key_id: str, key: bytes, body: bytes, now: float) -> dict[str, str]:
    """Every header an agent sends with ``body`` (plus Content-Type)."""
    timestamp = format_timestamp(now)
    return {
        "Content-Type": "application/json",
        HEADER_AGENT: agent,
        HEADER_KEY_ID: key_id,
        HEADER_TIMESTAMP: timestamp,
        HEADER_SIGNATURE: sign(key, timestamp, body),
    }
