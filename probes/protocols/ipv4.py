"""The IPv4 packets a check sends and reads *inside* a tunnel: ICMP echoes, UDP datagrams, TCP
segments and the ICMP errors that quote them. Sans-I/O: bytes in, bytes or values out.

Building is exact (checksums included: a node drops what does not add up). Reading never
raises: :func:`parse` returns one of the packet types below, or None for anything else —
truncated, fragmented, options we do not read, a protocol we do not speak. The tunnel that
carried a packet authenticated it; a packet that parses is still only a claim, which the check
matches against what it sent.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from probes.protocols.inet import checksum

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
DEFAULT_TTL = 64
_DONT_FRAGMENT = 0x4000
_MORE_FRAGMENTS = 0x2000
_OFFSET_MASK = 0x1FFF

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_ICMP = struct.Struct("!BBHHH")
_UDP = struct.Struct("!HHHH")
_TCP = struct.Struct("!HHIIBBHHH")
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
_TCP_OPTION_MSS = 2

# ICMP destination-unreachable codes, by name for details
UNREACH_CODES = {0: "net unreachable", 1: "host unreachable", 2: "protocol unreachable",
                 3: "port unreachable", 4: "fragmentation needed", 9: "net prohibited",
                 10: "host prohibited", 13: "administratively prohibited"}


def _addr(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def ipv4_packet(src: str, dst: str, proto: int, payload: bytes, *, ident: int = 0,
                ttl: int = DEFAULT_TTL) -> bytes:
    """An IPv4 header (DF set, no options) in front of ``payload``."""
    header = _IPV4.pack(0x45, 0, _IPV4.size + len(payload), ident & 0xFFFF, _DONT_FRAGMENT,
                        ttl, proto, 0, _addr(src), _addr(dst))
    return header[:10] + checksum(header).to_bytes(2, "big") + header[12:] + payload


def icmp_echo(ident: int, seq: int, payload: bytes, *, reply: bool = False) -> bytes:
    """An ICMP echo request (or reply) message, checksummed."""
    kind = ICMP_ECHO_REPLY if reply else ICMP_ECHO_REQUEST
    header = _ICMP.pack(kind, 0, 0, ident & 0xFFFF, seq & 0xFFFF)
    csum = checksum(header + payload)
    return _ICMP.pack(kind, 0, csum, ident & 0xFFFF, seq & 0xFFFF) + payload


def echo_packet(src: str, dst: str, ident: int, seq: int, payload: bytes) -> bytes:
    """An IPv4 packet carrying an ICMP echo request from ``src`` to ``dst``."""
    return ipv4_packet(src, dst, PROTO_ICMP, icmp_echo(ident, seq, payload))


def _pseudo_header(src: str, dst: str, proto: int, length: int) -> bytes:
    return _addr(src) + _addr(dst) + struct.pack("!BBH", 0, proto, length)


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4 packet carrying one UDP datagram (checksum over the pseudo header)."""
    length = _UDP.size + len(payload)
    segment = _UDP.pack(sport, dport, length, 0) + payload
    csum = checksum(_pseudo_header(src, dst, PROTO_UDP, length) + segment) or 0xFFFF
    return ipv4_packet(src, dst, PROTO_UDP, segment[:6] + csum.to_bytes(2, "big") + segment[8:])


def tcp_packet(src: str, dst: str, sport: int, dport: int, *, seq: int, ack: int, flags: int,
               window: int, payload: bytes = b"", mss: int | None = None) -> bytes:
    """An IPv4 packet carrying one TCP segment (with an MSS option when ``mss`` is given: a
    SYN's), checksum over the pseudo header."""
    options = struct.pack("!BBH", _TCP_OPTION_MSS, 4, mss) if mss is not None else b""
    offset = (_TCP.size + len(options)) // 4
    header = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, offset << 4, flags,
                       window, 0, 0) + options
    segment = header + payload
    csum = checksum(_pseudo_header(src, dst, PROTO_TCP, len(segment)) + segment)
    return ipv4_packet(src, dst, PROTO_TCP, segment[:16] + csum.to_bytes(2, "big") + segment[18:])


