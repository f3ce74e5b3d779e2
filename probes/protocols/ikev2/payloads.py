"""IKEv2 wire codec (RFC 7296 §3): the header, the generic payload chain and the payloads a PSK
initiator needs. Pure functions over bytes; the only exception that leaves is :class:`IKEv2Error`.

The Encrypted payload (SK, 46) is kept opaque here (``EncryptedPayload.body``); sealing and opening
it needs keys and lives in :mod:`probes.protocols.ikev2.crypto`.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass, field


class IKEv2Error(ValueError):
    """Bytes that are not well-formed IKEv2 (or a payload we were asked to build is bad)."""


HEADER_LEN = 28
VERSION_2_0 = 0x20
FLAG_INITIATOR = 0x08
FLAG_RESPONSE = 0x20
CRITICAL = 0x80
KEY_LENGTH_ATTRIBUTE = 14  # Transform attribute "Key Length", always TV format (0x800E)


class ExchangeType(enum.IntEnum):
    IKE_SA_INIT = 34
    IKE_AUTH = 35
    CREATE_CHILD_SA = 36
    INFORMATIONAL = 37
    IKE_INTERMEDIATE = 43  # RFC 9242


class PayloadType(enum.IntEnum):
    NONE = 0
    SA = 33
    KE = 34
    IDI = 35
    IDR = 36
    CERT = 37
    CERTREQ = 38
    AUTH = 39
    NONCE = 40
    NOTIFY = 41
    DELETE = 42
    VENDOR = 43
    TSI = 44
    TSR = 45
    SK = 46
    CP = 47
    EAP = 48
    SKF = 53


class NotifyType(enum.IntEnum):
    # errors (< 16384)
    UNSUPPORTED_CRITICAL_PAYLOAD = 1
    INVALID_IKE_SPI = 4
    INVALID_MAJOR_VERSION = 5
    INVALID_SYNTAX = 7
    INVALID_MESSAGE_ID = 9
    INVALID_SPI = 11
    NO_PROPOSAL_CHOSEN = 14
    INVALID_KE_PAYLOAD = 17
    AUTHENTICATION_FAILED = 24
    SINGLE_PAIR_REQUIRED = 34
    NO_ADDITIONAL_SAS = 35
    INTERNAL_ADDRESS_FAILURE = 36
    FAILED_CP_REQUIRED = 37
    TS_UNACCEPTABLE = 38
    INVALID_SELECTORS = 39
    TEMPORARY_FAILURE = 43
    CHILD_SA_NOT_FOUND = 44
    # status
    INITIAL_CONTACT = 16384
    SET_WINDOW_SIZE = 16385
    NAT_DETECTION_SOURCE_IP = 16388
    NAT_DETECTION_DESTINATION_IP = 16389
    COOKIE = 16390
    USE_TRANSPORT_MODE = 16391
    ESP_TFC_PADDING_NOT_SUPPORTED = 16394
    NON_FIRST_FRAGMENTS_ALSO = 16395
    MOBIKE_SUPPORTED = 16396
    MULTIPLE_AUTH_SUPPORTED = 16404
    REDIRECT_SUPPORTED = 16406
    CHILDLESS_IKEV2_SUPPORTED = 16418
    IKEV2_FRAGMENTATION_SUPPORTED = 16430
    SIGNATURE_HASH_ALGORITHMS = 16431
    INTERMEDIATE_EXCHANGE_SUPPORTED = 16438  # RFC 9242


ERROR_NOTIFY_LIMIT = 16384  # notify types below this are errors (§3.10.1)


class ProtocolId(enum.IntEnum):
    NONE = 0
    IKE = 1
    AH = 2
    ESP = 3


class TransformType(enum.IntEnum):
    ENCR = 1
    PRF = 2
    INTEG = 3
    DH = 4  # "Key Exchange Method" since RFC 9370
    ESN = 5
    ADDKE1 = 6  # RFC 9370 Additional Key Exchange 1..7
    ADDKE7 = 12


class IdType(enum.IntEnum):
    IPV4_ADDR = 1
    FQDN = 2
    RFC822_ADDR = 3
    IPV6_ADDR = 5
    DER_ASN1_DN = 9
    KEY_ID = 11


class AuthMethod(enum.IntEnum):
    RSA = 1
    PSK = 2
    DSS = 3
    ECDSA_256 = 9  # RFC 4754
    ECDSA_384 = 10
    ECDSA_521 = 11
    DIGITAL_SIGNATURE = 14  # RFC 7427


CERT_X509_SIGNATURE = 4  # Certificate Encoding (§3.6): a DER X.509 certificate; in CERTREQ:
# SHA-1 hashes of the trusted CAs' SubjectPublicKeyInfo


TS_IPV4_ADDR_RANGE = 7


class ConfigType(enum.IntEnum):
    """CP payload types (§3.15)."""

    REQUEST = 1
    REPLY = 2
    SET = 3
    ACK = 4


class ConfigAttribute(enum.IntEnum):
    """The configuration attributes the probe asks for (§3.15.1)."""

    INTERNAL_IP4_ADDRESS = 1
    INTERNAL_IP4_NETMASK = 2
    INTERNAL_IP4_DNS = 3


@dataclass(frozen=True, slots=True)
class Header:
    spi_i: bytes
    spi_r: bytes
    next_payload: int
    exchange: int
    flags: int
    message_id: int
    length: int = 0
    version: int = VERSION_2_0

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_RESPONSE)

    def encode(self, next_payload: int, length: int) -> bytes:
        return (self.spi_i + self.spi_r
                + struct.pack("!BBBBII", next_payload, self.version, self.exchange, self.flags,
                              self.message_id, length))


def decode_header(data: bytes) -> Header:
    if len(data) < HEADER_LEN:
        raise IKEv2Error(f"message of {len(data)} bytes is shorter than the IKE header")
    nxt, version, exchange, flags, msgid, length = struct.unpack_from("!BBBBII", data, 16)
    if version >> 4 != 2:
        raise IKEv2Error(f"IKE major version {version >> 4} is not 2")
    if length != len(data):
        raise IKEv2Error(f"header length {length} != datagram length {len(data)}")
    return Header(data[0:8], data[8:16], nxt, exchange, flags, msgid, length, version)


# --- payload bodies ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Transform:
    type: int
    id: int
    key_length: int | None = None  # bits, for variable-length ciphers (AES)

    def encode(self, last: bool) -> bytes:
        attrs = b""
        if self.key_length is not None:
            attrs = struct.pack("!HH", 0x8000 | KEY_LENGTH_ATTRIBUTE, self.key_length)
        return struct.pack("!BBHBBH", 0 if last else 3, 0, 8 + len(attrs), self.type, 0,
                           self.id) + attrs


@dataclass(frozen=True, slots=True)
class Proposal:
    number: int
    protocol: int
    transforms: tuple[Transform, ...]
    spi: bytes = b""

    def encode(self, last: bool) -> bytes:
        body = b"".join(t.encode(i == len(self.transforms) - 1)
                        for i, t in enumerate(self.transforms))
        length = 8 + len(self.spi) + len(body)
        return (struct.pack("!BBHBBBB", 0 if last else 2, 0, length, self.number, self.protocol,
                            len(self.spi), len(self.transforms)) + self.spi + body)

    def transform(self, ttype: int) -> Transform | None:
        return next((t for t in self.transforms if t.type == ttype), None)


@dataclass(frozen=True, slots=True)
class SAPayload:
    proposals: tuple[Proposal, ...]
    type: int = field(default=PayloadType.SA, init=False)

    def body(self) -> bytes:
        return b"".join(p.encode(i == len(self.proposals) - 1)
                        for i, p in enumerate(self.proposals))


@dataclass(frozen=True, slots=True)
class KEPayload:
    group: int
    data: bytes
    type: int = field(default=PayloadType.KE, init=False)

    def body(self) -> bytes:
        return struct.pack("!HH", self.group, 0) + self.data


@dataclass(frozen=True, slots=True)
class NoncePayload:
    data: bytes
    type: int = field(default=PayloadType.NONCE, init=False)

    def body(self) -> bytes:
        return self.data


@dataclass(frozen=True, slots=True)
class NotifyPayload:
    notify_type: int
    data: bytes = b""
    protocol: int = ProtocolId.NONE
    spi: bytes = b""
    type: int = field(default=PayloadType.NOTIFY, init=False)

    @property
    def is_error(self) -> bool:
        return self.notify_type < ERROR_NOTIFY_LIMIT

    def body(self) -> bytes:
        return struct.pack("!BBH", self.protocol, len(self.spi), self.notify_type) + self.spi \
            + self.data


@dataclass(frozen=True, slots=True)
class IdPayload:
    type: int  # PayloadType.IDI or IDR
    id_type: int
    data: bytes

    def body(self) -> bytes:
        """The bytes AUTH is computed over ("RestOfIDPayload", §2.15)."""
        return struct.pack("!B3x", self.id_type) + self.data


@dataclass(frozen=True, slots=True)
class AuthPayload:
    method: int
    data: bytes
    type: int = field(default=PayloadType.AUTH, init=False)

    def body(self) -> bytes:
        return struct.pack("!B3x", self.method) + self.data


@dataclass(frozen=True, slots=True)
class DeletePayload:
    protocol: int
    spis: tuple[bytes, ...] = ()
    type: int = field(default=PayloadType.DELETE, init=False)

    def body(self) -> bytes:
        spi_size = len(self.spis[0]) if self.spis else 0
        return struct.pack("!BBH", self.protocol, spi_size, len(self.spis)) + b"".join(self.spis)


@dataclass(frozen=True, slots=True)
class TrafficSelector:
    start: ipaddress.IPv4Address
    end: ipaddress.IPv4Address
    ip_protocol: int = 0
    start_port: int = 0
    end_port: int = 65535

    def encode(self) -> bytes:
        return struct.pack("!BBHHH", TS_IPV4_ADDR_RANGE, self.ip_protocol, 16, self.start_port,
                           self.end_port) + self.start.packed + self.end.packed

    @classmethod
    def network(cls, cidr: str) -> TrafficSelector:
        net = ipaddress.IPv4Network(cidr, strict=False)
        return cls(net.network_address, net.broadcast_address)


@dataclass(frozen=True, slots=True)
class TSPayload:
    type: int  # PayloadType.TSI or TSR
    selectors: tuple[TrafficSelector, ...]

    def body(self) -> bytes:
        return struct.pack("!B3x", len(self.selectors)) + b"".join(s.encode()
                                                                   for s in self.selectors)


@dataclass(frozen=True, slots=True)
class EncryptedPayload:
    """SK: ``inner_first`` is the type of the first payload inside; ``body`` is IV‖ct‖ICV."""

    inner_first: int
    body_bytes: bytes
    type: int = field(default=PayloadType.SK, init=False)

    def body(self) -> bytes:
        return self.body_bytes


@dataclass(frozen=True, slots=True)
class CertPayload:
    """CERT (a certificate) or CERTREQ (the CAs we trust), §3.6 and §3.7."""

    type: int  # PayloadType.CERT or CERTREQ
    encoding: int
    data: bytes

    def body(self) -> bytes:
        return bytes([self.encoding]) + self.data


@dataclass(frozen=True, slots=True)
class ConfigPayload:
    """CP: a request (attributes with empty values: "any, please") or the responder's reply."""

    cfg_type: int
    attributes: tuple[tuple[int, bytes], ...]
    type: int = field(default=PayloadType.CP, init=False)

    def body(self) -> bytes:
        out = bytearray(struct.pack("!B3x", self.cfg_type))
        for attr, value in self.attributes:
            out += struct.pack("!HH", attr & 0x7FFF, len(value)) + value
        return bytes(out)

    def ipv4(self, attr: int) -> tuple[str, ...]:
        """The IPv4 addresses of attribute ``attr`` (values of another length are skipped:
        INTERNAL_IP4_ADDRESS may not carry one, and a malformed one is not an address)."""
        return tuple(str(ipaddress.IPv4Address(value)) for a, value in self.attributes
                     if a == attr and len(value) == 4)


