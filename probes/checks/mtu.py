"""Path-MTU check kinds: DF-set probes of different sizes toward a node.

* ``mtu.udp``: UDP datagrams to the node's UDP echo service. No privileges at all.
* ``mtu.icmp``: ICMP echo requests (IPv4), over a ping socket when ``net.ipv4.ping_group_range``
  allows it, else a raw socket (``CAP_NET_RAW``). Needs nothing on the node but ping replies.

Method:

* the socket is connected and set to ``IP_MTU_DISCOVER = IP_PMTUDISC_PROBE`` (``IPV6_...`` for
  IPv6): every datagram leaves with DF set *and* the kernel ignores the PMTU it has cached, so a
  probe bigger than a previously learnt PMTU still goes out and tests the path again;
* ``IP_RECVERR`` puts ICMP errors for the socket on its error queue (``MSG_ERRQUEUE``) with type,
  code and ``ee_info`` = the next-hop MTU of a "fragmentation needed" (ICMPv6 "packet too big"),
  plus the start of the offending datagram, which carries the probe's token, so a late ICMP error
  is never blamed on the wrong probe;
* sizes are whole IP packets (IP + UDP/ICMP header + payload), i.e. MTU figures.

Search: try the largest size first (default: the outgoing interface's MTU); if it does not come
back, bisect between a floor that must pass and it. When a frag-needed names an MTU, that size and
the one above are tried next, so a path with working PMTUD is pinned down in ~4 probes. A size
"fails" when ICMP frag-needed arrives or when it stays unanswered for ``attempts`` tries; a size
our own stack refuses (EMSGSIZE) only lowers what we can send, it says nothing about the path.

Outcome: ``ok`` with the path MTU when PMTUD works (or nothing is lower than the first hop);
``mtu-black-hole`` when large probes vanish and no frag-needed arrived at all; ``mtu-below-minimum``
when the path MTU is under ``required_mtu``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from probes.checks.base import (
    CheckKind,
    CheckResult,
    ConfigError,
    Fact,
    Family,
    PlanContext,
    Planned,
    ProbeCommand,
    ProbeFailure,
    Stopwatch,
    section_plan,
)
from probes.checks.errqueue import (
    ICMP_ORIGINS,
    SO_EE_ORIGIN_ICMP,
    SO_EE_ORIGIN_ICMP6,
    SO_EE_ORIGIN_LOCAL,
    Ancillary,
    enable_error_queue,
    parse_extended_error,
)
from probes.checks.icmp import (
    IcmpParseError,
    build_echo_request,
    open_echo_socket,
    parse_icmp,
    strip_ipv4_header,
)
from probes.checks.l4 import resolve
from probes.config import MTUTarget, mtu_problems
from probes.model import Reason, Tier

# linux/in.h, linux/in6.h (not all exported by `socket`)
IP_MTU_DISCOVER = 10
IP_PMTUDISC_PROBE = 3
IP_MTU = 14
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_PROBE = 3
IPV6_MTU = 24
ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, ICMP_FRAG_NEEDED = 3, 3, 4
ICMP6_DST_UNREACH, ICMP6_PORT_UNREACH, ICMP6_PACKET_TOO_BIG = 1, 4, 2

_HEADER_V4 = 20 + 8
_HEADER_V6 = 40 + 8
_MAGIC = b"twmtu"
_TOKEN = struct.Struct("!5sIH")  # magic, probe sequence number, probe size
_RECV_BUFFER = 65535
_MAX_PACKET = 65535
_OVERSIZE_PAYLOAD = 65000  # over any MTU but jumbo loopback, under the 64 KiB limit
_SEND_TRIES = 4  # sends of one probe that may each meet an earlier datagram's pending ICMP error


class MtuParams(MTUTarget, frozen=True, kw_only=True):
    host: str


@dataclass(frozen=True, slots=True)
class ErrorReport:
    """One message from the socket's error queue."""

    err: int
    origin: int
    icmp_type: int
    icmp_code: int
    info: int  # the next-hop MTU for frag-needed / packet-too-big, local MTU for EMSGSIZE
    token: tuple[int, int] | None  # (sequence, size) of the probe it is about, if readable

    @property
    def frag_needed(self) -> bool:
        return (self.origin == SO_EE_ORIGIN_ICMP and self.icmp_type == ICMP_DEST_UNREACH
                and self.icmp_code == ICMP_FRAG_NEEDED) or (
            self.origin == SO_EE_ORIGIN_ICMP6 and self.icmp_type == ICMP6_PACKET_TOO_BIG)

    @property
    def port_unreachable(self) -> bool:
        return (self.origin == SO_EE_ORIGIN_ICMP and self.icmp_type == ICMP_DEST_UNREACH
                and self.icmp_code == ICMP_PORT_UNREACH) or (
            self.origin == SO_EE_ORIGIN_ICMP6 and self.icmp_type == ICMP6_DST_UNREACH
            and self.icmp_code == ICMP6_PORT_UNREACH)


