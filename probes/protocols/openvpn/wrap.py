"""Control-channel wrapping: none, ``--tls-auth``, ``--tls-crypt`` and ``--tls-crypt-v2``.

Every wrapper keeps ``op│sid`` in the clear and protects the *body* (acks, message id, payload).
The replay packet-id (``pid u32│time u32``) is the wrapper's own counter, separate from the
reliability layer's message id: it starts at 1 and its time is fixed at first use (packet_id.c).

Key layout (256-byte static key): ``keys[0]`` = cipher ``[0:64]`` + hmac ``[64:128]``,
``keys[1]`` = cipher ``[128:192]`` + hmac ``[192:256]``. A client sends with ``keys[1]``
(KEY_DIRECTION_INVERSE); with no key direction both sides use ``keys[0]``'s hmac.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from probes.protocols.openvpn.packet import HEADER_LEN, Opcode, OpenVPNError, parse_header

STATIC_KEY_LEN = 256
# tls-crypt-v2 client: replay ids in this range ask for early negotiation
EARLY_NEG_START = 0x0F000000
TLS_CRYPT_TAG_LEN = 32
REPLAY_ID_LEN = 8  # pid u32 + time u32

_STATIC_RE = re.compile(
    r"-----BEGIN OpenVPN Static key V1-----(.*?)-----END OpenVPN Static key V1-----", re.S)
_V2_CLIENT_RE = re.compile(
    r"-----BEGIN OpenVPN tls-crypt-v2 client key-----(.*?)"
    r"-----END OpenVPN tls-crypt-v2 client key-----", re.S)

DIGEST_SIZES = {"SHA1": 20, "SHA224": 28, "SHA256": 32, "SHA384": 48, "SHA512": 64, "MD5": 16}


def parse_static_key(text: str) -> bytes:
    """The 256 bytes of an ``OpenVPN Static key V1`` file (tls-auth / tls-crypt)."""
    match = _STATIC_RE.search(text)
    if match is None:
        raise OpenVPNError("no 'OpenVPN Static key V1' block")
    hex_text = "".join(match.group(1).split())
    try:
        key = bytes.fromhex(hex_text)
    except ValueError:
        raise OpenVPNError("static key is not hex") from None
    if len(key) != STATIC_KEY_LEN:
        raise OpenVPNError(f"static key has {len(key)} bytes, expected {STATIC_KEY_LEN}")
    return key


def parse_tls_crypt_v2_client_key(text: str) -> tuple[bytes, bytes]:
    """``(Kc, WKc)`` from an ``OpenVPN tls-crypt-v2 client key`` PEM block."""
    match = _V2_CLIENT_RE.search(text)
    if match is None:
        raise OpenVPNError("no 'OpenVPN tls-crypt-v2 client key' block")
    try:
        raw = base64.b64decode("".join(match.group(1).split()), validate=True)
    except (binascii.Error, ValueError):
        raise OpenVPNError("tls-crypt-v2 client key is not base64") from None
    kc, wkc = raw[:STATIC_KEY_LEN], raw[STATIC_KEY_LEN:]
    if len(kc) != STATIC_KEY_LEN or len(wkc) < TLS_CRYPT_TAG_LEN + 2:
        raise OpenVPNError("tls-crypt-v2 client key too short")
    (declared,) = struct.unpack("!H", wkc[-2:])
    if declared != len(wkc):
        raise OpenVPNError(f"WKc length field {declared} != {len(wkc)}")
    return kc, wkc


def _aes_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    ctx = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return ctx.update(data) + ctx.finalize()


@dataclass(slots=True)
class ReplayCounter:
    """The wrapper's replay packet-id: ``pid`` increments per packet, ``time`` is fixed."""

    time: int
    next_id: int = 1

    def take(self) -> bytes:
        value = self.next_id
        self.next_id = (self.next_id + 1) & 0xFFFFFFFF
        return struct.pack("!II", value, self.time & 0xFFFFFFFF)


class Wrapper(Protocol):
    """What the session needs from a wrapping mode."""

    @property
    def overhead(self) -> int:
        """Bytes a wrapped packet adds to ``op│sid│body`` (WKc included where it is sent)."""
        ...

    def wrap(self, header: bytes, body: bytes) -> bytes: ...

    def unwrap(self, packet: bytes) -> tuple[Opcode, int, bytes, bytes]:
        """``(opcode, key_id, session_id, body)``; raises :class:`OpenVPNError` if not authentic."""
        ...


class NoWrap:
    overhead = 0

    def wrap(self, header: bytes, body: bytes) -> bytes:
        return header + body

    def unwrap(self, packet: bytes) -> tuple[Opcode, int, bytes, bytes]:
        opcode, key_id, sid = parse_header(packet)
        return opcode, key_id, sid, bytes(packet[HEADER_LEN:])


