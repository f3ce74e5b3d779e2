"""What every in-tunnel synthetic session shares: the echoes, their figures and the verdict.

A session check (WireGuard, OpenVPN, IKEv2, MASQUE CONNECT-IP) sends K ICMP echoes built by
:func:`build_echo` through the tunnel it set up, reads the replies out of the decrypted inner
IPv4 packets with :func:`parse_echo_reply`, and hands the round-trip times here:
:func:`echo_quality` turns them into a :class:`Quality`, and :func:`judge_echoes` decides — no
reply at all is ``tunnel-no-reply`` (the data plane is broken while the handshake works), then
the loss and RTT bounds.
"""

from __future__ import annotations

import ipaddress
import statistics
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

from probes.checks.base import CheckResult, Fact, Stopwatch
from probes.checks.driver import Driver
from probes.checks.icmp import build_echo_request
from probes.checks.udp import Datagram, SendStamp, round_trip_seconds
from probes.model import Quality, Reason
from probes.protocols.inet import checksum

ECHO_REPLY_GRACE = 1.0  # seconds to wait for stragglers after the last echo

_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_IPPROTO_ICMP = 1
_DONT_FRAGMENT = 0x4000


def build_echo(src: str, dst: str, ident: int, seq: int, payload: bytes) -> bytes:
    """An IPv4 packet (DF, TTL 64) carrying an ICMP echo request from ``src`` to ``dst``."""
    icmp = build_echo_request(ident, seq, payload)
    header = _IPV4_HEADER.pack(0x45, 0, _IPV4_HEADER.size + len(icmp), 0, _DONT_FRAGMENT, 64,
                               _IPPROTO_ICMP, 0, ipaddress.IPv4Address(src).packed,
                               ipaddress.IPv4Address(dst).packed)
    return header[:10] + checksum(header).to_bytes(2, "big") + header[12:] + icmp


def parse_echo_reply(packet: bytes) -> tuple[int, int] | None:
    """(id, seq) of an IPv4 ICMP echo reply, None for anything else (never raises)."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    header = (packet[0] & 0x0F) * 4
    if packet[9] != 1 or len(packet) < header + 8 or packet[header] != 0:
        return None
    return (int.from_bytes(packet[header + 4:header + 6], "big"),
            int.from_bytes(packet[header + 6:header + 8], "big"))


class EchoRun:
    """The K echoes of one session check: when each left, when its reply came back."""

    def __init__(self, ident: int) -> None:
        self.ident = ident
        self.sent: dict[int, SendStamp] = {}
        self.rtts: dict[int, float] = {}

    def reply(self, packet: bytes, received: Datagram) -> None:
        """An inner packet that came back: the RTT of the echo it answers, if it is ours."""
        echo = parse_echo_reply(packet)
        if echo is not None and echo[0] == self.ident and echo[1] in self.sent:
            self.rtts.setdefault(echo[1], round_trip_seconds(self.sent[echo[1]], received))

    async def run(self, driver: Driver[Any], count: int, interval: float, deadline: float, *,
                  send: Callable[[int], SendStamp | None], handle: Callable[[Any], None]) -> None:
        """Send ``count`` echoes ``interval`` apart (``send(seq)``: the stamp of the datagram
        that carried it), handing every event to ``handle`` meanwhile, until every reply came,
        the deadline, or :data:`ECHO_REPLY_GRACE` after the last send."""
        seq = 0
        next_send = last_sent = time.monotonic()
        while len(self.rtts) < count:
            now = time.monotonic()
            if now >= deadline or (seq >= count and now >= last_sent + ECHO_REPLY_GRACE):
                return
            if seq < count and now >= next_send:
                stamp = send(seq)
                if stamp is not None:
                    self.sent[seq] = stamp
                    last_sent = stamp.monotonic
                seq += 1
                next_send = now + interval
                continue
            wake = next_send if seq < count else last_sent + ECHO_REPLY_GRACE
            event = await driver.next_event(min(deadline, wake))
            if event is not None:
                handle(event)

    def quality(self) -> Quality:
        return echo_quality(len(self.sent), list(self.rtts.values()))


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
