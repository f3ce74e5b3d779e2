"""HTTP capsules (RFC 9297 §3.2) and the CONNECT-IP capsule payloads (RFC 9484 §4.7).

Sans-I/O: bytes in, capsules out. A capsule is ``Type (i) ‖ Length (i) ‖ Value``, with QUIC
variable-length integers (RFC 9000 §16: 1, 2, 4 or 8 bytes, the two high bits of the first byte
give the size; non-minimal encodings are legal and accepted). On HTTP/3 the capsules of an
extended-CONNECT stream travel in the payload of DATA frames, so the stream is a byte stream that
may split a capsule anywhere: :class:`CapsuleParser` buffers across ``feed`` calls.

Bad bytes raise :class:`CapsuleError` (a ``ValueError``) and nothing else. Unknown capsule types
are returned as :class:`Capsule` values too: RFC 9297 says a receiver skips them, the caller does.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

MAX_VARINT = (1 << 62) - 1
# a capsule this large on a probe's stream is an attack or a bug, not data worth buffering
DEFAULT_MAX_CAPSULE_LENGTH = 1 << 16

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class CapsuleError(ValueError):
    """Malformed capsule bytes (the stream must be aborted, RFC 9297 §3.3)."""


class CapsuleType(enum.IntEnum):
    DATAGRAM = 0x00  # RFC 9297 §3.5
    ADDRESS_ASSIGN = 0x01  # RFC 9484 §4.7.1
    ADDRESS_REQUEST = 0x02  # RFC 9484 §4.7.2
    ROUTE_ADVERTISEMENT = 0x03  # RFC 9484 §4.7.3


# ------------------------------------------------------------------------------ varints


def encode_varint(value: int) -> bytes:
    """The shortest QUIC variable-length encoding of ``value`` (0 .. 2**62-1)."""
    if value < 0 or value > MAX_VARINT:
        raise CapsuleError(f"varint out of range: {value}")
    if value < 1 << 6:
        return value.to_bytes(1, "big")
    if value < 1 << 14:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 1 << 30:
        return (value | 0x8000_0000).to_bytes(4, "big")
    return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")


def decode_varint(data: bytes | memoryview, offset: int = 0) -> tuple[int, int]:
    """``(value, next_offset)``; raises :class:`CapsuleError` when the bytes run out."""
    if offset >= len(data):
        raise CapsuleError("truncated varint")
    size = 1 << (data[offset] >> 6)
    end = offset + size
    if end > len(data):
        raise CapsuleError("truncated varint")
    value = int.from_bytes(data[offset:end], "big") & ((1 << (8 * size - 2)) - 1)
    return value, end


# ------------------------------------------------------------------------------ capsules


@dataclass(frozen=True, slots=True)
class Capsule:
    type: int
    value: bytes


def encode_capsule(capsule_type: int, value: bytes) -> bytes:
    return encode_varint(capsule_type) + encode_varint(len(value)) + value


class CapsuleParser:
    """Incremental capsule reader for one stream: ``feed(bytes) -> [Capsule]``.

    ``end()`` at the end of the stream raises if a capsule was cut short there.
    """

    def __init__(self, max_capsule_length: int = DEFAULT_MAX_CAPSULE_LENGTH) -> None:
        self._buffer = bytearray()
        self._max = max_capsule_length

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Capsule]:
        self._buffer += data
        out: list[Capsule] = []
        view = memoryview(self._buffer)
        offset = 0
        try:
            while offset < len(view):
                try:
                    capsule_type, pos = decode_varint(view, offset)
                    length, pos = decode_varint(view, pos)
                except CapsuleError:
                    break  # header not complete yet
                if length > self._max:
                    raise CapsuleError(f"capsule length {length} over limit {self._max}")
                if pos + length > len(view):
                    break
                out.append(Capsule(capsule_type, bytes(view[pos:pos + length])))
                offset = pos + length
        finally:
            view.release()
        del self._buffer[:offset]
        return out

    def end(self) -> None:
        if self._buffer:
            raise CapsuleError(f"stream ended inside a capsule ({len(self._buffer)} bytes left)")


def parse_capsules(data: bytes, max_capsule_length: int = DEFAULT_MAX_CAPSULE_LENGTH,
                   ) -> list[Capsule]:
    """Every capsule in a complete byte string (no trailing partial capsule allowed)."""
    parser = CapsuleParser(max_capsule_length)
    capsules = parser.feed(data)
    parser.end()
    return capsules


# ------------------------------------------------------------------ DATAGRAM capsule payload


def encode_http_datagram(context_id: int, payload: bytes) -> bytes:
    """HTTP Datagram Payload of CONNECT-UDP / CONNECT-IP: ``Context ID (i) ‖ payload``."""
    return encode_varint(context_id) + payload


def decode_http_datagram(data: bytes) -> tuple[int, bytes]:
    context_id, pos = decode_varint(data)
    return context_id, data[pos:]


# ------------------------------------------------------------- CONNECT-IP capsule payloads


@dataclass(frozen=True, slots=True)
class PrefixedAddress:
    """An Assigned Address (ADDRESS_ASSIGN) or Requested Address (ADDRESS_REQUEST)."""

    request_id: int
    address: IPAddress
    prefix_length: int

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(f"{self.address}/{self.prefix_length}", strict=False)


@dataclass(frozen=True, slots=True)
class AddressRange:
    """An IP Address Range of ROUTE_ADVERTISEMENT; ``ip_protocol`` 0 means every protocol."""

    start: IPAddress
    end: IPAddress
    ip_protocol: int


def _address_size(version: int) -> int:
    if version == 4:
        return 4
    if version == 6:
        return 16
    raise CapsuleError(f"IP version {version} is neither 4 nor 6")


def _read(data: bytes, pos: int, size: int, what: str) -> tuple[bytes, int]:
    if pos + size > len(data):
        raise CapsuleError(f"truncated {what}")
    return data[pos:pos + size], pos + size


def _read_address(data: bytes, pos: int) -> tuple[IPAddress, int]:
    raw_version, pos = _read(data, pos, 1, "IP version")
    raw, pos = _read(data, pos, _address_size(raw_version[0]), "IP address")
    return ipaddress.ip_address(raw), pos


def _address_bytes(address: IPAddress) -> bytes:
    return bytes([address.version]) + address.packed


def decode_prefixed_addresses(value: bytes, *, request: bool) -> list[PrefixedAddress]:
    """ADDRESS_ASSIGN (``request=False``) or ADDRESS_REQUEST (``request=True``) payload.

    An empty ADDRESS_ASSIGN is legal (it withdraws every address); an ADDRESS_REQUEST must ask
    for something, and its Request IDs must not be 0 (RFC 9484 §4.7.2).
    """
    out: list[PrefixedAddress] = []
    pos = 0
    while pos < len(value):
        request_id, pos = decode_varint(value, pos)
        address, pos = _read_address(value, pos)
        raw_prefix, pos = _read(value, pos, 1, "prefix length")
        prefix = raw_prefix[0]
        if prefix > address.max_prefixlen:
            raise CapsuleError(f"prefix length {prefix} too long for IPv{address.version}")
        if request and request_id == 0:
            raise CapsuleError("ADDRESS_REQUEST with request ID 0")
        out.append(PrefixedAddress(request_id, address, prefix))
    if request and not out:
        raise CapsuleError("empty ADDRESS_REQUEST")
    return out


def encode_prefixed_addresses(addresses: list[PrefixedAddress]) -> bytes:
    return b"".join(encode_varint(a.request_id) + _address_bytes(a.address)
                    + bytes([a.prefix_length]) for a in addresses)


def decode_route_advertisement(value: bytes) -> list[AddressRange]:
    """ROUTE_ADVERTISEMENT payload, with the RFC 9484 §4.7.3 ordering rules enforced:
    start <= end; ranges sorted by (IP version, IP protocol, start); ranges of one version and
    protocol do not overlap."""
    out: list[AddressRange] = []
    pos = 0
    while pos < len(value):
        raw_version, pos = _read(value, pos, 1, "IP version")
        size = _address_size(raw_version[0])
        raw_start, pos = _read(value, pos, size, "start address")
        raw_end, pos = _read(value, pos, size, "end address")
        raw_proto, pos = _read(value, pos, 1, "IP protocol")
        rng = AddressRange(ipaddress.ip_address(raw_start), ipaddress.ip_address(raw_end),
                           raw_proto[0])
        if int(rng.start) > int(rng.end):
            raise CapsuleError(f"range start {rng.start} after end {rng.end}")
        if out:
            prev = out[-1]
            prev_key = (prev.start.version, prev.ip_protocol)
            key = (rng.start.version, rng.ip_protocol)
            if key < prev_key or (key == prev_key and int(rng.start) <= int(prev.end)):
                raise CapsuleError("address ranges out of order or overlapping")
        out.append(rng)
    return out


def encode_route_advertisement(ranges: list[AddressRange]) -> bytes:
    return b"".join(bytes([r.start.version]) + r.start.packed + r.end.packed
                    + bytes([r.ip_protocol]) for r in ranges)
