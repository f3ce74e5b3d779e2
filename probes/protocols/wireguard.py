"""Sans-I/O WireGuard initiator: Noise_IKpsk2 handshake, cookies, transport data.

No sockets, no asyncio. The caller passes bytes and time in and takes bytes and events out, with
the verbs every core has (:mod:`probes.protocols.core`)::

    conn = WireGuardInitiator(config, remote=server, retry_interval=0.25)
    conn.start(now)                          # queues a 148-byte initiation
    for data, addr in conn.datagrams_to_send(now): send(data, addr)
    conn.receive_datagram(reply, server, now)  # response, cookie reply or transport data
    while (event := conn.next_event()) is not None: ...

``now`` is a monotonic time in seconds (key ages, cookie ages, retransmissions). The wall clock
(``wall_ns``, injected like randomness) is used for one thing only, the TAI64N timestamp in the
initiation. The server accepts a timestamp only if it is strictly greater than the last one it
accepted from this key, so :func:`next_timestamp` never goes backwards: it takes the last
timestamp sent (the caller persists it across restarts: :class:`InitiationSent` says when) and
bumps it when the wall clock stepped back.

With a ``retry_interval`` the initiator retransmits by itself (a fresh initiation every interval
while none is answered, ``get_timer`` says when) and answers a cookie reply at once with an
initiation carrying mac2. Without one, :meth:`initiate` is the caller's to call.

A malformed or unauthenticated datagram never raises: it becomes a :class:`BadDatagram` event
with the reason; the helpers below raise :class:`WireGuardError` and nothing else.
Message layouts and the key schedule follow the WireGuard paper and wireguard-go's device/noise-*.go
(see docs/probes/wireguard.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl import bindings as sodium
from nacl.exceptions import CryptoError
from nacl.exceptions import RuntimeError as SodiumRuntimeError

from probes.protocols.core import Address, BadDatagram

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

MESSAGE_INITIATION = 1
MESSAGE_RESPONSE = 2
MESSAGE_COOKIE_REPLY = 3
MESSAGE_TRANSPORT = 4

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
TAG_SIZE = 16
KEEPALIVE_SIZE = TRANSPORT_HEADER_SIZE + TAG_SIZE  # 32
KEY_SIZE = 32
TIMESTAMP_SIZE = 12

# wireguard-go device/constants.go
REKEY_TIMEOUT = 5.0
REJECT_AFTER_TIME = 180.0
COOKIE_REFRESH_TIME = 120.0
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1

# TAI64N: label 2^62 + 10 (TAI-UTC offset in 1970), nanoseconds whitened to 2^24 ns like the kernel
TAI64_BASE = 0x400000000000000A
TIMESTAMP_WHITENER = (1 << 24) - 1
_NS_PER_S = 1_000_000_000

REPLAY_WINDOW_SIZE = 2048
MAX_PENDING_HANDSHAKES = 8

_HEADER = struct.Struct("<B3xI")
_TRANSPORT_HEADER = struct.Struct("<B3xIQ")
_RESPONSE_HEADER = struct.Struct("<B3xII")
_TAI64N = struct.Struct(">QI")
_ZERO_NONCE = bytes(12)
_ZERO_KEY = bytes(KEY_SIZE)
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


class WireGuardError(ValueError):
    """Malformed, unexpected or unauthenticated input, or a misuse of the initiator."""


# --- primitives -------------------------------------------------------------------------------


def hash_(*parts: bytes) -> bytes:
    """BLAKE2s-256 of the concatenation of ``parts``."""
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """Keyed BLAKE2s-128 (mac1, mac2, cookie)."""
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256 with the 64-byte block; hand-rolled because it is the hot path."""
    padded = key.ljust(64, b"\0")
    inner = hashlib.blake2s(padded.translate(_IPAD) + data).digest()
    return hashlib.blake2s(padded.translate(_OPAD) + inner).digest()


def kdf(chaining_key: bytes, data: bytes, outputs: int) -> list[bytes]:
    """HKDF over HMAC-BLAKE2s returning ``outputs`` (1..3) 32-byte keys."""
    prk = hmac_blake2s(chaining_key, data)
    out: list[bytes] = []
    previous = b""
    for i in range(1, outputs + 1):
        previous = hmac_blake2s(prk, previous + bytes((i,)))
        out.append(previous)
    return out


def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + counter.to_bytes(8, "little")


def aead_seal(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_nonce(counter), plaintext, ad)


