"""L4 check kinds: ``tcp`` (connect, optional TLS), ``udp`` (request/response), ``icmp`` (echo).

They are the fast tier: cheap enough to run every ~2 s against every node, and specific enough
in their failure reasons to tell a dead host (timeout) from a dead service (refused, ICMP port
unreachable) from a local routing problem (network-unreachable).

Design notes:

* TCP sockets are closed with ``SO_LINGER {1, 0}`` (an RST), as HAProxy does for its checks, so
  thousands of probes per second leave no TIME_WAIT sockets behind on either side.
* UDP and ICMP read ICMP errors from ``IP_RECVERR`` on the connected socket (no root) and take
  RTTs from kernel receive timestamps: ICMP through :class:`probes.checks.icmp.DatagramProbe`,
  UDP through the poll set (:class:`_UdpExchange`), its socket set up the same way.
* Time bounds use ``loop.call_later`` on one future rather than ``wait_for``/``asyncio.timeout``
  so a probe costs no extra task; the hot path does no DNS when the host is an IP literal.
* The runs the scheduler starts (:class:`_TcpConnect`, :class:`_UdpExchange`) use the C socket
  type (``_socket.socket``): :class:`socket.socket` is a Python subclass whose constructor,
  ``close`` and ``family`` run Python code, ~3 us of every probe's ~70 us here.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import os
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from probes.checks.base import (
    CheckKind,
    CheckResult,
    Done,
    Family,
    PlanContext,
    Planned,
    ProbeCommand,
    Started,
    Stopwatch,
    crashed,
    first_retry_after,
    result_of,
    settle,
)
from probes.checks.errqueue import SO_TIMESTAMPNS, error_queue_option
from probes.checks.icmp import (
    DatagramProbe,
    IcmpParseError,
    QueuedError,
    Received,
    build_echo_request,
    drain_errqueue,
    echo_token,
    open_echo_socket,
    parse_icmp,
    reason_for_errno,
    receive,
    round_trip_seconds,
    strip_ipv4_header,
)
from probes.checks.pollset import PollSet, poll_set
from probes.config import Problem
from probes.model import Quality, Reason, Tier

_LINGER_RST = struct.pack("ii", 1, 0)
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_DGRAM_NONBLOCK = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
_CONNECT_TROUBLE = select.EPOLLERR | select.EPOLLHUP
_X509_V_ERR_CERT_HAS_EXPIRED = 10


class TcpParams(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    port: int
    tls: bool = False
    server_name: str | None = None  # SNI and name to verify; default: host
    ca_file: str | None = None  # default: the system trust store
    verify: bool = True


class UdpParams(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    port: int
    send: bytes = b""
    expect_prefix: bytes | None = None  # the reply must start with this; None = any reply


class IcmpParams(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    count: int = 1
    interval: float = 0.2  # seconds between echo requests
    payload_size: int = 56
    # a single-echo (liveness) probe resends while nothing has answered, at most this often
    # within its timeout (at min(interval, timeout/4), then doubling): one lost packet is loss,
    # not a dead node (fping -r); echoes for loss figures (count > 1) are never resent
    retries: int = 2


# ------------------------------------------------------------------------------- helpers


def literal_address(host: str, port: int) -> tuple[int, tuple[Any, ...]] | None:
    """(family, sockaddr) when ``host`` is an IP literal: the hot path needs no resolver."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family, ((host, port) if family == socket.AF_INET else (host, port, 0, 0))
    return None


async def resolve(host: str, port: int, kind: int) -> tuple[int, tuple[Any, ...]]:
    """(family, sockaddr) for ``host``; IP literals skip the resolver entirely."""
    literal = literal_address(host, port)
    if literal is not None:
        return literal
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=kind)
    family, _, _, _, address = infos[0]
    return family, tuple(address)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def quality_of(sent: int, rtts: list[float]) -> Quality:
    received = len(rtts)
    return Quality(
        sent=sent,
        received=received,
        loss_ratio=(sent - received) / sent if sent else 0.0,
        rtt_p50_seconds=percentile(rtts, 0.5) if rtts else None,
        rtt_p99_seconds=percentile(rtts, 0.99) if rtts else None,
        rtt_max_seconds=max(rtts) if rtts else None,
    )


# ------------------------------------------------------------------------------- tcp


