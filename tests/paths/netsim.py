"""A simulated IPv4 path for the trace core's unit tests (a stand-in where a real network would
need a lab: the lab tests in test_paths_lab.py run the same core on real routers).

Routers answer a probe whose TTL runs out at them with ICMP time exceeded, quoting the probe's
IP header and 8 bytes (RFC 792) or more (RFC 1812); the node answers as configured. Faults: a
black hole after a hop, a smaller MTU after a hop (with or without frag-needed), ICMP rate
limiting, a router saying unreachable, a forwarding loop, per-flow ECMP.
"""

from __future__ import annotations

import heapq
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from probes.protocols.inet import checksum
from probes.protocols.traceroute import TraceCore


def ip_header(src: str, dst: str, proto: int, payload_len: int, ttl: int = 64,
              ident: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, ident, 0, ttl, proto, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:]


def icmp_packet(src: str, dst: str, icmp_type: int, code: int, rest: int, body: bytes) -> bytes:
    head = struct.pack("!BBHI", icmp_type, code, 0, rest)
    csum = checksum(head + body)
    icmp = struct.pack("!BBHI", icmp_type, code, csum, rest) + body
    return ip_header(src, dst, 1, len(icmp)) + icmp


@dataclass
class SimNet:
    """``routes(sport)``: the routers (addresses) a flow crosses, hop 1 first; the node sits
    one hop after the last."""

    node: str
    routes: Callable[[int], list[str]]
    node_answers: bool = True  # UDP: port unreachable (closed port); False: a silent VPN port
    black_hole_after: int | None = None  # packets crossing the router at this hop vanish
    mtu_after: tuple[int, int, bool] | None = None  # (hop, mtu, frag-needed sent)
    rate_limit: dict[int, int] = field(default_factory=dict)  # hop -> answers every n-th
    unreachable_at: int | None = None  # this hop answers host unreachable beyond itself
    quote: int = 8  # transport bytes quoted by routers
    tcp_open: bool = False
    delay: float = 0.001
    sent: list[bytes] = field(default_factory=list)
    _counts: dict[int, int] = field(default_factory=dict)

    def respond(self, packet: bytes) -> list[bytes]:
        self.sent.append(packet)
        ihl = (packet[0] & 0x0F) * 4
        ttl, proto = packet[8], packet[9]
        src = str(ipaddress.IPv4Address(packet[12:16]))
        total = struct.unpack_from("!H", packet, 2)[0]
        l4 = packet[ihl:]
        sport = struct.unpack_from("!H", l4, 0)[0] if proto != 1 else struct.unpack_from(
            "!H", l4, 4)[0]
        route = self.routes(sport)
        for hop, router in enumerate(route, start=1):
            if self.mtu_after is not None and hop == self.mtu_after[0] + 1 and ttl >= hop:
                _at, mtu, tell = self.mtu_after
                if total > mtu:  # the router before this link cannot forward it
                    if not tell:
                        return []
                    prev = route[hop - 2]
                    return [icmp_packet(prev, src, 3, 4, mtu, packet[:ihl + self.quote])]
            if ttl == hop:
                return self._router_answer(hop, router, src, packet[:ihl + self.quote], 11, 0)
            if self.unreachable_at == hop:
                return self._router_answer(hop, router, src, packet[:ihl + self.quote], 3, 1)
            if self.black_hole_after == hop:
                return []
        if (self.mtu_after is not None and self.mtu_after[0] == len(route)
                and total > self.mtu_after[1]):
            return []
        return self._node_answer(packet, ihl, proto, src, l4)

    def _router_answer(self, hop: int, router: str, to: str, quoted: bytes, icmp_type: int,
                       code: int) -> list[bytes]:
        every = self.rate_limit.get(hop)
        if every:
            self._counts[hop] = self._counts.get(hop, 0) + 1
            if self._counts[hop] % every:
                return []
        return [icmp_packet(router, to, icmp_type, code, 0, quoted)]

    def _node_answer(self, packet: bytes, ihl: int, proto: int, to: str,
                     l4: bytes) -> list[bytes]:
        if proto == 17:
            if not self.node_answers:
                return []
            return [icmp_packet(self.node, to, 3, 3, 0, packet[:ihl + self.quote])]
        if proto == 6:
            sport, dport, seq = struct.unpack_from("!HHI", l4)
            data = len(l4) - 20
            flags = 0x12 if self.tcp_open else 0x14
            ack = (seq + 1 + (0 if self.tcp_open else data)) & 0xFFFFFFFF
            seg = struct.pack("!HHIIBBHHH", dport, sport, 1000, ack, 5 << 4, flags, 0, 0, 0)
            return [ip_header(self.node, to, 6, len(seg)) + seg]
        icmp_type = l4[0]
        if icmp_type != 8 or not self.node_answers:
            return []
        return [icmp_packet(self.node, to, 0, 0, struct.unpack_from("!I", l4, 4)[0], l4[8:])]


def drive(core: TraceCore, net: SimNet, *, limit: float = 120.0,
          extra: Callable[[float], list[bytes]] | None = None) -> float:
    """Run ``core`` against ``net`` on a simulated clock; returns the simulated duration."""
    now = 0.0
    core.start(now)
    inbox: list[tuple[float, int, bytes]] = []
    n = 0
    while not core.done and now < limit:
        core.handle_timer(now)
        for packet in core.datagrams_to_send(now):
            for reply in net.respond(packet):
                n += 1
                heapq.heappush(inbox, (now + net.delay, n, reply))
        if extra is not None:
            for junk in extra(now):
                core.receive_datagram(junk, None, now)
        while inbox and inbox[0][0] <= now:
            _, _, reply = heapq.heappop(inbox)
            core.receive_datagram(reply, None, now)
        if core.done:
            break
        times = [t for t in (core.get_timer(), inbox[0][0] if inbox else None) if t is not None]
        if not times:
            break
        now = max(now, min(times))
    return now