@dataclass(frozen=True, slots=True)
class RawPayload:
    """Any payload we do not interpret (Vendor ID, ...), kept as bytes."""

    type: int
    data: bytes
    critical: bool = False

    def body(self) -> bytes:
        return self.data


Payload = (SAPayload | KEPayload | NoncePayload | NotifyPayload | IdPayload | AuthPayload
           | DeletePayload | TSPayload | EncryptedPayload | CertPayload | ConfigPayload
           | RawPayload)


# --- chain codec ------------------------------------------------------------------------------

def encode_chain(payloads: list[Payload]) -> tuple[int, bytes]:
    """Encode payloads; returns (type of the first payload, bytes). The SK payload's "next payload"
    field names its first inner payload (§3.14), so it must be the last one in its chain."""
    out = bytearray()
    for i, p in enumerate(payloads):
        if isinstance(p, EncryptedPayload):
            if i != len(payloads) - 1:
                raise IKEv2Error("the Encrypted payload must be the last payload")
            nxt = p.inner_first
        else:
            nxt = payloads[i + 1].type if i + 1 < len(payloads) else PayloadType.NONE
        body = p.body()
        flags = CRITICAL if isinstance(p, RawPayload) and p.critical else 0
        if len(body) + 4 > 0xFFFF:
            raise IKEv2Error("payload too long")
        out += struct.pack("!BBH", nxt, flags, len(body) + 4) + body
    first = payloads[0].type if payloads else PayloadType.NONE
    return first, bytes(out)