def parse_token(data: bytes) -> tuple[int, int] | None:
    if len(data) < _TOKEN.size:
        return None
    magic, seq, size = _TOKEN.unpack_from(data)
    return (seq, size) if magic == _MAGIC else None


def parse_error_report(data: bytes, ancdata: Ancillary,
                       token_offset: int = 0) -> ErrorReport | None:
    """An :class:`ErrorReport` from one ``recvmsg(MSG_ERRQUEUE)`` result, or None.

    ``data`` is the start of the offending datagram's payload: the UDP payload for a UDP socket,
    the ICMP header and body for an ICMP socket (``token_offset`` 8 skips the header)."""
    entry = parse_extended_error(ancdata)
    if entry is None:
        return None
    return ErrorReport(entry.err, entry.origin, entry.icmp_type, entry.icmp_code, entry.info,
                       parse_token(data[token_offset:]))


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    passed: bool
    frag_needed_mtu: int | None = None  # the MTU a frag-needed named, if one came
    local_limit: bool = False  # the local stack refused the size (EMSGSIZE at send)


class _UdpWire:
    """Probes are UDP datagrams to an echo service; the reply is the same datagram."""

    error_token_offset = 0
    mode = "udp"

    def __init__(self, header: int) -> None:
        self.header = header

    def open(self, family: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        return sock

    def message(self, seq: int, size: int) -> bytes:
        token = _TOKEN.pack(_MAGIC, seq, size)
        return token + os.urandom(max(0, size - self.header - len(token)))

    def reply_token(self, data: bytes) -> tuple[int, int] | None:
        token = parse_token(data)
        return token if token is not None and len(data) + self.header == token[1] else None


class _IcmpWire:
    """Probes are ICMP echo requests (IPv4): a ping socket if allowed, else a raw socket."""

    error_token_offset = 8  # the error quotes our ICMP header, then the echo body

    def __init__(self, header: int) -> None:
        self.header = header
        self.identifier = int.from_bytes(os.urandom(2), "big")
        self.raw = False

    def open(self, family: int) -> socket.socket:
        sock, self.raw = open_echo_socket(family)
        return sock

    @property
    def mode(self) -> str:
        return "icmp-raw" if self.raw else "icmp-ping"

    def message(self, seq: int, size: int) -> bytes:
        token = _TOKEN.pack(_MAGIC, seq, size)
        body = token + os.urandom(max(0, size - self.header - len(token)))
        return build_echo_request(self.identifier, seq, body)

    def reply_token(self, data: bytes) -> tuple[int, int] | None:
        try:
            message = parse_icmp(strip_ipv4_header(data) if self.raw else data)
        except IcmpParseError:
            return None
        # a ping socket's identifier is the kernel's; on a raw socket we see everyone's replies
        if not message.is_reply or (self.raw and message.identifier != self.identifier):
            return None
        token = parse_token(message.payload)
        if token is None or len(message.payload) + self.header != token[1]:
            return None
        return token


_Wire = _UdpWire | _IcmpWire


class MtuProber:
    """A connected DF-setting socket that sends sized probes and reads echoes and ICMP errors."""

    def __init__(self, sock: socket.socket, family: int, wire: _Wire) -> None:
        self.sock = sock
        self.family = family
        self.wire = wire
        self.header = wire.header
        self._loop = asyncio.get_running_loop()
        self._seq = 0
        self._echoes: dict[int, asyncio.Future[None]] = {}  # by probe size
        self.reports: list[ErrorReport] = []
        self._report_waiters: dict[int, asyncio.Future[ErrorReport]] = {}  # by probe size
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    async def open(cls, host: str, port: int | None) -> MtuProber:
        """UDP to ``port``, or ICMP echo (IPv4 only) when ``port`` is None."""
        try:
            family, address = await resolve(host, port or 0, socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as exc:
            raise ProbeFailure(Reason.RESOLVE_FAILED, f"cannot resolve {host}: {exc}") from None
        header = _HEADER_V6 if family == socket.AF_INET6 else _HEADER_V4
        wire: _Wire
        if port is None:
            if family != socket.AF_INET:
                raise ConfigError("mtu.icmp probes IPv4 only")
            wire = _IcmpWire(header)
        else:
            wire = _UdpWire(header)
        try:
            sock = wire.open(family)
        except OSError as exc:
            raise ProbeFailure(Reason.PROBE_ERROR, f"cannot open a socket: {exc}") from None
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
            enable_error_queue(sock)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            reason = (Reason.NETWORK_UNREACHABLE if exc.errno in (
                errno.ENETUNREACH, errno.EHOSTUNREACH) else Reason.PROBE_ERROR)
            raise ProbeFailure(reason, str(exc)) from None
        return cls(sock, family, wire)

    def device_mtu(self) -> int:
        """The MTU of the outgoing interface, ignoring any PMTU the kernel has cached.

        ``IP_MTU`` would report a cached (already lowered) PMTU, hiding the bottleneck on every
        run after the first. A DF datagram over the device MTU fails locally with EMSGSIZE, and
        with ``IP_RECVERR`` the kernel queues a local error whose ``ee_info`` is that MTU
        (``IP_PMTUDISC_PROBE`` makes it the device's, not the cached path's). Nothing is sent.
        """
        try:
            self.sock.send(self.wire.message(0, _OVERSIZE_PAYLOAD))
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                with contextlib.suppress(OSError):
                    data, ancdata, _, _ = self.sock.recvmsg(_RECV_BUFFER, 512,
                                                            socket.MSG_ERRQUEUE)
                    report = parse_error_report(data, ancdata, self.wire.error_token_offset)
                    if report is not None and report.origin == SO_EE_ORIGIN_LOCAL:
                        return report.info
        return self.route_mtu()  # e.g. loopback (64 KiB MTU): the datagram fit

    def route_mtu(self) -> int:
        """The kernel's MTU for this route (lowered by any frag-needed it has seen)."""
        if self.family == socket.AF_INET6:
            return self.sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
        return self.sock.getsockopt(socket.IPPROTO_IP, IP_MTU)

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _read_error_queue(self) -> list[ErrorReport]:
        """Read and hand out the queued errors; reading also clears the socket's pending error."""
        read: list[ErrorReport] = []
        for _ in range(64):
            try:
                data, ancdata, _, _ = self.sock.recvmsg(_RECV_BUFFER, 512, socket.MSG_ERRQUEUE)
            except OSError:
                break
            report = parse_error_report(data, ancdata, self.wire.error_token_offset)
            if report is None:
                continue
            read.append(report)
            self.reports.append(report)
            waiter = self._report_waiters.pop(report.token[1], None) if report.token else None
            if waiter is not None and not waiter.done():
                waiter.set_result(report)
            if report.port_unreachable:  # not about one probe: nobody listens at all
                for other in self._report_waiters.values():
                    if not other.done():
                        other.set_result(report)
        return read

    def _send(self, payload: bytes) -> None:
        """Send one probe, telling this datagram's own errors from an earlier one's.

        When an ICMP error arrives, Linux also sets the socket's pending error (``sk_err``),
        and the *next* ``send`` fails with it without sending anything: a frag-needed about
        a 1500-byte try, landing just before a 576-byte probe goes out, would make that send
        fail with EMSGSIZE as if our own stack could not send 576 bytes. Such an errno comes
        with an ICMP entry on the error queue; a refusal of this datagram (EMSGSIZE over the
        device MTU, no route) comes with a local entry or none. So: read the queue (which
        clears the pending error and hands the ICMP report to whoever waits for it) and send
        again; raise only what is about this datagram."""
        for _ in range(_SEND_TRIES - 1):
            try:
                self.sock.send(payload)
                return
            except OSError:
                read = self._read_error_queue()
                earlier = any(r.origin in ICMP_ORIGINS for r in read)
                if not earlier or any(r.origin == SO_EE_ORIGIN_LOCAL for r in read):
                    raise
        self.sock.send(payload)

    def _on_readable(self) -> None:
        # the error queue first: reading it also clears the socket's pending error
        self._read_error_queue()
        for _ in range(64):  # bounded, so a flood cannot starve the loop
            try:
                data = self.sock.recv(_RECV_BUFFER)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # a pending error already read from the error queue
            token = self.wire.reply_token(data)
            echo = self._echoes.get(token[1]) if token is not None else None
            if echo is not None and not echo.done():
                echo.set_result(None)

    async def probe_once(self, size: int, wait: float) -> ProbeOutcome | None:
        """One probe of ``size`` bytes; None when neither the echo nor an ICMP error came."""
        self._seq += 1
        seq = self._seq
        payload = self.wire.message(seq, size)
        echo: asyncio.Future[None] = self._loop.create_future()
        error: asyncio.Future[ErrorReport] = self._loop.create_future()
        # keyed by size, not sequence: a late echo of an earlier try of the same size proves
        # that size as well, while a late answer about another size is never misread
        self._echoes[size] = echo
        self._report_waiters[size] = error
        try:
            try:
                self._send(payload)
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    return ProbeOutcome(False, local_limit=True)
                if exc.errno == errno.ECONNREFUSED:
                    raise ProbeFailure(Reason.ICMP_UNREACHABLE, "ICMP port unreachable") from None
                raise ProbeFailure(Reason.NETWORK_UNREACHABLE if exc.errno in (
                    errno.ENETUNREACH, errno.EHOSTUNREACH) else Reason.PROBE_ERROR,
                    str(exc)) from None
            waiting: set[asyncio.Future[Any]] = {echo, error}
            done, _ = await asyncio.wait(waiting, timeout=wait,
                                         return_when=asyncio.FIRST_COMPLETED)
            if echo in done:
                return ProbeOutcome(True)
            if error in done:
                report = error.result()
                if report.port_unreachable:
                    raise ProbeFailure(Reason.ICMP_UNREACHABLE,
                                  "ICMP port unreachable: no UDP echo service on the node")
                if report.frag_needed:
                    return ProbeOutcome(False, frag_needed_mtu=report.info)
                return ProbeOutcome(False)
            return None
        finally:
            self._echoes.pop(size, None)
            self._report_waiters.pop(size, None)

    async def probe(self, size: int, attempts: int, wait: float) -> ProbeOutcome:
        for _ in range(max(1, attempts)):
            outcome = await self.probe_once(size, wait)
            if outcome is not None:
                return outcome
        return ProbeOutcome(False)


@dataclass(slots=True)
class _Search:
    """Bisection state: ``low`` passed, ``high`` failed."""

    low: int
    high: int
    frag_needed_mtus: set[int]
    sendable: int = 0  # the largest size the local stack would send (EMSGSIZE above)
    probes: int = 0


def _next_size(search: _Search, tried: set[int]) -> int:
    # a frag-needed told us the answer: check it and the size above before bisecting
    for mtu in sorted(search.frag_needed_mtus, reverse=True):
        for candidate in (mtu, mtu + 1):
            if search.low < candidate < search.high and candidate not in tried:
                return candidate
    return (search.low + search.high) // 2


def _floor_failed(sw: Stopwatch, floor_outcome: ProbeOutcome, floor: int,
                  facts: dict[str, Fact]) -> CheckResult:
    """The smallest size did not pass: the result says what happened to *that* probe (a
    frag-needed about a bigger size says nothing about the floor)."""
    if floor_outcome.frag_needed_mtu is not None:
        facts["frag_needed_mtu"] = floor_outcome.frag_needed_mtu
        return sw.result(False, Reason.MTU_BELOW_MINIMUM, facts=facts,
                         detail=f"even {floor}-byte probes need fragmentation (next-hop MTU "
                                f"{floor_outcome.frag_needed_mtu})")
    if floor_outcome.local_limit:
        return sw.result(False, Reason.PROBE_ERROR, facts=facts,
                         detail=f"the local stack refuses {floor}-byte probes (EMSGSIZE)")
    return sw.result(False, Reason.TIMEOUT, facts=facts,
                     detail=f"no echo even for {floor}-byte probes")


async def _find_path_mtu(prober: MtuProber, params: MtuParams, sw: Stopwatch,
                         facts: dict[str, Fact]) -> CheckResult:
    local_mtu = prober.device_mtu()
    facts["local_mtu"] = local_mtu
    facts["socket"] = prober.wire.mode  # which privileges the probe used
    floor = params.min_size or (1280 if prober.family == socket.AF_INET6 else 576)
    # an IPv4 packet is at most 65535 bytes; IPv6's length field excludes its 40-byte header
    largest = _MAX_PACKET + 40 if prober.family == socket.AF_INET6 else _MAX_PACKET
    top = min(params.max_size or local_mtu, largest)
    if not prober.header < floor <= top:
        raise ConfigError(f"need header < min_size <= max_size, got {floor}..{top}")
    search = _Search(low=floor, high=top + 1, frag_needed_mtus=set(), sendable=top)
    tried: set[int] = set()

    async def attempt(size: int) -> ProbeOutcome:
        tried.add(size)
        search.probes += 1
        outcome = await prober.probe(size, params.attempts, params.probe_wait)
        if outcome.frag_needed_mtu is not None:
            search.frag_needed_mtus.add(outcome.frag_needed_mtu)
        if outcome.local_limit:  # our own stack cannot send it: not the path's fault
            search.sendable = min(search.sendable, size - 1)
        return outcome

    first = await attempt(top)
    sw.lap("first_probe")
    if first.passed:
        search.low = top
    else:
        search.high = top
        base = await attempt(floor)
        if not base.passed:
            facts["probes"] = search.probes
            return _floor_failed(sw, base, floor, facts)
        while search.high - search.low > 1:
            size = _next_size(search, tried)
            if (await attempt(size)).passed:
                search.low = size
            else:
                search.high = size
    sw.lap("search")
    path_mtu = search.low
    facts.update({"path_mtu": path_mtu, "probes": search.probes,
                  "frag_needed_seen": bool(search.frag_needed_mtus),
                  "kernel_path_mtu": prober.route_mtu()})
    if search.frag_needed_mtus:
        facts["frag_needed_mtu"] = min(search.frag_needed_mtus)
    if path_mtu < search.sendable and not search.frag_needed_mtus:
        return sw.result(False, Reason.MTU_BLACK_HOLE, facts=facts,
                         detail=f"packets over {path_mtu} bytes vanish and no ICMP "
                                "fragmentation-needed came back")
    if params.required_mtu is not None and path_mtu < params.required_mtu:
        return sw.result(False, Reason.MTU_BELOW_MINIMUM, facts=facts,
                         detail=f"path MTU {path_mtu} < required {params.required_mtu}")
    return sw.result(True, Reason.OK, facts=facts)


async def _run(params: MtuParams, timeout: float, port: int | None) -> CheckResult:
    sw = Stopwatch()
    facts: dict[str, Fact] = {}
    prober: MtuProber | None = None
    try:
        async with asyncio.timeout(timeout):
            prober = await MtuProber.open(params.host, port)
            return await _find_path_mtu(prober, params, sw, facts)
    except (ProbeFailure, ConfigError) as exc:
        return sw.failed(exc, facts)
    except TimeoutError:
        return sw.result(False, Reason.TIMEOUT, facts=facts,
                         detail=f"search did not finish within {timeout:g}s")
    finally:
        if prober is not None:
            prober.close()


async def run_udp(params: MtuParams, timeout: float) -> CheckResult:
    if params.port is None:
        return CheckResult(False, Reason.PROBE_ERROR, 0.0, detail="mtu.udp needs a port")
    return await _run(params, timeout, params.port)


async def run_icmp(params: MtuParams, timeout: float) -> CheckResult:
    return await _run(params, timeout, None)


# the session tier: a path MTU changes rarely, and a search sends a handful of large packets
UDP = CheckKind("mtu.udp", Tier.SESSION, MtuParams, run_udp,
                "path MTU by DF-set UDP probes to an echo service; PMTU black holes")
ICMP = CheckKind("mtu.icmp", Tier.SESSION, MtuParams, run_icmp,
                 "path MTU by DF-set ICMP echo (ping socket or raw); PMTU black holes")


def plan(ctx: PlanContext) -> list[Planned]:
    """The ``mtu:`` section -> ``mtu.udp`` with a port, else ``mtu.icmp``."""
    section = ctx.target.mtu
    if section is None:
        return []
    return [Planned.of(UDP if section.port is not None else ICMP, ctx.params(MtuParams, section))]


COMMAND = ProbeCommand(
    name="mtu", help="path MTU by DF-set UDP or ICMP echo probes (PMTU black holes)",
    description="Binary search with DF-set probes: UDP to an echo service on PORT (mtu.udp, no "
                "privileges), or ICMP echo without PORT (mtu.icmp: ping socket or "
                "CAP_NET_RAW). Reports the largest IP packet that passes and whether ICMP "
                "fragmentation-needed came back. Sizes are whole IP packets (MTU figures).",
    options=MTUTarget, plan=section_plan("mtu", plan), validate=mtu_problems,
    positional=("host", "port"),
    default_timeout=10.0)

FAMILY = Family("mtu", (UDP, ICMP), plan, "Path MTU and PMTU black holes", (COMMAND,))