def aead_open(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(_nonce(counter), ciphertext, ad)
    except InvalidTag:
        raise WireGuardError("authentication failed") from None


def xaead_open(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """XChaCha20-Poly1305 open (cookie replies), via libsodium."""
    try:
        out: bytes = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key)
    except CryptoError:
        raise WireGuardError("cookie reply failed authentication") from None
    return out


def public_key(private_key: bytes) -> bytes:
    _check_key(private_key, "private key")
    out: bytes = sodium.crypto_scalarmult_base(private_key)
    return out


def dh(private_key: bytes, public: bytes) -> bytes:
    """X25519; a low-order peer key (all-zero shared secret) is an error, as in wireguard-go."""
    try:
        shared: bytes = sodium.crypto_scalarmult(private_key, public)
    except (SodiumRuntimeError, CryptoError):
        raise WireGuardError("X25519 produced the all-zero secret (low-order point)") from None
    if shared == _ZERO_KEY:
        raise WireGuardError("X25519 produced the all-zero secret (low-order point)")
    return shared


def _check_key(key: bytes, what: str) -> None:
    if len(key) != KEY_SIZE:
        raise WireGuardError(f"{what} must be {KEY_SIZE} bytes, got {len(key)}")


# Noise constants: C0 = HASH(CONSTRUCTION), H0 = HASH(C0 || IDENTIFIER)
INITIAL_CHAINING_KEY = hash_(CONSTRUCTION)
INITIAL_HASH = hash_(INITIAL_CHAINING_KEY, IDENTIFIER)


# --- TAI64N -----------------------------------------------------------------------------------


def tai64n(wall_ns: int) -> bytes:
    """TAI64N of a Unix time in nanoseconds, nanoseconds whitened to 2^24 ns."""
    seconds, nanos = divmod(wall_ns, _NS_PER_S)
    if seconds < 0:
        raise WireGuardError("wall clock before 1970")
    return _TAI64N.pack(TAI64_BASE + seconds, nanos & ~TIMESTAMP_WHITENER)


def parse_tai64n(timestamp: bytes) -> tuple[int, int]:
    """(TAI64 seconds label, nanoseconds) of a 12-byte timestamp."""
    if len(timestamp) != TIMESTAMP_SIZE:
        raise WireGuardError(f"TAI64N timestamp must be 12 bytes, got {len(timestamp)}")
    seconds, nanos = _TAI64N.unpack(timestamp)
    if nanos >= _NS_PER_S:
        raise WireGuardError("TAI64N nanoseconds out of range")
    return seconds, nanos


def next_timestamp(wall_ns: int, last: bytes | None) -> bytes:
    """The timestamp to send: from the wall clock, but always strictly after ``last``.

    When the wall clock stepped back (or two initiations fall into one 2^24 ns tick) the result is
    ``last`` plus one tick, so the server, which keeps the largest timestamp it accepted per peer,
    still accepts it.
    """
    candidate = tai64n(wall_ns)
    if last is None:
        return candidate
    last_seconds, last_nanos = parse_tai64n(last)
    if candidate > last:  # big-endian fixed width: byte order is numeric order
        return candidate
    nanos = last_nanos + TIMESTAMP_WHITENER + 1
    seconds = last_seconds
    if nanos >= _NS_PER_S:
        seconds, nanos = seconds + 1, 0
    if seconds >= 1 << 64:
        raise WireGuardError("TAI64N timestamp overflow")
    return _TAI64N.pack(seconds, nanos)


# --- replay window ----------------------------------------------------------------------------


class ReplayWindow:
    """Sliding window of accepted counters (RFC 6479 semantics, a plain int as the bitmap)."""

    def __init__(self, size: int = REPLAY_WINDOW_SIZE) -> None:
        self.size = size
        self.highest = -1
        self._bits = 0  # bit i set = counter (highest - i) seen

    def would_accept(self, counter: int) -> bool:
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        if counter > self.highest:
            return True
        offset = self.highest - counter
        if offset >= self.size:
            return False
        return not (self._bits >> offset) & 1

    def accept(self, counter: int) -> None:
        """Mark ``counter`` seen; call only after the packet authenticated."""
        if not self.would_accept(counter):
            raise WireGuardError(f"replayed or too old counter {counter}")
        if counter > self.highest:
            shift = counter - self.highest
            self._bits = ((self._bits << shift) | 1) & ((1 << self.size) - 1)
            self.highest = counter
        else:
            self._bits |= 1 << (self.highest - counter)


# --- configuration, keys and events -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InitiatorConfig:
    private_key: bytes
    server_public_key: bytes
    preshared_key: bytes | None = None

    def __post_init__(self) -> None:
        _check_key(self.private_key, "private key")
        _check_key(self.server_public_key, "server public key")
        if self.preshared_key is not None:
            _check_key(self.preshared_key, "preshared key")


@dataclass(slots=True)
class Keypair:
    """Transport keys of one completed handshake."""

    send_key: bytes
    receive_key: bytes
    local_index: int
    remote_index: int
    created_at: float
    send_counter: int = 0
    replay: ReplayWindow = field(default_factory=ReplayWindow)


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    local_index: int
    remote_index: int
    used_cookie: bool  # the initiation that got answered carried a mac2


@dataclass(frozen=True, slots=True)
class CookieReceived:
    """The server is under load: retry the initiation (it will carry mac2 from this cookie)."""


@dataclass(frozen=True, slots=True)
class DataReceived:
    payload: bytes  # an IP packet, padding removed
    counter: int


@dataclass(frozen=True, slots=True)
class KeepaliveReceived:
    counter: int


@dataclass(frozen=True, slots=True)
class HandshakeTimedOut:
    """No response within REKEY_TIMEOUT of the last initiation (the caller decides to retry)."""


@dataclass(frozen=True, slots=True)
class InitiationSent:
    """An initiation of the initiator's own (``start``, a retransmission, the answer to a cookie)
    is queued: ``timestamp`` is the one to persist before it leaves."""

    sender_index: int
    timestamp: bytes


Event = (HandshakeCompleted | CookieReceived | DataReceived | KeepaliveReceived
         | HandshakeTimedOut | InitiationSent | BadDatagram)


@dataclass(slots=True)
class _PendingHandshake:
    sender_index: int
    ephemeral_private: bytes
    chaining_key: bytes
    hash: bytes
    mac1: bytes
    used_cookie: bool
    deadline: float


# --- the initiator ----------------------------------------------------------------------------


class WireGuardInitiator:
    """One probe's view of one server: handshakes, cookies and transport data."""

    def __init__(
        self,
        config: InitiatorConfig,
        *,
        remote: Address = ("", 0),
        last_timestamp: bytes | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        wall_ns: Callable[[], int] = time.time_ns,
        retry_interval: float | None = None,
    ) -> None:
        if last_timestamp is not None:
            parse_tai64n(last_timestamp)
        self.config = config
        self.remote = remote  # the server, as the caller's transport knows it
        self._wall_ns = wall_ns
        self.retry_interval = retry_interval
        self._next_retry: float | None = None
        self.last_timestamp = last_timestamp  # persist this before sending the initiation
        self._random = random_bytes
        self.public_key = public_key(config.private_key)
        s_r = config.server_public_key
        # per-server constants, computed once (the static-static DH is the big one)
        self._initial_hash = hash_(INITIAL_HASH, s_r)
        self._mac1_key_server = hash_(LABEL_MAC1, s_r)
        self._cookie_key_server = hash_(LABEL_COOKIE, s_r)
        self._mac1_key_self = hash_(LABEL_MAC1, self.public_key)
        self._static_static = dh(config.private_key, s_r)
        self._psk = config.preshared_key or _ZERO_KEY
        self._cookie: bytes | None = None
        self._cookie_at = 0.0
        # initiations still waiting for an answer, oldest first: a retransmission must not make
        # the (late) response to the previous one unreadable
        self._pending: dict[int, _PendingHandshake] = {}
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self._outbox: list[bytes] = []
        self._events: deque[Event] = deque()
        self.cookies_received = 0

    # -- sans-I/O surface --

    def start(self, now: float) -> None:
        """Queue the first initiation (announced with :class:`InitiationSent`)."""
        self._initiate_announced(now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out, self._outbox = self._outbox, []
        return [(data, self.remote) for data in out]

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        if self.retry_interval is not None:
            return self._next_retry if self._pending else None
        return max(p.deadline for p in self._pending.values()) if self._pending else None

    def handle_timer(self, now: float) -> None:
        deadline = self.get_timer()
        if deadline is None or now < deadline:
            return
        if self.retry_interval is not None:
            self._initiate_announced(now)  # a retransmission: a fresh initiation
            return
        self._pending.clear()
        self._events.append(HandshakeTimedOut())

    def _initiate_announced(self, now: float) -> None:
        message = self.initiate(now, self._wall_ns())
        if self.retry_interval is not None:
            self._next_retry = now + self.retry_interval
        assert self.last_timestamp is not None
        self._events.append(InitiationSent(int.from_bytes(message[4:8], "little"),
                                           self.last_timestamp))

    # -- handshake --

    def initiate(self, now: float, wall_ns: int, *, ephemeral_private: bytes | None = None,
                 sender_index: int | None = None) -> bytes:
        """Queue (and return) an initiation; ``last_timestamp`` becomes the one it carries."""
        timestamp = next_timestamp(wall_ns, self.last_timestamp)
        if ephemeral_private is None:
            ephemeral_private = self._random(KEY_SIZE)
        if sender_index is None:
            sender_index = int.from_bytes(self._random(4), "little")
        _check_key(ephemeral_private, "ephemeral private key")
        if not 0 <= sender_index < 1 << 32:
            raise WireGuardError("sender index out of range")

        ephemeral = sodium.crypto_scalarmult_base(ephemeral_private)
        s_r = self.config.server_public_key
        h = hash_(self._initial_hash, ephemeral)
        (c,) = kdf(INITIAL_CHAINING_KEY, ephemeral, 1)
        c, k = kdf(c, dh(ephemeral_private, s_r), 2)
        encrypted_static = aead_seal(k, 0, self.public_key, h)
        h = hash_(h, encrypted_static)
        c, k = kdf(c, self._static_static, 2)
        encrypted_timestamp = aead_seal(k, 0, timestamp, h)
        h = hash_(h, encrypted_timestamp)

        body = (_HEADER.pack(MESSAGE_INITIATION, sender_index) + ephemeral + encrypted_static
                + encrypted_timestamp)
        mac1 = mac(self._mac1_key_server, body)
        cookie = self._live_cookie(now)
        mac2 = mac(cookie, body + mac1) if cookie is not None else bytes(16)
        message = body + mac1 + mac2

        self._pending[sender_index] = _PendingHandshake(sender_index, ephemeral_private, c, h, mac1,
                                                        cookie is not None, now + REKEY_TIMEOUT)
        while len(self._pending) > MAX_PENDING_HANDSHAKES:
            del self._pending[next(iter(self._pending))]
        self.last_timestamp = timestamp
        self._outbox.append(message)
        return message

    def _live_cookie(self, now: float) -> bytes | None:
        if self._cookie is None or now - self._cookie_at >= COOKIE_REFRESH_TIME:
            return None
        return self._cookie

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Consume one datagram from the server; a bad one becomes a :class:`BadDatagram`."""
        try:
            self._receive(data, now)
        except WireGuardError as exc:
            self._events.append(BadDatagram(str(exc)))

    def _receive(self, data: bytes, now: float) -> None:
        if len(data) < 4:
            raise WireGuardError(f"datagram of {len(data)} bytes is too short")
        kind = data[0]
        if data[1:4] != b"\0\0\0":
            raise WireGuardError("reserved header bytes are not zero")
        if kind == MESSAGE_RESPONSE:
            self._receive_response(data, now)
        elif kind == MESSAGE_COOKIE_REPLY:
            self._receive_cookie_reply(data, now)
        elif kind == MESSAGE_TRANSPORT:
            self._receive_transport(data)
        elif kind == MESSAGE_INITIATION:
            if len(data) != INITIATION_SIZE:
                raise WireGuardError(f"initiation of {len(data)} bytes")
            # the server initiating to us: a probe never responds, so ignore it
        else:
            raise WireGuardError(f"unknown message type {kind}")

    def _receive_response(self, data: bytes, now: float) -> None:
        if len(data) != RESPONSE_SIZE:
            raise WireGuardError(f"response of {len(data)} bytes, expected {RESPONSE_SIZE}")
        _, remote_index, receiver = _RESPONSE_HEADER.unpack_from(data)
        pending = self._pending.get(receiver)
        if pending is None:
            raise WireGuardError("response to no initiation of ours")
        if not hmac.compare_digest(mac(self._mac1_key_self, data[:60]), data[60:76]):
            raise WireGuardError("response mac1 is wrong (not for our key)")
        ephemeral_r = data[12:44]
        encrypted_empty = data[44:60]

        (c,) = kdf(pending.chaining_key, ephemeral_r, 1)
        h = hash_(pending.hash, ephemeral_r)
        (c,) = kdf(c, dh(pending.ephemeral_private, ephemeral_r), 1)
        (c,) = kdf(c, dh(self.config.private_key, ephemeral_r), 1)
        c, tau, k = kdf(c, self._psk, 3)
        h = hash_(h, tau)
        try:
            aead_open(k, 0, encrypted_empty, h)
        except WireGuardError:
            raise WireGuardError(
                "response failed authentication: wrong preshared key (or server key)") from None
        send_key, receive_key = kdf(c, b"", 2)

        self._pending.clear()  # one session is all a probe needs; later answers are stale
        self.previous, self.current = self.current, Keypair(
            send_key, receive_key, pending.sender_index, remote_index, now)
        self._events.append(HandshakeCompleted(pending.sender_index, remote_index,
                                               pending.used_cookie))

    def _receive_cookie_reply(self, data: bytes, now: float) -> None:
        if len(data) != COOKIE_REPLY_SIZE:
            raise WireGuardError(f"cookie reply of {len(data)} bytes, expected {COOKIE_REPLY_SIZE}")
        (_, receiver) = _HEADER.unpack_from(data)
        pending = self._pending.get(receiver)
        if pending is None:
            raise WireGuardError("cookie reply to no initiation of ours")
        cookie = xaead_open(self._cookie_key_server, data[8:32], data[32:64], pending.mac1)
        self._cookie = cookie
        self._cookie_at = now
        self.cookies_received += 1
        self._events.append(CookieReceived())
        if self.retry_interval is not None:
            self._initiate_announced(now)  # at once, now with mac2

    # -- transport data --

    def send_data(self, payload: bytes, now: float) -> bytes:
        """Queue (and return) a transport packet carrying ``payload`` (an IP packet, or b"")."""
        keypair = self.current
        if keypair is None:
            raise WireGuardError("no session: handshake first")
        if now - keypair.created_at >= REJECT_AFTER_TIME:
            raise WireGuardError("session keys expired: handshake again")
        counter = keypair.send_counter
        if counter >= REJECT_AFTER_MESSAGES:
            raise WireGuardError("send counter exhausted: handshake again")
        keypair.send_counter += 1
        padded = payload + bytes(-len(payload) % 16)
        packet = (_TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, keypair.remote_index, counter)
                  + aead_seal(keypair.send_key, counter, padded, b""))
        self._outbox.append(packet)
        return packet

    def send_keepalive(self, now: float) -> bytes:
        return self.send_data(b"", now)

    def _receive_transport(self, data: bytes) -> None:
        if len(data) < KEEPALIVE_SIZE:
            raise WireGuardError(f"transport packet of {len(data)} bytes is too short")
        _, receiver, counter = _TRANSPORT_HEADER.unpack_from(data)
        keypair = next((kp for kp in (self.current, self.previous)
                        if kp is not None and kp.local_index == receiver), None)
        if keypair is None:
            raise WireGuardError(f"transport packet for unknown index {receiver}")
        if not keypair.replay.would_accept(counter):
            raise WireGuardError(f"replayed or too old counter {counter}")
        plaintext = aead_open(keypair.receive_key, counter, data[TRANSPORT_HEADER_SIZE:], b"")
        keypair.replay.accept(counter)
        if not plaintext:
            self._events.append(KeepaliveReceived(counter))
            return
        self._events.append(DataReceived(strip_padding(plaintext), counter))


def strip_padding(plaintext: bytes) -> bytes:
    """Cut an IPv4/IPv6 packet to the length its header states (WireGuard pads to 16 bytes)."""
    version = plaintext[0] >> 4
    if version == 4 and len(plaintext) >= 20:
        length = int.from_bytes(plaintext[2:4], "big")
    elif version == 6 and len(plaintext) >= 40:
        length = 40 + int.from_bytes(plaintext[4:6], "big")
    else:
        raise WireGuardError("transport payload is not an IP packet")
    if length > len(plaintext) or length < (20 if version == 4 else 40):
        raise WireGuardError("IP length field disagrees with the transport payload")
    return plaintext[:length]


# --- key encoding helpers (used by the check layer and the CLI) -------------------------------


def decode_key(text: str, what: str = "key") -> bytes:
    """A base64 key as ``wg`` prints it; WireGuardError if it is not 32 bytes of base64."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise WireGuardError(f"{what} is not valid base64") from None
    if len(raw) != KEY_SIZE:
        raise WireGuardError(f"{what} must decode to {KEY_SIZE} bytes, got {len(raw)}")
    return raw


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")