def encode_message(header: Header, payloads: list[Payload]) -> bytes:
    first, body = encode_chain(payloads)
    return header.encode(first, HEADER_LEN + len(body)) + body


def decode_chain(first: int, data: bytes) -> list[Payload]:
    payloads: list[Payload] = []
    nxt, pos = first, 0
    while nxt != PayloadType.NONE:
        if pos + 4 > len(data):
            raise IKEv2Error(f"payload {nxt} header truncated at offset {pos}")
        following, flags, length = struct.unpack_from("!BBH", data, pos)
        if length < 4 or pos + length > len(data):
            raise IKEv2Error(f"payload {nxt} length {length} overruns the message")
        body = data[pos + 4:pos + length]
        if nxt == PayloadType.SK:
            payloads.append(EncryptedPayload(following, body))
            return payloads  # whatever follows is inside the SK payload
        payloads.append(_decode_body(nxt, body, bool(flags & CRITICAL)))
        nxt, pos = following, pos + length
    if pos != len(data):
        raise IKEv2Error(f"{len(data) - pos} trailing bytes after the last payload")
    return payloads


def decode_message(data: bytes) -> tuple[Header, list[Payload]]:
    header = decode_header(data)
    return header, decode_chain(header.next_payload, data[HEADER_LEN:])