@dataclass(slots=True)
class TlsAuth:
    """``op│sid│HMAC│pid│time│body`` with HMAC over ``pid│time│op│sid│body`` (swap_hmac)."""

    key: bytes
    replay: ReplayCounter
    digest: str = "SHA1"
    key_direction: int | None = None
    server: bool = False  # True only for test peers: flips the key direction
    _out: bytes = field(init=False, default=b"")
    _in: bytes = field(init=False, default=b"")

    def __post_init__(self) -> None:
        if len(self.key) != STATIC_KEY_LEN:
            raise OpenVPNError("tls-auth key must be 256 bytes")
        name = self.digest.upper().replace("-", "")
        if name not in DIGEST_SIZES:
            raise OpenVPNError(f"unsupported --auth digest {self.digest!r}")
        self.digest = name
        size = DIGEST_SIZES[name]
        k0, k1 = self.key[64:64 + size], self.key[192:192 + size]
        if self.key_direction is None:
            self._out = self._in = k0
        else:
            if self.key_direction not in (0, 1):
                raise OpenVPNError("key-direction must be 0 or 1")
            # direction 1 sends with keys[1]; the server side of that pair is direction 0
            sends_k1 = (self.key_direction == 1) != self.server
            self._out, self._in = (k1, k0) if sends_k1 else (k0, k1)

    @property
    def overhead(self) -> int:
        return DIGEST_SIZES[self.digest] + REPLAY_ID_LEN

    def _mac(self, key: bytes, replay_id: bytes, header: bytes, body: bytes) -> bytes:
        return hmac.new(key, replay_id + header + body, self.digest.lower()).digest()

    def wrap(self, header: bytes, body: bytes) -> bytes:
        replay_id = self.replay.take()
        return header + self._mac(self._out, replay_id, header, body) + replay_id + body

    def unwrap(self, packet: bytes) -> tuple[Opcode, int, bytes, bytes]:
        opcode, key_id, sid = parse_header(packet)
        size = DIGEST_SIZES[self.digest]
        rest = packet[HEADER_LEN:]
        if len(rest) < size + REPLAY_ID_LEN:
            raise OpenVPNError("tls-auth packet too short")
        tag, replay_id, body = rest[:size], rest[size:size + REPLAY_ID_LEN], rest[size + 8:]
        expected = self._mac(self._in, bytes(replay_id), bytes(packet[:HEADER_LEN]), bytes(body))
        if not hmac.compare_digest(tag, expected):
            raise OpenVPNError("tls-auth HMAC mismatch")
        return opcode, key_id, sid, bytes(body)


@dataclass(slots=True)
class TlsCrypt:
    """``op│sid│pid│time│tag32│AES-256-CTR(body)``, tag = HMAC-SHA256(Ka, ``op│sid│pid│time│body``),
    IV = tag[:16] (tls_crypt.c)."""

    key: bytes
    replay: ReplayCounter
    server: bool = False
    _enc_out: bytes = field(init=False, default=b"")
    _mac_out: bytes = field(init=False, default=b"")
    _enc_in: bytes = field(init=False, default=b"")
    _mac_in: bytes = field(init=False, default=b"")

    def __post_init__(self) -> None:
        if len(self.key) != STATIC_KEY_LEN:
            raise OpenVPNError("tls-crypt key must be 256 bytes")
        k0 = (self.key[0:32], self.key[64:96])
        k1 = (self.key[128:160], self.key[192:224])
        (self._enc_out, self._mac_out), (self._enc_in, self._mac_in) = (
            (k0, k1) if self.server else (k1, k0))

    @property
    def overhead(self) -> int:
        return REPLAY_ID_LEN + TLS_CRYPT_TAG_LEN

    def wrap(self, header: bytes, body: bytes) -> bytes:
        replay_id = self.replay.take()
        tag = hmac.new(self._mac_out, header + replay_id + body, hashlib.sha256).digest()
        return header + replay_id + tag + _aes_ctr(self._enc_out, tag[:16], body)

    def unwrap(self, packet: bytes) -> tuple[Opcode, int, bytes, bytes]:
        opcode, key_id, sid = parse_header(packet)
        clear_len = HEADER_LEN + REPLAY_ID_LEN
        if len(packet) < clear_len + TLS_CRYPT_TAG_LEN:
            raise OpenVPNError("tls-crypt packet too short")
        tag = bytes(packet[clear_len:clear_len + TLS_CRYPT_TAG_LEN])
        body = _aes_ctr(self._enc_in, tag[:16], bytes(packet[clear_len + TLS_CRYPT_TAG_LEN:]))
        expected = hmac.new(self._mac_in, bytes(packet[:clear_len]) + body,
                            hashlib.sha256).digest()
        if not hmac.compare_digest(tag, expected):
            raise OpenVPNError("tls-crypt authentication failed")
        return opcode, key_id, sid, body


@dataclass(slots=True)
class TlsCryptV2:
    """tls-crypt with the client's own key Kc; the wrapped client key WKc rides in the clear
    after the hard reset (V3) and after CONTROL_WKC_V1 packets (doc/tls-crypt-v2.txt)."""

    client_key: bytes
    wrapped_client_key: bytes
    replay: ReplayCounter
    early_negotiation: bool = True
    _inner: TlsCrypt = field(init=False)

    def __post_init__(self) -> None:
        self._inner = TlsCrypt(self.client_key, self.replay)
        if self.early_negotiation and self.replay.next_id < EARLY_NEG_START:
            # the replay id of the V3 reset doubles as "I can do early negotiation" (ssl.c)
            self.replay.next_id = EARLY_NEG_START | self.replay.next_id

    @property
    def overhead(self) -> int:
        return self._inner.overhead + len(self.wrapped_client_key)

    def wrap(self, header: bytes, body: bytes) -> bytes:
        out = self._inner.wrap(header, body)
        if header[0] >> 3 in (Opcode.CONTROL_HARD_RESET_CLIENT_V3, Opcode.CONTROL_WKC_V1):
            out += self.wrapped_client_key
        return out

    def unwrap(self, packet: bytes) -> tuple[Opcode, int, bytes, bytes]:
        return self._inner.unwrap(packet)
