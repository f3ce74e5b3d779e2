"""What every in-tunnel synthetic session shares: the tunnel, the echoes, their figures and the
verdict.

A protocol that carries IPv4 (WireGuard, OpenVPN, IKEv2) hands its checks a :class:`Tunnel` once
its handshake is done; :func:`run_through` runs any step (the session's echoes, egress, DNS)
between a :class:`TunnelProbe`'s ``establish()`` and its ``finish()`` (keepalive, EXIT, Delete).
:class:`EchoRun` is the one loop that paces probes and matches replies, whatever the probe (ICMP
echoes to the node's own tunnel address, reflector requests, a burst); :func:`judge_echoes`
gives the session's verdict: no reply at all is ``tunnel-no-reply`` (the data plane is broken
while the handshake works), then the loss and RTT bounds.

One identity, one session at a time: an agent has one identity per server (WireGuard key,
OpenVPN certificate, IKE identity), and a second session with it takes the first one's tunnel
away — wireguard-go sends to the newest endpoint with the newest keys, OpenVPN drops the older
session of a common name, strongSwan routes the inner address to the newest CHILD_SA. The
first run's echoes were then lost and its node looked lossy (DEGRADED) from this vantage.
:func:`in_turn` runs the checks that authenticate with one identity to one server one after
the other.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from probes.checks.base import CheckResult, ConfigError, Fact, ProbeFailure, Stopwatch
from probes.checks.driver import Driver
from probes.checks.udp import Datagram, SendStamp, round_trip_seconds
from probes.model import Quality, Reason
from probes.protocols import ipv4

ECHO_REPLY_GRACE = 1.0  # seconds to wait for stragglers after the last echo


build_echo = ipv4.echo_packet  # the one in-tunnel echo builder (DF, TTL 64)


def parse_echo_reply(packet: bytes) -> tuple[int, int] | None:
    """(id, seq) of an IPv4 ICMP echo reply, None for anything else (never raises)."""
    parsed = ipv4.parse(packet)
    return (parsed.ident, parsed.seq) if isinstance(parsed, ipv4.EchoReply) else None


# ---- the tunnel ----------------------------------------------------------------------------


@dataclass
class Tunnel:
    """An established tunnel of one check run: inner IPv4 packets in and out.

    ``source`` is our address inside, ``node`` the node's own (what the session check echoes:
    it answers even when nothing beyond the node does), ``resolvers`` the DNS servers the node
    pushed (OpenVPN ``dhcp-option DNS``, IKEv2 INTERNAL_IP4_DNS) or the configuration names.
    ``send`` carries one inner packet (its datagram's send stamp); ``unwrap`` returns the inner
    packet a driver event carries, or None after handling any other event itself (raising
    :class:`ProbeFailure` for one that ends the run)."""

    driver: Driver[Any]
    source: str
    node: str
    send: Callable[[bytes], SendStamp | None]
    unwrap: Callable[[Any], bytes | None]
    resolvers: tuple[str, ...] = ()
    kind: str = "tunnel"  # the protocol's word for it, for details ("the CHILD_SA")

    async def receive(self, until: float) -> tuple[bytes, Datagram] | None:
        """The next inner packet and the datagram that carried it; None once ``until`` passed."""
        driver = self.driver
        while (event := await driver.next_event(until)) is not None:
            packet = self.unwrap(event)
            if packet is not None and driver.datagram is not None:
                return packet, driver.datagram
        return None


class ProbeRun(Protocol):
    """One check run: its stopwatch and facts, and ``finish()`` (say goodbye, close the
    sockets: called once, whatever happened)."""

    watch: Stopwatch
    facts: dict[str, Fact]

    async def finish(self) -> None: ...


class TunnelProbe(ProbeRun, Protocol):
    """A run of a protocol that carries IPv4: its deadline too, and ``establish()`` (the
    handshake up to a working tunnel; :class:`ProbeFailure` or :class:`ConfigError` when it
    cannot)."""

    deadline: float

    async def establish(self) -> Tunnel: ...


Step = Callable[[Tunnel, TunnelProbe], Awaitable[CheckResult]]


async def run_through(probe: TunnelProbe, step: Step) -> CheckResult:
    """Set the tunnel up, run ``step`` through it, take it down: one result with a reason."""
    async def through() -> CheckResult:
        return await step(await probe.establish(), probe)
    return await run_probe(probe, through)


async def run_probe(probe: ProbeRun, body: Callable[[], Awaitable[CheckResult]]) -> CheckResult:
    """``body()`` (it raises :class:`ProbeFailure` for a failure with a reason), then
    ``probe.finish()``: one result with the run's phases and whole duration. A cancelled run
    (the check's hard time bound) still finishes: what it holds (sockets, an SA to delete, a
    half-open slot) is given back."""
    try:
        result = await body()
    except asyncio.CancelledError:
        await probe.finish()
        raise
    except (ProbeFailure, ConfigError) as exc:  # ConfigError: ours (unreadable keys)
        result = probe.watch.failed(exc, probe.facts)
    await probe.finish()
    result.phases = dict(probe.watch.phases)
    result.duration_seconds = probe.watch.elapsed()
    return result


# ---- one session per identity ---------------------------------------------------------------

_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, asyncio.Lock]] = \
    weakref.WeakKeyDictionary()
MAX_TURN_WAIT_SHARE = 0.5  # of the check's timeout: the rest is the node's to use


async def in_turn(identity: Hashable, timeout: float,
                  run: Callable[[float], Awaitable[CheckResult]]) -> CheckResult:
    """``run(time_left)`` once no other check of this agent (event loop) is using ``identity``
    (protocol, server and client identity), released whatever happens. The wait is the
    agent's, not the node's: a check that would be left less than half its ``timeout`` is
    ``overloaded`` instead; one that waited has the wait as its ``queue`` phase."""
    lock = _turns.setdefault(asyncio.get_running_loop(), {}).setdefault(identity,
                                                                        asyncio.Lock())
    started = time.monotonic()
    queued = lock.locked()
    try:
        if queued:
            # not wait_for: on 3.11 it swallows a cancel that comes as the lock is handed over,
            # and the cancelled check ran all the same (probes/aio.py)
            async with asyncio.timeout(timeout * MAX_TURN_WAIT_SHARE):
                await lock.acquire()
        else:
            await lock.acquire()  # free: taken at once, no wait to report
    except TimeoutError:
        waited = time.monotonic() - started
        return CheckResult(False, Reason.OVERLOADED, waited, phases={"queue": waited},
                           detail=f"another check of this agent used the same identity with "
                                  f"this server for {waited:.3g}s")
    try:
        waited = time.monotonic() - started if queued else 0.0
        result = await run(timeout - waited)
    finally:
        lock.release()
    if queued:
        result.phases = {"queue": waited, **result.phases}
        result.duration_seconds += waited
    return result


# ---- paced probes and their replies ---------------------------------------------------------


def echo_matcher(ident: int) -> Callable[[bytes], int | None]:
    """The sequence number of an ICMP echo reply carrying ``ident``, else None."""
    def match(packet: bytes) -> int | None:
        echo = parse_echo_reply(packet)
        return echo[1] if echo is not None and echo[0] == ident else None
    return match


@dataclass
class EchoRun:
    """K probes of one check: when each left, when its answer came back.

    ``match`` reads an inner packet and names the probe it answers (its sequence number), or
    None; the default matches ICMP echo replies carrying ``ident``."""

    ident: int
    match: Callable[[bytes], int | None] | None = None
    sent: dict[int, SendStamp] = field(default_factory=dict)
    rtts: dict[int, float] = field(default_factory=dict)
    arrivals: dict[int, float] = field(default_factory=dict)  # monotonic receive times

    def __post_init__(self) -> None:
        if self.match is None:
            self.match = echo_matcher(self.ident)

    def reply(self, packet: bytes, received: Datagram) -> int | None:
        """An inner packet that came back: the RTT of the probe it answers, if it is ours."""
        assert self.match is not None
        seq = self.match(packet)
        if seq is None or seq not in self.sent:
            return None
        if seq not in self.rtts:
            self.rtts[seq] = round_trip_seconds(self.sent[seq], received)
            self.arrivals[seq] = received.received_monotonic
        return seq

    async def run(self, driver: Driver[Any], count: int, interval: float, deadline: float, *,
                  send: Callable[[int], SendStamp | None], handle: Callable[[Any], None],
                  grace: float = ECHO_REPLY_GRACE) -> None:
        """Send ``count`` probes ``interval`` apart (``send(seq)``: the stamp of the datagram
        that carried it), handing every event to ``handle`` meanwhile, until every reply came,
        the deadline, or ``grace`` after the last send. Never faster than ``interval``: a late
        loop sends late, it does not catch up."""
        seq = 0
        next_send = last_sent = time.monotonic()
        while len(self.rtts) < count:
            now = time.monotonic()
            if now >= deadline or (seq >= count and now >= last_sent + grace):
                return
            if seq < count and now >= next_send:
                stamp = send(seq)
                if stamp is not None:
                    self.sent[seq] = stamp
                    last_sent = stamp.monotonic
                seq += 1
                next_send = now + interval
                continue
            wake = next_send if seq < count else last_sent + grace
            event = await driver.next_event(min(deadline, wake))
            if event is not None:
                handle(event)

    async def through(self, tunnel: Tunnel, count: int, interval: float, deadline: float,
                      build: Callable[[int], bytes], *,
                      other: Callable[[bytes], None] | None = None,
                      grace: float = ECHO_REPLY_GRACE) -> None:
        """:meth:`run` through ``tunnel``: ``build(seq)`` is the inner packet of probe ``seq``;
        inner packets that answer no probe go to ``other`` (an ICMP error, say)."""
        driver = tunnel.driver

        def handle(event: Any) -> None:
            packet = tunnel.unwrap(event)
            if packet is None or driver.datagram is None:
                return
            if self.reply(packet, driver.datagram) is None and other is not None:
                other(packet)

        await self.run(driver, count, interval, deadline,
                       send=lambda seq: tunnel.send(build(seq)), handle=handle, grace=grace)

    def quality(self, seqs: Sequence[int] | None = None) -> Quality:
        """Figures of every probe, or of ``seqs`` only (one target's)."""
        if seqs is None:
            return echo_quality(len(self.sent), list(self.rtts.values()))
        sent = [s for s in seqs if s in self.sent]
        return echo_quality(len(sent), [self.rtts[s] for s in sent if s in self.rtts])


async def echo_node(tunnel: Tunnel, probe: TunnelProbe, count: int, interval: float,
                    tag: bytes) -> Quality:
    """``count`` ICMP echoes to the node's own tunnel address, ``interval`` apart: what the
    session check measures (the node answers this even when nothing beyond it does)."""
    run = EchoRun(secrets.randbelow(0xFFFF) + 1)
    payload = tag + secrets.token_bytes(8)
    await run.through(tunnel, max(count, 0), interval, probe.deadline,
                      lambda seq: build_echo(tunnel.source, tunnel.node, run.ident, seq, payload))
    probe.watch.lap("tunnel")
    return run.quality()


def echo_quality(sent: int, rtts: Sequence[float]) -> Quality:
    """Figures of ``sent`` echoes of which ``rtts`` came back (seconds)."""
    if not rtts:
        return Quality(sent=sent, received=0, loss_ratio=1.0 if sent else 0.0)
    ordered = sorted(rtts)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return Quality(sent=sent, received=len(ordered),
                   loss_ratio=round((sent - len(ordered)) / sent, 6) if sent else 0.0,
                   rtt_p50_seconds=statistics.median(ordered), rtt_p99_seconds=p99,
                   rtt_max_seconds=ordered[-1])


def judge_echoes(watch: Stopwatch, quality: Quality, facts: dict[str, Fact], *,
                 loss_threshold: float, rtt_threshold: float | None,
                 no_reply: str) -> CheckResult:
    """The session's result from its echo figures; ``no_reply`` explains a total silence."""
    if quality.sent and quality.received == 0:
        return watch.result(False, Reason.TUNNEL_NO_REPLY, quality=quality, facts=facts,
                            detail=no_reply)
    if quality.loss_ratio > loss_threshold:
        return watch.result(False, Reason.TUNNEL_LOSS, quality=quality, facts=facts,
                            detail=f"in-tunnel loss {quality.loss_ratio:.1%} > "
                                   f"{loss_threshold:.1%}")
    p50 = quality.rtt_p50_seconds
    if rtt_threshold is not None and p50 is not None and p50 > rtt_threshold:
        return watch.result(False, Reason.TUNNEL_RTT, quality=quality, facts=facts,
                            detail=f"in-tunnel RTT p50 {p50 * 1000:.1f} ms > "
                                   f"{rtt_threshold * 1000:.1f} ms")
    return watch.result(True, Reason.OK, quality=quality, facts=facts)
