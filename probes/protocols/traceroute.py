"""Paris traceroute over IPv4, sans-I/O: probe packets out, ICMP/TCP packets and ``now`` in.

Why Paris: routers that balance per flow hash the addresses, the protocol and the first bytes
of the transport header. Classic traceroute changes the ports (or the ICMP checksum) per probe,
so consecutive TTLs may take different branches and the "path" it draws never existed. Here
every probe of a *flow* carries the same addresses, protocol, ports (ICMP: type, code,
identifier *and checksum*) and size; what tells the probes apart is outside the hash:

* the IP identification field (quoted back by every ICMP error), and
* for replies from the node itself, which quote nothing: the TCP sequence number (a SYN-ACK or
  RST acknowledges it) or the first two bytes of the ICMP echo payload, with two more bytes that
  keep the ICMP checksum constant (their one's-complement sum is fixed).

A trace probes several flows (different source ports, same destination port): with per-flow
load balancing they may take different branches, and a branch that loses the node's port shows
as the flows through it stopping while the others go on. The first flow is probed a second time
with large DF probes (``big_size``): a router whose next link is smaller answers
"fragmentation needed" with that link's MTU, or, if it filters those, the large probes vanish
where the small ones still pass (a PMTU black hole).

Per flow: up to ``window`` TTLs in flight, ``attempts`` tries per TTL ``probe_timeout`` apart
(a router that rate-limits its ICMP may answer the second), stop at the node's answer, at an
unreachable, at a forwarding loop (an address seen again after a different one), after
``gap_limit`` silent TTLs in a row (which is also how a path to a silent UDP port ends: the node
itself never answers junk on its VPN port), or at ``max_ttl``. Sending is paced at
``packets_per_second``.

The core takes whole IPv4 packets as a raw socket delivers them (ICMP, and TCP for TCP traces),
ignores everything that is not about its own probes, and never raises on bad input.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import deque
from dataclasses import dataclass, field

from probes.model import HopReply, PathFlow, TraceHop, TraceProtocol, TraceStop
from probes.protocols.inet import checksum

IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
ICMP_ECHO_REPLY, ICMP_UNREACH, ICMP_ECHO, ICMP_TIME_EXCEEDED = 0, 3, 8, 11
UNREACH_PROTOCOL, UNREACH_PORT, UNREACH_FRAG_NEEDED = 2, 3, 4
TCP_SYN, TCP_RST, TCP_ACK = 0x02, 0x04, 0x10
IP_DF = 0x4000

_IP = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_TCP = struct.Struct("!HHIIBBHHH")
_ICMP = struct.Struct("!BBHHH")
_MIN_SIZE = {TraceProtocol.UDP: 20 + 8, TraceProtocol.TCP: 20 + 20, TraceProtocol.ICMP: 20 + 8 + 4}
PAYLOAD = b"tunnelwatch path trace"  # what a capture on the node shows
_TERMINAL = frozenset({HopReply.UNREACHABLE, HopReply.PORT_UNREACHABLE, HopReply.ECHO_REPLY,
                       HopReply.TCP_SYN_ACK, HopReply.TCP_RESET, HopReply.FRAG_NEEDED})
_ONE = 1.0 - 1e-9  # a whole token, give or take float rounding of the refills
_FROM_NODE = frozenset({HopReply.PORT_UNREACHABLE, HopReply.ECHO_REPLY, HopReply.TCP_SYN_ACK,
                        HopReply.TCP_RESET})


@dataclass(frozen=True, slots=True)
class TraceSpec:
    """What to trace and how patiently. Addresses are IPv4 dotted quads."""

    source: str  # our address toward the target (L4 checksums cover it)
    target: str
    protocol: TraceProtocol
    port: int  # destination port; unused for ICMP
    flows: tuple[int, ...]  # flow ids: source ports (UDP, TCP) or ICMP identifiers
    size: int = 0  # IP size of the normal probes; 0: the smallest for the protocol
    big_size: int = 0  # IP size of the large DF probes on the first flow; 0: none
    first_ttl: int = 1
    max_ttl: int = 30
    attempts: int = 2
    probe_timeout: float = 1.0
    gap_limit: int = 3
    window: int = 4
    packets_per_second: float = 200.0
    id_base: int = 0  # first IP identification used; 0: the shell picks one at random

    def __post_init__(self) -> None:
        if not self.flows:
            raise ValueError("a trace needs at least one flow")
        if not 1 <= self.first_ttl <= self.max_ttl <= 255:
            raise ValueError("need 1 <= first_ttl <= max_ttl <= 255")
        if self.attempts < 1 or self.window < 1 or self.gap_limit < 1:
            raise ValueError("attempts, window and gap_limit must be >= 1")
        if not (self.probe_timeout > 0 and self.packets_per_second > 0):
            raise ValueError("probe_timeout and packets_per_second must be > 0")


@dataclass(slots=True)
class _Hop:
    ttl: int
    attempts: int = 0
    final: bool = False
    addr: str = ""
    reply: HopReply | None = None
    rtt: float | None = None
    mtu: int | None = None


@dataclass(slots=True)
class _Lane:
    """One flow at one probe size: the unit that is probed TTL by TTL."""

    index: int
    sport: int
    size: int
    next_ttl: int
    limit: int  # highest TTL worth probing (lowered by a terminal answer)
    hops: dict[int, _Hop] = field(default_factory=dict)
    outstanding: set[int] = field(default_factory=set)
    looped: bool = False
    stop: TraceStop | None = None


@dataclass(slots=True)
class _Probe:
    pid: int
    lane: _Lane
    ttl: int
    sent_at: float | None = None  # None while it waits in the send queue


class TraceCore:
    """One trace. Drive it: :meth:`start`, then repeatedly :meth:`datagrams_to_send`, feed
    every received packet to :meth:`receive_datagram`, call :meth:`handle_timer` at
    :meth:`get_timer`, until :attr:`done`; then :meth:`result`."""

    def __init__(self, spec: TraceSpec) -> None:
        self.spec = spec
        self._src = ipaddress.IPv4Address(spec.source).packed
        self._dst = ipaddress.IPv4Address(spec.target).packed
        self._proto = {TraceProtocol.UDP: IPPROTO_UDP, TraceProtocol.TCP: IPPROTO_TCP,
                       TraceProtocol.ICMP: IPPROTO_ICMP}[spec.protocol]
        small = max(spec.size, _MIN_SIZE[spec.protocol])
        self.lanes = [_Lane(i, sport & 0xFFFF, small, spec.first_ttl, spec.max_ttl)
                      for i, sport in enumerate(spec.flows)]
        if spec.big_size > small:
            self.lanes.append(_Lane(len(self.lanes), spec.flows[0] & 0xFFFF, spec.big_size,
                                    spec.first_ttl, spec.max_ttl))
        self._sports = {lane.sport for lane in self.lanes}
        self._next_pid = spec.id_base & 0xFFFF or 1  # 0 would let the kernel choose
        self._probes: dict[int, _Probe] = {}  # by IP id: every probe of a TTL not yet final
        self._queue: deque[_Probe] = deque()
        self._deadlines: deque[tuple[float, _Probe]] = deque()  # send order = deadline order
        self._tokens = self._burst
        self._refill_at = 0.0
        self.sent = 0
        self.received = 0  # packets that answered one of our probes
        self.started = False

    # ---------------------------------------------------------------- driving

    def start(self, now: float) -> None:
        self.started = True
        self._refill_at = now
        for lane in self.lanes:
            self._fill(lane)

    @property
    def done(self) -> bool:
        return self.started and all(lane.stop is not None for lane in self.lanes)

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Probes due now (paced). Each is a whole IPv4 packet for an IP_HDRINCL raw socket."""
        self._refill(now)
        out: list[bytes] = []
        while self._queue and self._tokens >= _ONE:
            probe = self._queue.popleft()
            if probe.lane.stop is not None or probe.pid not in self._probes:
                continue  # its lane ended while it waited
            self._tokens = max(0.0, self._tokens - 1.0)
            probe.sent_at = now
            self._deadlines.append((now + self.spec.probe_timeout, probe))
            out.append(self._packet(probe))
            self.sent += 1
        return out

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next needed (a probe's timeout, or pacing)."""
        times = []
        if self._deadlines:
            times.append(self._deadlines[0][0])
        if self._queue:
            short = _ONE - self._tokens
            # at least a microsecond: a wait shorter than float rounding would never refill
            times.append(self._refill_at if short <= 0 else self._refill_at + max(
                short / self.spec.packets_per_second, 1e-6))
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, probe = self._deadlines.popleft()
            if self._probes.get(probe.pid) is probe:
                self._timed_out(probe)

    def local_error(self, packet: bytes, mtu: int | None = None) -> None:
        """Our own stack refused to send ``packet`` (e.g. EMSGSIZE: bigger than the first
        link): that lane cannot be probed; the others go on."""
        if len(packet) < _IP.size:
            return
        probe = self._probes.get(struct.unpack_from("!H", packet, 4)[0])
        if probe is None:
            return
        hop = probe.lane.hops.get(probe.ttl)
        if hop is not None and mtu:
            hop.mtu = mtu
        self._end(probe.lane, TraceStop.LOCAL_ERROR)

    def receive_datagram(self, data: bytes, addr: object, now: float) -> None:
        """A packet from the raw socket (IPv4 header included). Anything that does not answer
        one of our probes is ignored; malformed bytes never raise."""
        try:
            found = self._match(data)
        except (struct.error, ValueError, IndexError):
            return
        if found is None:
            return
        probe, responder, reply, mtu = found
        self.received += 1
        self._answered(probe, responder, reply, mtu, now)

    # ---------------------------------------------------------------- result

    def result(self) -> list[PathFlow]:
        """Every lane as a flow, small probes first; trailing silent hops are left out."""
        flows = []
        for lane in self.lanes:
            ttls = sorted(t for t, h in lane.hops.items() if h.final)
            answered = [t for t in ttls if lane.hops[t].addr]
            last = answered[-1] if answered else 0
            hops = [TraceHop(ttl=t, addr=h.addr, reply=h.reply,
                             rtt_seconds=None if h.rtt is None else round(h.rtt, 6), mtu=h.mtu)
                    for t in ttls if t <= last for h in (lane.hops[t],)]
            flows.append(PathFlow(sport=lane.sport, size=lane.size,
                                  stop=lane.stop or TraceStop.MAX_TTL, hops=hops))
        return flows

    # ---------------------------------------------------------------- probing

    def _fill(self, lane: _Lane) -> None:
        spec = self.spec
        while (lane.stop is None and len(lane.outstanding) < spec.window
               and lane.next_ttl <= lane.limit and not self._gap_reached(lane, ahead=True)):
            ttl = lane.next_ttl
            lane.next_ttl += 1
            lane.hops[ttl] = _Hop(ttl)
            lane.outstanding.add(ttl)
            self._queue_probe(lane, ttl)
        self._maybe_done(lane)

    def _queue_probe(self, lane: _Lane, ttl: int) -> None:
        pid = self._next_pid
        self._next_pid = (pid + 1) & 0xFFFF or 1  # 0 lets the kernel choose: never use it
        stale = self._probes.pop(pid, None)  # 65,535 probes later: the old one is long final
        if stale is not None:
            stale.lane.outstanding.discard(stale.ttl)
        probe = _Probe(pid, lane, ttl)
        self._probes[pid] = probe
        lane.hops[ttl].attempts += 1
        self._queue.append(probe)

    def _timed_out(self, probe: _Probe) -> None:
        lane, hop = probe.lane, probe.lane.hops.get(probe.ttl)
        if hop is None or hop.final or lane.stop is not None:
            self._probes.pop(probe.pid, None)
            return
        # the old attempt stays matchable until the hop is final: a late answer still counts
        if hop.attempts < self.spec.attempts:
            self._queue_probe(lane, probe.ttl)
            return
        self._finalise(lane, hop)
        self._fill(lane)

    def _answered(self, probe: _Probe, responder: str, reply: HopReply, mtu: int | None,
                  now: float) -> None:
        lane = probe.lane
        hop = lane.hops.get(probe.ttl)
        if hop is None or hop.final or lane.stop is not None:
            return
        hop.addr, hop.reply, hop.mtu = responder, reply, mtu
        hop.rtt = None if probe.sent_at is None else max(0.0, now - probe.sent_at)
        self._finalise(lane, hop)
        if reply in _TERMINAL:
            self._cut(lane, probe.ttl)
        elif self._loops(lane, hop):
            self._cut(lane, probe.ttl, TraceStop.LOOP)
        self._fill(lane)

    def _finalise(self, lane: _Lane, hop: _Hop) -> None:
        hop.final = True
        lane.outstanding.discard(hop.ttl)
        for pid in [p.pid for p in self._probes.values() if p.lane is lane and p.ttl == hop.ttl]:
            del self._probes[pid]

    def _cut(self, lane: _Lane, ttl: int, stop: TraceStop | None = None) -> None:
        """Nothing beyond ``ttl`` is worth probing on this lane."""
        lane.limit = min(lane.limit, ttl)
        for beyond in [t for t in lane.hops if t > lane.limit]:
            del lane.hops[beyond]
            lane.outstanding.discard(beyond)
        for pid in [p.pid for p in self._probes.values() if p.lane is lane and p.ttl > ttl]:
            del self._probes[pid]
        lane.looped = lane.looped or stop is TraceStop.LOOP

    def _loops(self, lane: _Lane, hop: _Hop) -> bool:
        """The same address two or more TTLs apart with a different one between: a loop.
        (The same address on adjacent TTLs is not: some routers forward TTL 1 packets.)"""
        for other in lane.hops.values():
            if other is hop or not other.addr or other.addr != hop.addr:
                continue
            lo, hi = sorted((other.ttl, hop.ttl))
            if any(lane.hops[t].addr and lane.hops[t].addr != hop.addr
                   for t in range(lo + 1, hi) if t in lane.hops):
                return True
        return False

    def _gap_reached(self, lane: _Lane, *, ahead: bool = False) -> bool:
        """``gap_limit`` TTLs in a row at the top answered nothing (``ahead``: counting the
        ones still in flight, which need not be joined by more)."""
        top = lane.next_ttl - 1
        for count, ttl in enumerate(range(top, self.spec.first_ttl - 1, -1), start=1):
            hop = lane.hops.get(ttl)
            if hop is None or hop.addr or not (hop.final or ahead):
                return False
            if count >= self.spec.gap_limit:
                return True
        return False

    def _maybe_done(self, lane: _Lane) -> None:
        if lane.stop is not None or lane.outstanding:
            return
        answered = [lane.hops[t] for t in sorted(lane.hops) if lane.hops[t].addr]
        last = answered[-1] if answered else None
        if lane.looped:
            self._end(lane, TraceStop.LOOP)
        elif last is not None and last.reply in _TERMINAL and last.ttl == lane.limit:
            self._end(lane, TraceStop.REACHED if last.reply in _FROM_NODE
                      else TraceStop.UNREACHABLE)
        elif self._gap_reached(lane):
            self._end(lane, TraceStop.GAP)
        elif lane.next_ttl > lane.limit:
            self._end(lane, TraceStop.MAX_TTL)

    def _end(self, lane: _Lane, stop: TraceStop) -> None:
        lane.stop = stop
        lane.outstanding.clear()
        for pid in [p.pid for p in self._probes.values() if p.lane is lane]:
            del self._probes[pid]

    @property
    def _burst(self) -> float:
        return max(1.0, self.spec.packets_per_second / 20)  # 50 ms worth of probes at once

    def _refill(self, now: float) -> None:
        rate = self.spec.packets_per_second
        self._tokens = min(self._burst, self._tokens + max(0.0, now - self._refill_at) * rate)
        self._refill_at = now

    # ---------------------------------------------------------------- packets

    def _packet(self, probe: _Probe) -> bytes:
        lane = probe.lane
        if self._proto == IPPROTO_UDP:
            payload = _pad(PAYLOAD, lane.size - 28)
            length = _UDP.size + len(payload)
            pseudo = self._src + self._dst + struct.pack("!BBH", 0, IPPROTO_UDP, length)
            header = _UDP.pack(lane.sport, self.spec.port, length, 0)
            csum = checksum(pseudo + header + payload) or 0xFFFF
            l4 = _UDP.pack(lane.sport, self.spec.port, length, csum) + payload
        elif self._proto == IPPROTO_TCP:
            payload = _pad(b"", lane.size - 40)
            seq = self._seq(probe.pid)
            header = _TCP.pack(lane.sport, self.spec.port, seq, 0, 5 << 4, TCP_SYN, 65535, 0, 0)
            pseudo = self._src + self._dst + struct.pack("!BBH", 0, IPPROTO_TCP,
                                                        len(header) + len(payload))
            csum = checksum(pseudo + header + payload)
            l4 = header[:16] + struct.pack("!H", csum) + header[18:] + payload
        else:
            # the echo payload starts with the probe id and its complement: their sum, and so
            # the ICMP checksum, is the same for every probe of the flow (Paris ICMP)
            body = struct.pack("!HH", probe.pid, 0xFFFF - probe.pid) + _pad(PAYLOAD,
                                                                           lane.size - 32)
            header = _ICMP.pack(ICMP_ECHO, 0, 0, lane.sport, 0)
            csum = checksum(header + body)
            l4 = _ICMP.pack(ICMP_ECHO, 0, csum, lane.sport, 0) + body
        ip = _IP.pack(0x45, 0, 20 + len(l4), probe.pid, IP_DF, probe.ttl, self._proto, 0,
                      self._src, self._dst)
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        return ip + l4

    def _seq(self, pid: int) -> int:
        return (0x7477_0000 + pid) & 0xFFFFFFFF  # "tw" + probe id: a SYN-ACK acks seq + 1

    def _match(self, data: bytes) -> tuple[_Probe, str, HopReply, int | None] | None:
        ihl, proto, src, _dst, body = _ip(data)
        if proto == IPPROTO_TCP:
            return self._match_tcp(src, body) if ihl else None
        if proto != IPPROTO_ICMP or len(body) < 8:
            return None
        icmp_type, code = body[0], body[1]
        responder = str(ipaddress.IPv4Address(src))
        if icmp_type == ICMP_ECHO_REPLY:
            if self._proto != IPPROTO_ICMP or src != self._dst or len(body) < 12:
                return None
            ident, pid = struct.unpack_from("!H", body, 4)[0], struct.unpack_from("!H", body, 8)[0]
            probe = self._probes.get(pid)
            if probe is None or probe.lane.sport != ident:
                return None
            return probe, responder, HopReply.ECHO_REPLY, None
        if icmp_type not in (ICMP_TIME_EXCEEDED, ICMP_UNREACH):
            return None
        probe = self._quoted_probe(body[8:])
        if probe is None:
            return None
        if icmp_type == ICMP_TIME_EXCEEDED:
            return probe, responder, HopReply.TIME_EXCEEDED, None
        if code == UNREACH_FRAG_NEEDED:
            return probe, responder, HopReply.FRAG_NEEDED, struct.unpack_from("!H", body, 6)[0]
        if src == self._dst and code in (UNREACH_PORT, UNREACH_PROTOCOL):
            return probe, responder, HopReply.PORT_UNREACHABLE, None
        return probe, responder, HopReply.UNREACHABLE, None

    def _quoted_probe(self, quoted: bytes) -> _Probe | None:
        """The probe an ICMP error is about, from the IP header and 8 bytes it quotes."""
        ihl, proto, _src, dst, l4 = _ip(quoted)
        if not ihl or proto != self._proto or dst != self._dst or len(l4) < 8:
            return None
        probe = self._probes.get(struct.unpack_from("!H", quoted, 4)[0])
        if probe is None:
            return None
        if proto == IPPROTO_ICMP:
            if l4[0] != ICMP_ECHO or struct.unpack_from("!H", l4, 4)[0] != probe.lane.sport:
                return None
        else:
            sport, dport = struct.unpack_from("!HH", l4)
            if sport != probe.lane.sport or dport != self.spec.port:
                return None
        return probe

    def _match_tcp(self, src: bytes, segment: bytes) -> tuple[_Probe, str, HopReply,
                                                               int | None] | None:
        if self._proto != IPPROTO_TCP or src != self._dst or len(segment) < _TCP.size:
            return None
        sport, dport, _seq, ack, _off, flags, _win, _sum, _urg = _TCP.unpack_from(segment)
        if sport != self.spec.port or dport not in self._sports:
            return None
        # a SYN-ACK acknowledges the SYN only; a RST to a SYN that carried data (a big probe)
        # acknowledges the data too
        probe = None
        for data_len in {0, *(lane.size - 40 for lane in self.lanes)}:
            candidate = self._probes.get((ack - 1 - data_len - self._seq(0)) & 0xFFFFFFFF)
            if candidate is not None and candidate.lane.sport == dport and (
                    data_len in (0, candidate.lane.size - 40)):
                probe = candidate
                break
        if probe is None:
            return None
        if flags & TCP_RST:
            return probe, str(ipaddress.IPv4Address(src)), HopReply.TCP_RESET, None
        if flags & TCP_SYN and flags & TCP_ACK:
            return probe, str(ipaddress.IPv4Address(src)), HopReply.TCP_SYN_ACK, None
        return None


def _ip(data: bytes) -> tuple[int, int, bytes, bytes, bytes]:
    """(header length, protocol, source, destination, payload) of an IPv4 packet; header
    length 0 when it is not one. A quoted header may come with a truncated payload."""
    if len(data) < 20 or data[0] >> 4 != 4:
        return 0, 0, b"", b"", b""
    ihl = (data[0] & 0x0F) * 4
    if ihl < 20 or len(data) < ihl:
        return 0, 0, b"", b"", b""
    return ihl, data[9], data[12:16], data[16:20], data[ihl:]


def _pad(payload: bytes, size: int) -> bytes:
    if size <= 0:
        return b""
    return (payload + bytes(max(0, size - len(payload))))[:size]
