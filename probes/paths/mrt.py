"""MRT routing table dumps (RFC 6396), sans-I/O: bytes in, (prefix, origin AS) out.

What a BGP speaker or a route collector writes with its RIB (RouteViews' and RIPE RIS's ``rib``
files, BIRD's ``protocol mrt``, ``gobgp mrt``): ``TABLE_DUMP_V2`` (RIB entries per prefix, one
per peer, each with the BGP path attributes; RFC 8050 add-path variants included) and the older
``TABLE_DUMP``. The origin of a route is the last AS of its AS_PATH (for a trailing AS_SET, its
smallest member); when the peers disagree (MOAS), the origin most of them carry wins, ties to
the smaller number. A route with an empty AS_PATH was originated by the dumping router itself:
its origin is the ``local_asn`` the caller names (unknown otherwise, and such routes are skipped).

Malformed records raise :class:`MrtError` naming the byte offset; nothing else escapes.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter
from collections.abc import Iterator

TABLE_DUMP, TABLE_DUMP_V2 = 12, 13
PEER_INDEX_TABLE = 1
RIB_IPV4_UNICAST, RIB_IPV6_UNICAST = 2, 4
RIB_IPV4_UNICAST_ADDPATH, RIB_IPV6_UNICAST_ADDPATH = 8, 10
_RIB_FAMILY = {RIB_IPV4_UNICAST: 4, RIB_IPV6_UNICAST: 6, RIB_IPV4_UNICAST_ADDPATH: 4,
               RIB_IPV6_UNICAST_ADDPATH: 6}
ATTR_AS_PATH = 2
AS_SET, AS_SEQUENCE = 1, 2
_HEADER = struct.Struct("!IHHI")


class MrtError(ValueError):
    """Not an MRT dump we can read."""


def looks_like_mrt(data: bytes) -> bool:
    if len(data) < _HEADER.size:
        return False
    _ts, mrt_type, _sub, _length = _HEADER.unpack_from(data)
    return mrt_type in (TABLE_DUMP, TABLE_DUMP_V2)


def origins(data: bytes, local_asn: int | None = None) -> Iterator[tuple[str, int]]:
    """(prefix, origin AS) for every route in the dump; other record types are skipped."""
    offset = 0
    peers: list[int] = []  # peer AS by peer index
    while offset < len(data):
        if len(data) - offset < _HEADER.size:
            raise MrtError(f"truncated MRT header at byte {offset}")
        _ts, mrt_type, subtype, length = _HEADER.unpack_from(data, offset)
        body_at = offset + _HEADER.size
        body = data[body_at:body_at + length]
        if len(body) < length:
            raise MrtError(f"record at byte {offset} claims {length} bytes, "
                           f"{len(body)} are left")
        try:
            if mrt_type == TABLE_DUMP_V2 and subtype == PEER_INDEX_TABLE:
                peers = _peer_index(body)
            elif mrt_type == TABLE_DUMP_V2 and subtype in _RIB_FAMILY:
                found = _rib(body, _RIB_FAMILY[subtype], subtype >= RIB_IPV4_UNICAST_ADDPATH,
                             peers, local_asn)
                if found is not None:
                    yield found
            elif mrt_type == TABLE_DUMP and subtype in (1, 2):
                found = _table_dump_v1(body, 4 if subtype == 1 else 16, local_asn)
                if found is not None:
                    yield found
        except (struct.error, IndexError, ValueError) as exc:
            raise MrtError(f"bad record at byte {offset}: {exc}") from None
        offset = body_at + length


def _peer_index(body: bytes) -> list[int]:
    at = 4  # collector BGP id
    (name_len,) = struct.unpack_from("!H", body, at)
    at += 2 + name_len
    (count,) = struct.unpack_from("!H", body, at)
    at += 2
    peers = []
    for _ in range(count):
        peer_type = body[at]
        at += 1 + 4  # type, peer BGP id
        at += 16 if peer_type & 1 else 4
        if peer_type & 2:
            (asn,) = struct.unpack_from("!I", body, at)
            at += 4
        else:
            (asn,) = struct.unpack_from("!H", body, at)
            at += 2
        peers.append(asn)
    return peers


def _prefix(raw: bytes, length: int, family: int) -> str:
    size = 4 if family == 4 else 16
    if length > size * 8:
        raise ValueError(f"prefix length {length}")
    packed = raw.ljust(size, b"\0")[:size]
    address = ipaddress.ip_address(packed)
    return str(ipaddress.ip_network(f"{address}/{length}", strict=False))


def _rib(body: bytes, family: int, addpath: bool, peers: list[int],
         local_asn: int | None) -> tuple[str, int] | None:
    at = 4  # sequence number
    length = body[at]
    at += 1
    nbytes = (length + 7) // 8
    prefix = _prefix(body[at:at + nbytes], length, family)
    at += nbytes
    (count,) = struct.unpack_from("!H", body, at)
    at += 2
    votes: Counter[int] = Counter()
    for _ in range(count):
        peer_index, _originated = struct.unpack_from("!HI", body, at)
        at += 6 + (4 if addpath else 0)
        (attr_len,) = struct.unpack_from("!H", body, at)
        at += 2
        attrs = body[at:at + attr_len]
        if len(attrs) < attr_len:
            raise ValueError("attributes run past the record")
        at += attr_len
        origin = _origin(_as_path(attrs, 4))
        if origin is None:
            origin = local_asn if local_asn else None
        if origin is None and peer_index < len(peers) and peers[peer_index]:
            continue  # a peer's route without a path: nothing to learn from it
        if origin is not None:
            votes[origin] += 1
    if not votes:
        return None
    best = max(votes.values())
    return prefix, min(a for a, n in votes.items() if n == best)


def _table_dump_v1(body: bytes, size: int, local_asn: int | None) -> tuple[str, int] | None:
    at = 4  # view, sequence
    raw = body[at:at + size]
    at += size
    length = body[at]
    at += 1 + 1 + 4 + size + 2  # prefix length, status, originated, peer ip, peer as
    (attr_len,) = struct.unpack_from("!H", body, at)
    at += 2
    origin = _origin(_as_path(body[at:at + attr_len], 2))  # v1 paths carry 2-byte ASNs
    if origin is None:
        origin = local_asn
    if origin is None:
        return None
    return _prefix(raw, length, 4 if size == 4 else 6), origin


def _as_path(attrs: bytes, as_size: int) -> list[tuple[int, list[int]]]:
    """The AS_PATH attribute's segments: (segment type, ASNs)."""
    at = 0
    while at + 3 <= len(attrs):
        flags, code = attrs[at], attrs[at + 1]
        if flags & 0x10:  # extended length
            (length,) = struct.unpack_from("!H", attrs, at + 2)
            at += 4
        else:
            length = attrs[at + 2]
            at += 3
        value = attrs[at:at + length]
        at += length
        if code != ATTR_AS_PATH:
            continue
        segments = []
        pos = 0
        fmt = "!I" if as_size == 4 else "!H"
        while pos + 2 <= len(value):
            seg_type, n = value[pos], value[pos + 1]
            pos += 2
            asns = [struct.unpack_from(fmt, value, pos + i * as_size)[0] for i in range(n)]
            pos += n * as_size
            segments.append((seg_type, asns))
        return segments
    return []


def _origin(segments: list[tuple[int, list[int]]]) -> int | None:
    for seg_type, asns in reversed(segments):
        if not asns:
            continue
        if seg_type == AS_SET:
            return min(asns)
        if seg_type == AS_SEQUENCE:
            return asns[-1]
    return None
