"""TLS handshake bytes on the wire, sans-I/O: a ClientHello built to offer exactly what a probe
wants to test, and a reader of the server's plaintext flight.

Two uses, both inside the OpenVPN control channel (which carries TLS records as its payload):

* the policy scan offers only what it wants refused (TLS 1.0, RSA key transport, a post-quantum
  group) with :func:`client_hello`, written byte by byte here so that the offer does not depend
  on what the local TLS library is still willing to send, and reads the answer with
  :class:`ServerFlight`: a ServerHello (accepted) or an alert (refused);
* the functional probe, whose TLS is the ``ssl`` module, feeds a :class:`ServerFlight` the same
  server bytes it gives OpenSSL, to learn what OpenSSL does not tell (the key exchange group).

Only what precedes encryption is read: records, ServerHello (and HelloRetryRequest),
Certificate and ServerKeyExchange of TLS <= 1.2, alerts. Anything malformed is a
:class:`TlsWireError` — the only exception that leaves this module.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass, field

TLS10, TLS11, TLS12, TLS13 = 0x0301, 0x0302, 0x0303, 0x0304
VERSION_NAMES = {0x0300: "SSLv3", TLS10: "TLSv1", TLS11: "TLSv1.1", TLS12: "TLSv1.2",
                 TLS13: "TLSv1.3"}

MAX_RECORD = 2**14 + 2048  # the largest ciphertext record TLS allows
MAX_HANDSHAKE = 2**18  # a server flight bigger than this is not one we will buffer


class ContentType(enum.IntEnum):
    CHANGE_CIPHER_SPEC = 20
    ALERT = 21
    HANDSHAKE = 22
    APPLICATION_DATA = 23


class HandshakeType(enum.IntEnum):
    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    CERTIFICATE = 11
    SERVER_KEY_EXCHANGE = 12
    SERVER_HELLO_DONE = 14


EXT_SUPPORTED_GROUPS = 10
EXT_EC_POINT_FORMATS = 11
EXT_SIGNATURE_ALGORITHMS = 13
EXT_EXTENDED_MASTER_SECRET = 23
EXT_SUPPORTED_VERSIONS = 43
EXT_KEY_SHARE = 51
EXT_RENEGOTIATION_INFO = 0xFF01

# RFC 8446 4.1.3: a ServerHello with this random is a HelloRetryRequest
HRR_RANDOM = hashlib.sha256(b"HelloRetryRequest").digest()

# TLS Supported Groups (IANA); the hybrid one from draft-ietf-tls-ecdhe-mlkem
GROUP_NAMES = {
    23: "secp256r1", 24: "secp384r1", 25: "secp521r1", 29: "x25519", 30: "x448",
    256: "ffdhe2048", 257: "ffdhe3072", 258: "ffdhe4096", 259: "ffdhe6144", 260: "ffdhe8192",
    0x11EB: "SecP256r1MLKEM768", 0x11EC: "X25519MLKEM768", 0x11ED: "SecP384r1MLKEM1024",
    512: "MLKEM512", 513: "MLKEM768", 514: "MLKEM1024",
}
X25519 = 29
X25519MLKEM768 = 0x11EC
PQ_GROUPS = frozenset({0x11EB, 0x11EC, 0x11ED, 512, 513, 514})
MLKEM768_ENCAPSULATION_KEY_LEN = 1184
MLKEM768_CIPHERTEXT_LEN = 1088
X25519_LEN = 32

ALERT_NAMES = {
    0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac", 22: "record_overflow",
    40: "handshake_failure", 42: "bad_certificate", 43: "unsupported_certificate",
    44: "certificate_revoked", 45: "certificate_expired", 46: "certificate_unknown",
    47: "illegal_parameter", 48: "unknown_ca", 49: "access_denied", 50: "decode_error",
    51: "decrypt_error", 70: "protocol_version", 71: "insufficient_security",
    80: "internal_error", 86: "inappropriate_fallback", 90: "user_canceled",
    109: "missing_extension", 110: "unsupported_extension", 112: "unrecognized_name",
    116: "certificate_required", 120: "no_application_protocol",
}
ALERT_HANDSHAKE_FAILURE = 40
ALERT_FATAL = 2


class KeyExchange(enum.StrEnum):
    """How a cipher suite agrees on keys: forward secret (ECDHE, DHE, every TLS 1.3 suite) or
    not (RSA key transport)."""

    ECDHE = "ecdhe"
    DHE = "dhe"
    RSA = "rsa"
    TLS13 = "tls13"  # the group is negotiated apart (key_share); always ephemeral


@dataclass(frozen=True, slots=True)
class Suite:
    code: int
    name: str  # the IANA name
    kx: KeyExchange


SUITES = {s.code: s for s in (
    Suite(0x1301, "TLS_AES_128_GCM_SHA256", KeyExchange.TLS13),
    Suite(0x1302, "TLS_AES_256_GCM_SHA384", KeyExchange.TLS13),
    Suite(0x1303, "TLS_CHACHA20_POLY1305_SHA256", KeyExchange.TLS13),
    Suite(0xC02B, "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", KeyExchange.ECDHE),
    Suite(0xC02C, "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", KeyExchange.ECDHE),
    Suite(0xC02F, "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", KeyExchange.ECDHE),
    Suite(0xC030, "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", KeyExchange.ECDHE),
    Suite(0xCCA8, "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", KeyExchange.ECDHE),
    Suite(0xCCA9, "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", KeyExchange.ECDHE),
    Suite(0xC023, "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256", KeyExchange.ECDHE),
    Suite(0xC024, "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384", KeyExchange.ECDHE),
    Suite(0xC027, "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256", KeyExchange.ECDHE),
    Suite(0xC028, "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384", KeyExchange.ECDHE),
    Suite(0xC009, "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA", KeyExchange.ECDHE),
    Suite(0xC00A, "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA", KeyExchange.ECDHE),
    Suite(0xC013, "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA", KeyExchange.ECDHE),
    Suite(0xC014, "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA", KeyExchange.ECDHE),
    Suite(0x009E, "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256", KeyExchange.DHE),
    Suite(0x009F, "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384", KeyExchange.DHE),
    Suite(0xCCAA, "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256", KeyExchange.DHE),
    Suite(0x0033, "TLS_DHE_RSA_WITH_AES_128_CBC_SHA", KeyExchange.DHE),
    Suite(0x0039, "TLS_DHE_RSA_WITH_AES_256_CBC_SHA", KeyExchange.DHE),
    Suite(0x009C, "TLS_RSA_WITH_AES_128_GCM_SHA256", KeyExchange.RSA),
    Suite(0x009D, "TLS_RSA_WITH_AES_256_GCM_SHA384", KeyExchange.RSA),
    Suite(0x003C, "TLS_RSA_WITH_AES_128_CBC_SHA256", KeyExchange.RSA),
    Suite(0x003D, "TLS_RSA_WITH_AES_256_CBC_SHA256", KeyExchange.RSA),
    Suite(0x002F, "TLS_RSA_WITH_AES_128_CBC_SHA", KeyExchange.RSA),
    Suite(0x0035, "TLS_RSA_WITH_AES_256_CBC_SHA", KeyExchange.RSA),
    Suite(0x000A, "TLS_RSA_WITH_3DES_EDE_CBC_SHA", KeyExchange.RSA),
)}
EMPTY_RENEGOTIATION_INFO_SCSV = 0x00FF

# signature_algorithms we list in a TLS 1.2/1.3 hello (RFC 8446 4.2.3)
SIGNATURE_SCHEMES = (0x0403, 0x0503, 0x0603, 0x0807, 0x0804, 0x0805, 0x0806, 0x0401, 0x0501,
                     0x0601, 0x0201, 0x0203)


class TlsWireError(ValueError):
    """Bytes that are not the TLS a server sends before encryption starts."""


def suite_name(code: int) -> str:
    suite = SUITES.get(code)
    return suite.name if suite is not None else "unknown"


def group_name(code: int) -> str:
    return GROUP_NAMES.get(code, "unknown")


# --- the ClientHello ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HelloOffer:
    """Exactly what one ClientHello offers. ``versions``: the highest first; a list holding TLS
    1.3 goes in supported_versions (RFC 8446), one without it is the legacy version field.
    ``key_shares``: (group, public key bytes) for TLS 1.3."""

    versions: tuple[int, ...]
    suites: tuple[int, ...]
    groups: tuple[int, ...] = ()
    key_shares: tuple[tuple[int, bytes], ...] = ()

    @property
    def tls13(self) -> bool:
        return TLS13 in self.versions


def _vector(data: bytes, length_bytes: int) -> bytes:
    return len(data).to_bytes(length_bytes, "big") + data


def _extension(ext_type: int, body: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(body)) + body


def _u16s(values: tuple[int, ...]) -> bytes:
    return b"".join(struct.pack("!H", v) for v in values)


def client_hello(offer: HelloOffer, random: bytes, session_id: bytes = b"") -> bytes:
    """One ClientHello handshake message in one (or more) plaintext handshake records."""
    if len(random) != 32 or len(session_id) > 32:
        raise TlsWireError("ClientHello random must be 32 bytes, session id at most 32")
    if not offer.versions or not offer.suites:
        raise TlsWireError("a ClientHello offers at least one version and one suite")
    legacy = TLS12 if offer.tls13 else max(offer.versions)
    extensions = b""
    if offer.groups:
        extensions += _extension(EXT_SUPPORTED_GROUPS, _vector(_u16s(offer.groups), 2))
        extensions += _extension(EXT_EC_POINT_FORMATS, _vector(b"\x00", 1))
    if max(offer.versions) >= TLS12:  # RFC 5246 7.4.1.4.1: not before TLS 1.2
        extensions += _extension(EXT_SIGNATURE_ALGORITHMS,
                                 _vector(_u16s(SIGNATURE_SCHEMES), 2))
    if not offer.tls13 or len(offer.versions) > 1:
        extensions += _extension(EXT_EXTENDED_MASTER_SECRET, b"")
        extensions += _extension(EXT_RENEGOTIATION_INFO, b"\x00")
    if offer.tls13:
        extensions += _extension(EXT_SUPPORTED_VERSIONS, _vector(_u16s(offer.versions), 1))
        shares = b"".join(struct.pack("!H", group) + _vector(key, 2)
                          for group, key in offer.key_shares)
        extensions += _extension(EXT_KEY_SHARE, _vector(shares, 2))
    body = (struct.pack("!H", legacy) + random + _vector(session_id, 1)
            + _vector(_u16s(offer.suites), 2) + _vector(b"\x00", 1) + _vector(extensions, 2))
    message = bytes([HandshakeType.CLIENT_HELLO]) + _vector(body, 3)
    # the record version of a first flight is TLS 1.0 for the widest acceptance (RFC 8446 5.1)
    return records(ContentType.HANDSHAKE, min(legacy, TLS10), message)


def records(content_type: int, version: int, data: bytes) -> bytes:
    """``data`` cut into plaintext records of at most 2^14 bytes."""
    out = b""
    for pos in range(0, max(len(data), 1), 2**14):
        chunk = data[pos:pos + 2**14]
        out += struct.pack("!BHH", content_type, version, len(chunk)) + chunk
    return out


def alert(description: int, version: int = TLS12, level: int = ALERT_FATAL) -> bytes:
    """A plaintext alert record (a probe's way to end a handshake it started)."""
    return records(ContentType.ALERT, version, bytes([level, description]))


# --- the server's flight --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ServerHello:
    version: int  # the negotiated one (supported_versions in TLS 1.3)
    suite: int
    group: int | None  # TLS 1.3 key_share; HelloRetryRequest: the group it asks for
    key_share_len: int = 0
    retry: bool = False  # a HelloRetryRequest

    @property
    def version_name(self) -> str:
        return VERSION_NAMES.get(self.version, "unknown")


@dataclass(frozen=True, slots=True)
class Alert:
    level: int
    description: int

    @property
    def name(self) -> str:
        return ALERT_NAMES.get(self.description, "unknown")


@dataclass(slots=True)
class ServerFlight:
    """Reads the server's records as they arrive, until encryption starts (TLS 1.3: after the
    ServerHello; TLS <= 1.2: at ChangeCipherSpec). What it learnt stays in its fields;
    :meth:`feed` raises :class:`TlsWireError` on bytes that are not TLS."""

    hello: ServerHello | None = None
    alert: Alert | None = None
    certificates: list[bytes] = field(default_factory=list)  # TLS <= 1.2 Certificate, leaf first
    kx_group: int | None = None  # TLS <= 1.2 ServerKeyExchange: named curve
    dh_bits: int | None = None  # TLS <= 1.2 ServerKeyExchange: finite-field DH prime size
    done: bool = False  # nothing more in the clear
    _buffer: bytearray = field(default_factory=bytearray)
    _handshake: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        self._buffer += data
        while len(self._buffer) >= 5 and not self.done:
            content_type, version, length = struct.unpack_from("!BHH", self._buffer)
            if content_type not in ContentType.__members__.values() or version >> 8 != 3:
                raise TlsWireError(f"not a TLS record (type {content_type}, version "
                                   f"{version:#06x})")
            if length > MAX_RECORD:
                raise TlsWireError(f"TLS record of {length} bytes")
            if len(self._buffer) < 5 + length:
                return
            fragment = bytes(self._buffer[5:5 + length])
            del self._buffer[:5 + length]
            self._record(content_type, fragment)

    def _record(self, content_type: int, fragment: bytes) -> None:
        if content_type == ContentType.ALERT:
            if len(fragment) < 2:
                raise TlsWireError("alert record shorter than 2 bytes")
            self.alert = Alert(fragment[0], fragment[1])
            self.done = True
        elif content_type == ContentType.HANDSHAKE:
            self._handshake += fragment
            if len(self._handshake) > MAX_HANDSHAKE:
                raise TlsWireError("server handshake flight too large")
            self._messages()
        else:  # ChangeCipherSpec or application data: what follows is encrypted
            self.done = True

    def _messages(self) -> None:
        while len(self._handshake) >= 4 and not self.done:
            kind = self._handshake[0]
            length = int.from_bytes(self._handshake[1:4], "big")
            if len(self._handshake) < 4 + length:
                return
            body = bytes(self._handshake[4:4 + length])
            del self._handshake[:4 + length]
            self._message(kind, body)

    def _message(self, kind: int, body: bytes) -> None:
        if self.hello is None and kind != HandshakeType.SERVER_HELLO:
            raise TlsWireError(f"handshake message {kind} before the ServerHello")
        if kind == HandshakeType.SERVER_HELLO:
            if self.hello is not None:
                raise TlsWireError("a second ServerHello")
            self.hello = parse_server_hello(body)
            if self.hello.version >= TLS13 or self.hello.retry:
                self.done = True  # the rest of a TLS 1.3 flight is encrypted
        elif kind == HandshakeType.CERTIFICATE:
            self.certificates = _parse_certificates(body)
        elif kind == HandshakeType.SERVER_KEY_EXCHANGE:
            self._server_key_exchange(body)
        elif kind == HandshakeType.SERVER_HELLO_DONE:
            self.done = True

    def _server_key_exchange(self, body: bytes) -> None:
        hello = self.hello
        assert hello is not None
        suite = SUITES.get(hello.suite)
        if suite is None or suite.kx == KeyExchange.ECDHE:
            if len(body) >= 3 and body[0] == 3:  # ECCurveType named_curve
                self.kx_group = int.from_bytes(body[1:3], "big")
        elif suite.kx == KeyExchange.DHE:
            if len(body) < 2:
                raise TlsWireError("ServerKeyExchange too short for a DH prime")
            prime_len = int.from_bytes(body[:2], "big")
            if len(body) < 2 + prime_len or prime_len == 0:
                raise TlsWireError("DH prime overruns the ServerKeyExchange")
            self.dh_bits = int.from_bytes(body[2:2 + prime_len], "big").bit_length()

    @property
    def group_label(self) -> str:
        """The key exchange group, named: TLS 1.3 key share, TLS 1.2 curve, ``dhe<bits>``,
        ``rsa`` for key transport; "" while not known."""
        hello = self.hello
        if hello is None:
            return ""
        if hello.group is not None:
            return group_name(hello.group)
        if self.kx_group is not None:
            return group_name(self.kx_group)
        if self.dh_bits is not None:
            return f"dhe{_round_bits(self.dh_bits)}"
        suite = SUITES.get(hello.suite)
        return "rsa" if suite is not None and suite.kx == KeyExchange.RSA else ""


def _round_bits(bits: int) -> int:
    """A DH prime size as configured (1024, 2048, ...): bounded for a metric label."""
    for size in (768, 1024, 1536, 2048, 3072, 4096, 6144, 8192):
        if bits <= size:
            return size
    return 8192


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise TlsWireError(f"{self.what} truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u24(self) -> int:
        return int.from_bytes(self.take(3), "big")

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def parse_server_hello(body: bytes) -> ServerHello:
    r = _Reader(body, "ServerHello")
    legacy = r.u16()
    random = r.take(32)
    r.take(r.u8())  # legacy session id echo
    suite = r.u16()
    if r.u8() != 0:
        raise TlsWireError("ServerHello chose a compression method")
    version, group, share_len = legacy, None, 0
    retry = random == HRR_RANDOM
    if r.left:
        ext = _Reader(r.take(r.u16()), "ServerHello extensions")
        while ext.left:
            ext_type, data = ext.u16(), ext.take(ext.u16())
            if ext_type == EXT_SUPPORTED_VERSIONS:
                if len(data) != 2:
                    raise TlsWireError("supported_versions in a ServerHello is not 2 bytes")
                version = int.from_bytes(data, "big")
            elif ext_type == EXT_KEY_SHARE:
                if len(data) < 2:
                    raise TlsWireError("key_share in a ServerHello is too short")
                group = int.from_bytes(data[:2], "big")
                if not retry:
                    share = _Reader(data[2:], "key_share")
                    share_len = len(share.take(share.u16()))
        if r.left:
            raise TlsWireError("bytes after the ServerHello extensions")
    if version >> 8 != 3:
        raise TlsWireError(f"ServerHello version {version:#06x}")
    return ServerHello(version, suite, group, share_len, retry)


def _parse_certificates(body: bytes) -> list[bytes]:
    r = _Reader(body, "Certificate")
    chain = _Reader(r.take(r.u24()), "certificate list")
    out: list[bytes] = []
    while chain.left:
        out.append(chain.take(chain.u24()))
    return out
