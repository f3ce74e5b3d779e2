"""Throughput and delay under load through the tunnel (docs/probes/user-path.md).

One run, after the tunnel is up:

1. **idle**: ``idle_echoes`` small requests to the reflector, 50 ms apart: the idle RTT;
2. **burst**: requests of ``packet_size`` inner IP bytes, paced at ``rate`` for ``duration``
   (never faster: a late loop sends late, it does not catch up), each answered with the
   reflector's running totals for the burst's session.

The rate that reached the far end is read from the far end's own clock (the answer with the
highest count: requests received, and microseconds since the first), so lost answers on the way
back do not bias it. The queueing delay is the burst's median RTT minus the idle median: what a
full queue on the path (a saturated uplink, a shaper) adds. Results are quality: below
``min_rate`` is ``throughput-below-bound``, above ``max_queueing_delay`` is
``queueing-delay-over-bound``, no answer to the burst is ``reflector-no-reply`` — the mesh reads
all three as DEGRADED bounds, never as DOWN on their own (the egress check says whether the node
forwards at all).
"""

from __future__ import annotations

import secrets
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from probes.checks.base import CheckResult
from probes.checks.tunnel import EchoRun, Tunnel, TunnelProbe, echo_quality
from probes.config import ThroughputCheck, parse_host_port
from probes.model import Quality, Reason
from probes.protocols import ipv4, reflector

UDP_IP_OVERHEAD = 28  # IPv4 + UDP headers: packet_size is whole inner IP packets
IDLE_INTERVAL = 0.05
IDLE_GRACE = 0.5


def burst_packets(check: ThroughputCheck) -> int:
    """Requests in one burst: ``rate`` for ``duration`` in ``packet_size`` packets (>= 2)."""
    return max(2, round(check.rate * check.duration / (8 * check.packet_size)))


def bytes_per_run(check: ThroughputCheck) -> int:
    """Inner IP bytes one run sends: the idle requests and the burst."""
    idle = check.idle_echoes * (reflector.REQUEST_MIN + UDP_IP_OVERHEAD)
    return idle + burst_packets(check) * check.packet_size


def min_interval(check: ThroughputCheck, tunnels: int) -> float:
    """Seconds between two runs of one throughput check so that the node's ``tunnels`` checks
    together stay within ``budget_bytes_per_hour``."""
    return 3600.0 * tunnels * bytes_per_run(check) / check.budget_bytes_per_hour


@dataclass
class _Session:
    """One reflector session: its id, our port, the highest-count answer so far."""

    tunnel: Tunnel
    host: str
    port: int
    size: int
    kind: reflector.Kind
    ident: bytes
    sport: int
    best: reflector.Reply | None = None

    @classmethod
    def open(cls, tunnel: Tunnel, target: str, size: int, kind: reflector.Kind) -> _Session:
        host, port = parse_host_port(target)
        return cls(tunnel, host, port, size, kind, secrets.token_bytes(8),
                   1024 + secrets.randbelow(64_000))

    def build(self, seq: int) -> bytes:
        request = reflector.build_request(self.kind, self.ident, seq,
                                          self.size - UDP_IP_OVERHEAD)
        return ipv4.udp_packet(self.tunnel.source, self.host, self.sport, self.port, request)

    def match(self, packet: bytes) -> int | None:
        parsed = ipv4.parse(packet)
        if (not isinstance(parsed, ipv4.UdpDatagram) or parsed.src != self.host
                or parsed.sport != self.port or parsed.dport != self.sport):
            return None
        reply = reflector.parse_reply(parsed.payload)
        if reply is None or reply.session != self.ident:
            return None
        if self.best is None or reply.count > self.best.count:
            self.best = reply
        return reply.seq

    async def run(self, probe: TunnelProbe, count: int, interval: float,
                  grace: float) -> EchoRun:
        run = EchoRun(0, match=self.match)
        await run.through(self.tunnel, count, interval, probe.deadline, self.build, grace=grace)
        return run

    def far_end_rate(self) -> float | None:
        """Inner IP bytes per second the reflector received, by its own clock."""
        best = self.best
        if best is None or best.count < 2 or best.elapsed_us <= 0:
            return None
        return (best.count - 1) * self.size / (best.elapsed_us / 1e6)


async def throughput_step(tunnel: Tunnel, probe: TunnelProbe,
                          check: ThroughputCheck) -> CheckResult:
    """Idle RTT, then the paced burst; judge as the module says."""
    fail = _failing(probe)
    idle = _Session.open(tunnel, check.reflector, reflector.REQUEST_MIN + UDP_IP_OVERHEAD,
                         reflector.Kind.ECHO)
    idle_run = await idle.run(probe, check.idle_echoes, IDLE_INTERVAL, IDLE_GRACE)
    probe.watch.lap("idle")
    if not idle_run.rtts:
        return fail(Reason.REFLECTOR_NO_REPLY, echo_quality(len(idle_run.sent), []),
                    f"the reflector {check.reflector} answered none of {check.idle_echoes} "
                    "idle requests through the tunnel")
    idle_rtt = statistics.median(idle_run.rtts.values())
    burst = _Session.open(tunnel, check.reflector, check.packet_size, reflector.Kind.BURST)
    count = burst_packets(check)
    grace = min(1.0, max(0.3, 2 * check.max_queueing_delay))
    burst_run = await burst.run(probe, count, check.packet_size * 8 / check.rate, grace)
    probe.watch.lap("burst")
    quality = burst_run.quality()
    rate = burst.far_end_rate()
    delay = (None if quality.rtt_p50_seconds is None
             else max(0.0, quality.rtt_p50_seconds - idle_rtt))
    quality = msgspec.structs.replace(quality, throughput_bytes_per_second=rate,
                                      queueing_delay_seconds=delay)
    probe.facts.update(throughput_idle_rtt_seconds=idle_rtt, throughput_burst_packets=count,
                       throughput_burst_sent=len(burst_run.sent))
    p50 = quality.rtt_p50_seconds
    if rate is None or delay is None or p50 is None:
        return fail(Reason.REFLECTOR_NO_REPLY, quality,
                    f"the reflector answered the idle requests and too little of the burst "
                    f"({quality.received} of {quality.sent}) to measure a rate")
    floor = check.min_rate if check.min_rate is not None else check.rate / 2
    if rate * 8 < floor:
        return fail(Reason.THROUGHPUT_LOW, quality,
                    f"{rate * 8 / 1e6:.2f} Mbit/s reached the reflector, below "
                    f"{floor / 1e6:.2f} (offered {check.rate / 1e6:.2f})")
    if delay > check.max_queueing_delay:
        return fail(Reason.QUEUEING_DELAY, quality,
                    f"RTT under load {p50 * 1e3:.1f} ms, idle "
                    f"{idle_rtt * 1e3:.1f} ms: {delay * 1e3:.1f} ms of queueing > "
                    f"{check.max_queueing_delay * 1e3:.0f} ms")
    return probe.watch.result(True, Reason.OK, quality=quality, facts=probe.facts)


def _failing(probe: TunnelProbe) -> Callable[[Reason, Quality, str], CheckResult]:
    def fail(reason: Reason, quality: Quality, detail: str) -> CheckResult:
        return probe.watch.result(False, reason, quality=quality, facts=probe.facts,
                                  detail=detail)
    return fail