def tls_client_context(ca_file: str | None, verify: bool) -> ssl.SSLContext:
    """A TLS client context: ``ca_file`` (or the system trust store), or no verification."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def certificate_failure(exc: ssl.SSLCertVerificationError) -> tuple[Reason, str]:
    """The reason and detail of a certificate that did not verify."""
    reason = (Reason.CERT_EXPIRED if exc.verify_code == _X509_V_ERR_CERT_HAS_EXPIRED
              else Reason.CERT_VERIFY_FAILED)
    return reason, str(exc.verify_message)


def _tls_context(params: TcpParams) -> ssl.SSLContext:
    return tls_client_context(params.ca_file, params.verify)


async def _tls_phase(sock: socket.socket, params: TcpParams, sw: Stopwatch,
                     remaining: float) -> CheckResult:
    """Run the TLS handshake on a connected socket."""
    try:
        ctx = _tls_context(params)
    except (OSError, ssl.SSLError) as exc:
        return sw.result(False, Reason.PROBE_ERROR, detail=f"TLS setup: {exc}")
    try:
        _, writer = await asyncio.open_connection(
            sock=sock, ssl=ctx, server_hostname=params.server_name or params.host,
            ssl_handshake_timeout=max(remaining, 0.001))
    except ssl.SSLCertVerificationError as exc:
        sw.lap("tls")
        reason, detail = certificate_failure(exc)
        return sw.result(False, reason, detail=detail)
    except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
        sw.lap("tls")
        reason = Reason.TIMEOUT if isinstance(exc, TimeoutError) else Reason.TLS_FAILED
        return sw.result(False, reason, detail=type(exc).__name__)
    sw.lap("tls")
    facts: dict[str, str | int | float | bool] = {}
    version = writer.get_extra_info("ssl_object")
    if isinstance(version, ssl.SSLObject) and version.version():
        facts["tls_version"] = str(version.version())
    cert = writer.get_extra_info("peercert")
    if isinstance(cert, dict) and "notAfter" in cert:
        facts["cert_not_after"] = ssl.cert_time_to_seconds(str(cert["notAfter"]))
        # node_* facts become agent gauges (tunnelwatch_node_...): the expiry alert reads this
        facts["node_certificate_expiry_timestamp_seconds"] = float(facts["cert_not_after"])
    writer.transport.abort()
    return sw.result(True, Reason.OK, facts=facts)


def _wake(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


async def _connect(sock: socket.socket, address: tuple[Any, ...], timeout: float) -> int | None:
    """Non-blocking connect: the errno (0 = connected), or None on timeout.

    Hand-rolled rather than ``loop.sock_connect`` under ``asyncio.timeout``: one future, one
    writer callback and one timer per probe measured ~1.5x cheaper per CPU-second here.
    """
    err = sock.connect_ex(address)
    if err != errno.EINPROGRESS:
        return err
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bool] = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _wake, fut, True)
    timer = loop.call_later(max(timeout, 0.0), _wake, fut, False)
    try:
        connected = await fut
    finally:
        loop.remove_writer(fd)
        timer.cancel()
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if connected else None


def _rst_on_close(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)


def _connect_failed(sw: Stopwatch, err: int | None, timeout: float) -> CheckResult | None:
    """Lap the connect; the result of a connect that failed (``err`` None: no answer within
    ``timeout``), or None when it connected."""
    sw.lap("connect")
    if err is None:
        return sw.result(False, Reason.TIMEOUT, detail=f"no answer within {timeout:g}s")
    if err:
        return sw.result(False, reason_for_errno(err), detail=os.strerror(err))
    return None


class _TcpConnect:
    """A plain TCP connect check (no TLS, an IP literal) driven by callbacks of the loop's
    :class:`~probes.checks.pollset.PollSet`: no coroutine, no handle or timer of its own (see
    :data:`probes.checks.base.Starter`). Same phases, reasons and details as :func:`run_tcp`."""

    __slots__ = ("_done", "_fd", "_polls", "_sock", "_sw", "_timeout")

    def __init__(self, family: int, address: tuple[Any, ...], timeout: float,
                 done: Done) -> None:
        self._sw = sw = Stopwatch()
        self._timeout = timeout
        self._done: Done | None = done
        self._polls: PollSet | None = None
        # non-blocking from its creation: no ioctl of its own (``setblocking``)
        self._sock = sock = _socket.socket(family, _STREAM_NONBLOCK)
        self._fd = sock.fileno()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            err = sock.connect_ex(address)
        except OSError as exc:  # as run_tcp: e.g. EADDRNOTAVAIL from the socket's setup
            self._end(sw.result(False, reason_for_errno(exc.errno or 0),
                                detail=exc.strerror or ""))
            return
        if err != errno.EINPROGRESS:
            self._end(_connect_failed(sw, err, timeout) or sw.result(True, Reason.OK))
            return
        self._polls = polls = poll_set()
        polls.watch(self._fd, select.EPOLLOUT, self, sw.start + timeout)

    def ready(self, events: int) -> None:
        # connected when writable without an error or hang-up: SO_ERROR is then 0, and asking
        # for it would be one more system call per probe
        err = (self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
               if events & _CONNECT_TROUBLE else 0)
        self._finish(err)

    def expired(self) -> None:
        self._finish(None)

    def broken(self, exc: Exception) -> None:
        _crash(self, TCP, exc)

    def _finish(self, err: int | None) -> None:
        sw = self._sw
        result = _connect_failed(sw, err, self._timeout) or sw.result(True, Reason.OK)
        self._sock.close()
        done, self._done = self._done, None
        if done is not None:
            done(result)

    def _end(self, result: CheckResult) -> None:
        """An outcome known within the start: closed now, told from the next loop turn."""
        self._sock.close()
        done, self._done = self._done, None
        if done is not None:
            asyncio.get_running_loop().call_soon(done, result)

    def cancel(self) -> None:
        if self._done is None:
            return
        self._done = None
        if self._polls is not None:
            self._polls.forget(self._fd)
        self._sock.close()


def _crash(run: _TcpConnect | _UdpExchange, kind: CheckKind[Any], exc: Exception) -> None:
    """A started run's :meth:`~probes.checks.pollset.Waiter.broken`: closed, and ended as the
    probe error a check coroutine that raised would give (logged even when ``done`` raised)."""
    run._sock.close()
    result = crashed(kind, exc, run._sw.start)
    done, run._done = run._done, None
    if done is not None:
        done(result)


def start_tcp(params: TcpParams, timeout: float, done: Done) -> Started | None:
    """:func:`run_tcp` without a coroutine, for a plain connect to an IP literal."""
    if params.tls:
        return None
    resolved = literal_address(params.host, params.port)
    if resolved is None:
        return None
    return _TcpConnect(resolved[0], resolved[1], timeout, done)


async def run_tcp(params: TcpParams, timeout: float) -> CheckResult:
    sw = Stopwatch()
    resolved = literal_address(params.host, params.port)
    if resolved is None:
        try:
            resolved = await resolve(params.host, params.port, socket.SOCK_STREAM)
        except OSError as exc:
            return sw.result(False, Reason.RESOLVE_FAILED, detail=str(exc))
        sw.lap("resolve")
    family, address = resolved
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        _rst_on_close(sock)
        err = await _connect(sock, address, timeout - sw.elapsed())
        failed = _connect_failed(sw, err, timeout)
        if failed is not None:
            return failed
        if not params.tls:
            return sw.result(True, Reason.OK)
        return await _tls_phase(sock, params, sw, timeout - sw.elapsed())
    except OSError as exc:  # e.g. EADDRNOTAVAIL from connect_ex's socket setup
        return sw.result(False, reason_for_errno(exc.errno or 0), detail=exc.strerror or "")
    finally:
        sock.close()  # idempotent; after TLS the transport closes its (same) socket object too


# ------------------------------------------------------------------------------- udp


async def run_udp(params: UdpParams, timeout: float) -> CheckResult:
    sw = Stopwatch()
    resolved = literal_address(params.host, params.port)
    if resolved is None:
        try:
            resolved = await resolve(params.host, params.port, socket.SOCK_DGRAM)
        except OSError as exc:
            return sw.result(False, Reason.RESOLVE_FAILED, detail=str(exc))
    fut: asyncio.Future[CheckResult] = asyncio.get_running_loop().create_future()
    return await result_of(fut, _UdpExchange(resolved[0], resolved[1], params, timeout,
                                             partial(settle, fut), sw=sw))


def _udp_socket(sw: Stopwatch, family: int,
                address: tuple[Any, ...]) -> _socket.socket | CheckResult:
    """The connected socket of a UDP check, or the result of a failure to make it (as
    :meth:`DatagramProbe.make_socket` makes it: error queue and kernel receive stamps on)."""
    try:
        sock = _socket.socket(family, _DGRAM_NONBLOCK)
    except OSError as exc:
        return sw.result(False, Reason.PROBE_ERROR, detail=f"socket: {exc.strerror}")
    try:
        level, option = error_queue_option(family)
        sock.setsockopt(level, option, 1)
        sock.setsockopt(_socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError as exc:
        sock.close()
        return sw.result(False, Reason.PROBE_ERROR, detail=f"socket: {exc.strerror}")
    try:
        sock.connect(address)
    except OSError as exc:
        sock.close()
        return sw.result(False, reason_for_errno(exc.errno or 0), detail=exc.strerror or "")
    return sock


def _exchange_result(sw: Stopwatch, params: UdpParams, timeout: float, sent: tuple[float, int],
                     outcome: Received | QueuedError | None) -> CheckResult:
    """What a UDP check's one exchange came to: its reply (checked against ``expect_prefix``),
    an error the kernel queued for it, or nothing within ``timeout`` (None)."""
    sent_mono, sent_wall = sent
    if outcome is None:
        sw.lap("rtt")
        return sw.result(False, Reason.TIMEOUT, detail=f"no reply within {timeout:g}s")
    if isinstance(outcome, QueuedError):
        sw.lap("rtt")
        return sw.result(False, outcome.reason, detail=outcome.describe())
    rtt = round_trip_seconds(sent_mono, sent_wall, outcome)
    sw.phases["rtt"] = rtt
    if params.expect_prefix is not None and not outcome.data.startswith(params.expect_prefix):
        return sw.result(False, Reason.UNEXPECTED_REPLY,
                         detail=f"reply of {len(outcome.data)} bytes does not match")
    return sw.result(True, Reason.OK, quality=Quality(sent=1, received=1, rtt_p50_seconds=rtt,
                                                      rtt_p99_seconds=rtt, rtt_max_seconds=rtt))


class _UdpExchange:
    """A UDP check's exchange with an address, driven by callbacks of the loop's
    :class:`~probes.checks.pollset.PollSet` (as :class:`_TcpConnect`): no coroutine, no reader
    or timer of its own; :func:`run_udp` awaits it after resolving a name. The first of reply,
    queued error and timeout decides."""

    __slots__ = ("_done", "_params", "_polls", "_sent", "_sock", "_sw", "_timeout")

    def __init__(self, family: int, address: tuple[Any, ...], params: UdpParams,
                 timeout: float, done: Done, *, sw: Stopwatch) -> None:
        self._sw = sw
        self._params, self._timeout = params, timeout
        self._done: Done | None = done
        self._polls: PollSet | None = None
        self._sent = (0.0, 0)
        sock = _udp_socket(sw, family, address)
        if isinstance(sock, CheckResult):
            self._done = None
            asyncio.get_running_loop().call_soon(done, sock)
            return
        self._sock = sock
        self._sent = (time.monotonic(), time.time_ns())
        try:
            sock.send(params.send)
        except BlockingIOError:
            pass  # a full send buffer drops the datagram, as the wire would
        except OSError as exc:  # decided within the start: told from the next loop turn
            early = drain_errqueue(sock) or QueuedError(exc.errno or 0, 0, 0, 0)
            asyncio.get_running_loop().call_soon(self._finish, early)
            return
        self._polls = polls = poll_set()
        polls.watch(sock.fileno(), select.EPOLLIN, self, sw.start + timeout)

    def ready(self, events: int) -> None:
        sock = self._sock
        # the error queue first: reading it clears the pending socket error, so an ICMP error
        # is reported with its type/code rather than as a bare ECONNREFUSED; it is read only
        # when the event says there is one (one system call less per answered probe)
        if events & select.EPOLLERR:
            queued = drain_errqueue(sock)
            if queued is not None:
                self._finish(queued)
                return
        try:
            received = receive(sock)
        except (BlockingIOError, InterruptedError):  # nothing after all: wait on
            assert self._polls is not None
            self._polls.rewatch(sock.fileno(), select.EPOLLIN, self,
                                self._sw.start + self._timeout)
            return
        except OSError as exc:
            self._finish(drain_errqueue(sock) or QueuedError(exc.errno or 0, 0, 0, 0))
            return
        self._finish(received)

    def expired(self) -> None:
        self._finish(None)

    def broken(self, exc: Exception) -> None:
        _crash(self, UDP, exc)

    def _finish(self, outcome: Received | QueuedError | None) -> None:
        if self._done is None:
            return
        self._sock.close()
        # the result before ``done`` is taken: if making it raises, :meth:`broken` still tells
        result = _exchange_result(self._sw, self._params, self._timeout, self._sent, outcome)
        done, self._done = self._done, None
        done(result)

    def cancel(self) -> None:
        if self._done is None:
            return
        self._done = None
        if self._polls is not None:
            self._polls.forget(self._sock.fileno())
        self._sock.close()


def start_udp(params: UdpParams, timeout: float, done: Done) -> Started | None:
    """:func:`run_udp` without a coroutine, for an IP literal."""
    resolved = literal_address(params.host, params.port)
    if resolved is None:
        return None
    return _UdpExchange(resolved[0], resolved[1], params, timeout, done, sw=Stopwatch())


# ------------------------------------------------------------------------------- icmp


class _EchoSession:
    """Bookkeeping of one ICMP echo probe: which requests went out, which came back."""

    def __init__(self, count: int, raw: bool, identifier: int, token: bytes,
                 done: asyncio.Future[None]) -> None:
        self.count = count
        self.raw = raw
        self.identifier = identifier
        self.token = token
        self.done = done
        self.sent: dict[int, tuple[float, int]] = {}
        self.rtts: dict[int, float] = {}
        self.errors: list[QueuedError] = []
        self.bad_packets = 0

    def _check_done(self) -> None:
        if len(self.rtts) + len(self.errors) >= self.count and not self.done.done():
            self.done.set_result(None)

    def on_data(self, received: Received) -> None:
        try:
            data = strip_ipv4_header(received.data) if self.raw else received.data
            msg = parse_icmp(data)
        except IcmpParseError:
            # a raw socket sees every ICMP packet of the host; a ping socket only ours
            self.bad_packets += 0 if self.raw else 1
            return
        if self.raw and msg.identifier != self.identifier:
            return
        if msg.is_reply and not msg.payload.startswith(self.token):
            return  # someone else's echo (raw socket) or a corrupted one
        stamp = self.sent.get(msg.sequence)
        if stamp is None or msg.sequence in self.rtts:
            return
        if msg.is_reply:
            self.rtts[msg.sequence] = round_trip_seconds(stamp[0], stamp[1], received)
        else:  # an unreachable / time-exceeded quoting our request (raw sockets)
            self.errors.append(QueuedError(0, 2, msg.type, msg.code))
        self._check_done()

    def on_error(self, error: QueuedError) -> None:
        self.errors.append(error)
        self._check_done()


def _finish(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


async def run_icmp(params: IcmpParams, timeout: float) -> CheckResult:
    sw = Stopwatch()
    count = max(1, params.count)
    try:
        family, address = await resolve(params.host, 0, socket.SOCK_RAW)
    except OSError as exc:
        return sw.result(False, Reason.RESOLVE_FAILED, detail=str(exc))
    if family != socket.AF_INET:
        return sw.result(False, Reason.PROBE_ERROR, detail="ICMPv6 echo is not implemented")
    try:
        sock, raw = open_echo_socket(family)
    except OSError as exc:
        return sw.result(False, Reason.PROBE_ERROR, detail=f"no ICMP socket: {exc.strerror}")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    try:
        sock.connect(address)
    except OSError as exc:
        sock.close()
        return sw.result(False, reason_for_errno(exc.errno or 0), detail=exc.strerror or "")
    # a ping socket's identifier is its local "port", chosen by the kernel
    identifier = int(time.monotonic_ns() & 0xFFFF) if raw else int(sock.getsockname()[1])
    token = echo_token()
    payload = (token * (params.payload_size // len(token) + 1))[: max(params.payload_size, 8)]
    session = _EchoSession(count, raw, identifier, token, done)
    probe = DatagramProbe(sock, session.on_data, session.on_error)
    timer = loop.call_later(max(timeout - sw.elapsed(), 0.0), _finish, done)
    try:
        for seq in range(count):
            session.sent[seq] = probe.send(build_echo_request(identifier, seq, payload))
            if seq + 1 < count:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(done), params.interval)
                if done.done():
                    break
        wait = first_retry_after(params.interval, timeout)
        for retry in range(params.retries if count == 1 else 0):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), wait)
            if done.done():
                break
            session.sent[count + retry] = probe.send(
                build_echo_request(identifier, count + retry, payload))
            wait *= 2
        await done
    finally:
        timer.cancel()
        probe.close()
    sw.lap("echo")
    rtts = [session.rtts[s] for s in sorted(session.rtts)]
    resends = len(session.sent) - count
    # resends are how a liveness probe rides out loss, not loss figures: quality covers the
    # ``count`` echoes asked for (a resent echo that came back counts as that one answered)
    quality = quality_of(count, rtts[:count])
    facts: dict[str, str | int | float | bool] = {"socket": "raw" if raw else "ping",
                                                  "echo_resends": resends}
    if rtts:
        sw.phases["rtt"] = quality.rtt_p50_seconds or 0.0
        return sw.result(True, Reason.OK, quality=quality, facts=facts)
    if session.errors:
        first = session.errors[0]
        return sw.result(False, first.reason, quality=quality, detail=first.describe(),
                         facts=facts)
    if session.bad_packets:
        return sw.result(False, Reason.BAD_PACKET, quality=quality, facts=facts)
    return sw.result(False, Reason.TIMEOUT, quality=quality, facts=facts,
                     detail=f"no echo reply within {timeout:g}s")


TCP = CheckKind("tcp", Tier.L4, TcpParams, run_tcp,
                "TCP connect (phase connect), optional TLS handshake (phase tls)",
                start=start_tcp)
UDP = CheckKind("udp", Tier.L4, UdpParams, run_udp,
                "UDP request/response; reply must start with expect_prefix", start=start_udp)
ICMP = CheckKind("icmp", Tier.L4, IcmpParams, run_icmp,
                 "ICMP echo via ping socket (raw socket fallback)")


def plan(ctx: PlanContext) -> list[Planned]:
    """The ``l4:`` section -> one ``tcp:<port>`` per TCP port, one ``udp:<port>`` per UDP
    exchange, ``icmp`` when enabled."""
    target = ctx.target
    section = target.l4
    if section is None:
        return []
    out = [Planned(f"tcp:{port}", TCP, TcpParams(host=target.address, port=port))
           for port in section.tcp_ports]
    for ex in section.udp:
        expect = bytes.fromhex(ex.expect_hex) if ex.expect_hex is not None else None
        out.append(Planned(f"udp:{ex.port}", UDP,
                           UdpParams(host=target.address, port=ex.port,
                                     send=bytes.fromhex(ex.send_hex), expect_prefix=expect)))
    if section.icmp:
        out.append(Planned("icmp", ICMP, IcmpParams(host=target.address)))
    return out


P = TypeVar("P", bound=msgspec.Struct)


def _one(name: str, kind: CheckKind[P]) -> Callable[[P, PlanContext], list[Planned]]:
    """A command's options are the kind's params: the one check named ``name`` (a format with
    the params' fields, e.g. ``tcp:{port}``)."""
    def plan_one(params: P, ctx: PlanContext) -> list[Planned]:
        return [Planned(name.format_map(msgspec.structs.asdict(params)), kind, params)]
    return plan_one


def _icmp_problems(params: IcmpParams, at: str, base_dir: Path) -> Iterator[Problem]:
    if params.count < 1:
        yield Problem(f"{at}.count", f"must be >= 1, got {params.count}")


COMMANDS = (
    ProbeCommand(name="tcp", help="TCP connect, optionally followed by a TLS handshake",
                 options=TcpParams, plan=_one("tcp:{port}", TCP), positional=("host", "port"),
                 port_required=True, negated={"--insecure": "verify"}, default_timeout=2.0),
    ProbeCommand(name="udp", help="UDP request/response (ICMP unreachable via IP_RECVERR)",
                 options=UdpParams, plan=_one("udp:{port}", UDP), positional=("host", "port"),
                 port_required=True, aliases={"--send-hex": "send", "--expect-hex":
                                              "expect_prefix"}, default_timeout=2.0),
    ProbeCommand(name="icmp", help="ICMP echo (ping socket, raw socket fallback)",
                 options=IcmpParams, plan=_one("icmp", ICMP), validate=_icmp_problems,
                 positional=("host",), aliases={"--size": "payload_size"},
                 default_timeout=2.0),
)

FAMILY = Family("l4", (TCP, UDP, ICMP), plan,
                "Fast L4 checks: TCP connect, UDP exchange, ICMP echo", COMMANDS)