def _decode_body(ptype: int, body: bytes, critical: bool) -> Payload:
    if ptype == PayloadType.SA:
        return SAPayload(_decode_proposals(body))
    if ptype == PayloadType.KE:
        _need(body, 4, "KE")
        return KEPayload(struct.unpack_from("!H", body)[0], body[4:])
    if ptype == PayloadType.NONCE:
        return NoncePayload(body)
    if ptype == PayloadType.NOTIFY:
        _need(body, 4, "Notify")
        proto, spi_size, ntype = struct.unpack_from("!BBH", body)
        _need(body, 4 + spi_size, "Notify SPI")
        return NotifyPayload(ntype, body[4 + spi_size:], proto, body[4:4 + spi_size])
    if ptype in (PayloadType.IDI, PayloadType.IDR):
        _need(body, 4, "ID")
        return IdPayload(ptype, body[0], body[4:])
    if ptype == PayloadType.AUTH:
        _need(body, 4, "AUTH")
        return AuthPayload(body[0], body[4:])
    if ptype == PayloadType.DELETE:
        _need(body, 4, "Delete")
        proto, spi_size, count = struct.unpack_from("!BBH", body)
        if len(body) != 4 + spi_size * count:
            raise IKEv2Error("Delete payload SPI list does not match its count")
        return DeletePayload(proto, tuple(body[4 + i * spi_size:4 + (i + 1) * spi_size]
                                          for i in range(count)))
    if ptype in (PayloadType.TSI, PayloadType.TSR):
        return TSPayload(ptype, _decode_selectors(body))
    if ptype in (PayloadType.CERT, PayloadType.CERTREQ):
        _need(body, 1, "CERT")
        return CertPayload(ptype, body[0], body[1:])
    if ptype == PayloadType.CP:
        return _decode_config(body)
    return RawPayload(ptype, body, critical)