# ------------------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class EchoReply:
    src: str
    ident: int
    seq: int


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    src: str
    dst: str
    sport: int
    dport: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class IcmpError:
    """An ICMP error (unreachable, time exceeded) about a packet we sent: who said it, what, and
    the quoted packet's protocol, destination and first two 16-bit words after its header (UDP
    ports, or an echo's id and sequence)."""

    src: str  # the router or host that reported it
    type: int
    code: int
    proto: int
    dst: str
    first: int  # source port, or echo identifier
    second: int  # destination port, or echo sequence

    def describe(self) -> str:
        if self.type == ICMP_DEST_UNREACH:
            what = UNREACH_CODES.get(self.code, f"unreachable (code {self.code})")
        elif self.type == ICMP_TIME_EXCEEDED:
            what = "time exceeded"
        else:
            what = f"ICMP type {self.type} code {self.code}"
        return f"{what} from {self.src}"


@dataclass(frozen=True, slots=True)
class TcpSegment:
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes


Packet = EchoReply | UdpDatagram | TcpSegment | IcmpError


def _ip_header(packet: bytes) -> tuple[int, int, str, str] | None:
    """(header length, protocol, src, dst) of an unfragmented IPv4 packet, or None."""
    if len(packet) < _IPV4.size or packet[0] >> 4 != 4:
        return None
    header = (packet[0] & 0x0F) * 4
    total = int.from_bytes(packet[2:4], "big")
    fragment = int.from_bytes(packet[6:8], "big")
    if header < _IPV4.size or total < header or len(packet) < header:
        return None
    if fragment & (_MORE_FRAGMENTS | _OFFSET_MASK):
        return None  # a fragment: what we send fits, so this is not an answer we read
    return (header, packet[9], str(ipaddress.IPv4Address(packet[12:16])),
            str(ipaddress.IPv4Address(packet[16:20])))


def parse(packet: bytes) -> Packet | None:
    """What an inner IPv4 packet is, or None (never raises)."""
    head = _ip_header(packet)
    if head is None:
        return None
    size, proto, src, dst = head
    total = min(int.from_bytes(packet[2:4], "big"), len(packet))
    body = packet[size:total]
    if proto == PROTO_ICMP:
        return _parse_icmp(src, body)
    if proto == PROTO_UDP:
        if len(body) < _UDP.size:
            return None
        sport, dport, length, _ = _UDP.unpack_from(body)
        if not _UDP.size <= length <= len(body):
            return None
        return UdpDatagram(src, dst, sport, dport, body[_UDP.size:length])
    if proto == PROTO_TCP:
        if len(body) < _TCP.size:
            return None
        sport, dport, seq, ack, offset, flags, window, _, _ = _TCP.unpack_from(body)
        start = (offset >> 4) * 4
        if not _TCP.size <= start <= len(body):
            return None
        return TcpSegment(src, dst, sport, dport, seq, ack, flags, window, body[start:])
    return None


def _parse_icmp(src: str, body: bytes) -> EchoReply | IcmpError | None:
    if len(body) < _ICMP.size:
        return None
    kind, code, _, first, second = _ICMP.unpack_from(body)
    if kind == ICMP_ECHO_REPLY and code == 0:
        return EchoReply(src, first, second)
    if kind not in (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED):
        return None
    quoted = body[_ICMP.size:]
    head = _ip_header(quoted)
    if head is None:
        return None
    size, proto, _qsrc, qdst = head
    words = quoted[size:size + 8]
    if len(words) < 8:
        return None
    if proto == PROTO_ICMP:  # the quoted echo request: its identifier and sequence
        qfirst, qsecond = struct.unpack_from("!HH", words, 4)
    else:  # UDP and TCP start with the two ports
        qfirst, qsecond = struct.unpack_from("!HH", words)
    return IcmpError(src, kind, code, proto, qdst, qfirst, qsecond)