def _decode_config(body: bytes) -> ConfigPayload:
    _need(body, 4, "CP")
    attributes: list[tuple[int, bytes]] = []
    pos = 4
    while pos < len(body):
        if pos + 4 > len(body):
            raise IKEv2Error("configuration attribute truncated")
        attr, length = struct.unpack_from("!HH", body, pos)
        if pos + 4 + length > len(body):
            raise IKEv2Error("configuration attribute overruns the CP payload")
        attributes.append((attr & 0x7FFF, body[pos + 4:pos + 4 + length]))
        pos += 4 + length
    return ConfigPayload(body[0], tuple(attributes))


def _need(body: bytes, n: int, what: str) -> None:
    if len(body) < n:
        raise IKEv2Error(f"{what} payload of {len(body)} bytes is shorter than {n}")


def _decode_proposals(body: bytes) -> tuple[Proposal, ...]:
    proposals: list[Proposal] = []
    pos, more = 0, True
    while more:
        if pos + 8 > len(body):
            raise IKEv2Error("proposal header truncated")
        last, _, length, number, proto, spi_size, ntrans = struct.unpack_from("!BBHBBBB",
                                                                              body, pos)
        if last not in (0, 2) or length < 8 + spi_size or pos + length > len(body):
            raise IKEv2Error("malformed proposal substructure")
        spi = body[pos + 8:pos + 8 + spi_size]
        transforms = _decode_transforms(body[pos + 8 + spi_size:pos + length], ntrans)
        proposals.append(Proposal(number, proto, transforms, spi))
        pos += length
        more = last == 2
    if pos != len(body):
        raise IKEv2Error("trailing bytes after the last proposal")
    return tuple(proposals)


def _decode_transforms(body: bytes, count: int) -> tuple[Transform, ...]:
    transforms: list[Transform] = []
    pos = 0
    for i in range(count):
        if pos + 8 > len(body):
            raise IKEv2Error("transform header truncated")
        last, _, length, ttype, _, tid = struct.unpack_from("!BBHBBH", body, pos)
        if length < 8 or pos + length > len(body) or last != (0 if i == count - 1 else 3):
            raise IKEv2Error("malformed transform substructure")
        key_length = None
        apos = pos + 8
        while apos < pos + length:
            if apos + 4 > pos + length:
                raise IKEv2Error("transform attribute truncated")
            atype, value = struct.unpack_from("!HH", body, apos)
            if atype & 0x8000:
                apos += 4
            else:  # TLV attribute: value is a length; none are defined for IKEv2, skip it
                apos += 4 + value
                if apos > pos + length:
                    raise IKEv2Error("transform attribute overruns the transform")
                continue
            if atype & 0x7FFF == KEY_LENGTH_ATTRIBUTE:
                key_length = value
        transforms.append(Transform(ttype, tid, key_length))
        pos += length
    if pos != len(body):
        raise IKEv2Error("proposal transform count does not match its length")
    return tuple(transforms)


def _decode_selectors(body: bytes) -> tuple[TrafficSelector, ...]:
    _need(body, 4, "TS")
    count = body[0]
    selectors: list[TrafficSelector] = []
    pos = 4
    for _ in range(count):
        if pos + 4 > len(body):
            raise IKEv2Error("traffic selector truncated")
        ts_type, proto, length = struct.unpack_from("!BBH", body, pos)
        if length < 8 or pos + length > len(body):
            raise IKEv2Error("traffic selector length overruns the payload")
        if ts_type == TS_IPV4_ADDR_RANGE and length == 16:
            sport, eport = struct.unpack_from("!HH", body, pos + 4)
            selectors.append(TrafficSelector(
                ipaddress.IPv4Address(body[pos + 8:pos + 12]),
                ipaddress.IPv4Address(body[pos + 12:pos + 16]), proto, sport, eport))
        pos += length  # IPv6 and other selector types are skipped: the probe speaks IPv4 inside
    if pos != len(body):
        raise IKEv2Error("trailing bytes after the last traffic selector")
    return tuple(selectors)


def find_notify(payloads: list[Payload], ntype: int) -> NotifyPayload | None:
    return next((p for p in payloads if isinstance(p, NotifyPayload) and p.notify_type == ntype),
                None)


def first_error_notify(payloads: list[Payload]) -> NotifyPayload | None:
    return next((p for p in payloads if isinstance(p, NotifyPayload) and p.is_error), None)
