"""A TCP transaction through the tunnel (docs/probes/user-path.md, "TCP transaction").

After the tunnel is up, one TCP connection from the agent's inner address to a server beyond
the node, on the agent's own user-space TCP (:mod:`probes.protocols.tcp`): the agent has no
kernel interface for the tunnel (it speaks the VPN protocols itself, as an unprivileged
process), so the kernel's TCP cannot carry it. Then, as configured, a TLS handshake (Python's
``ssl`` over memory BIOs: the certificate verified as a browser would) and an HTTP HEAD; then a
FIN. Phases ``connect``, ``tls``, ``http``.

Reasons, each with the phase in the detail:

* ``timeout``: no SYN-ACK within ``connect_timeout`` (the node forwards nothing, or the server
  is gone), or the TLS
  handshake or the HTTP answer stalls (segments resent ``max_sends`` times unanswered count);
* ``refused``: a RST to the SYN (nothing listens there); ``icmp-unreachable``: an ICMP error
  quoting our segment came back through the tunnel (the detail says who sent it);
* ``tls-failed``, ``cert-verify-failed``, ``cert-expired``: as the L4 TLS check says them;
* ``bad-response``: the connection reset after the handshake, or an answer that is not HTTP;
* ``unexpected-reply``: an HTTP status not in ``expect_status``.
"""

from __future__ import annotations

import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from probes.checks.base import CheckResult, ProbeFailure
from probes.checks.l4 import certificate_failure, tls_client_context
from probes.checks.tunnel import Tunnel, TunnelProbe
from probes.config import TransactionCheck
from probes.model import Reason
from probes.protocols import ipv4, tcp

CLOSE_WAIT = 0.3  # seconds to let our FIN and the server's be acknowledged: not the node's time
MAX_HEAD_BYTES = 16_384  # an HTTP answer's head must end within this


@dataclass
class _Connection:
    """One user-space TCP connection through ``tunnel``, pumped until a condition holds."""

    tunnel: Tunnel
    tcp: tcp.TcpClient
    deadline: float
    inbox: bytearray = field(default_factory=bytearray)
    connected: bool = False
    peer_closed: bool = False
    failure: ProbeFailure | None = None
    phase: str = "connect"

    def flush(self) -> None:
        for packet in self.tcp.packets_to_send(time.monotonic()):
            self.tunnel.send(packet)

    async def until(self, done: Callable[[], bool], stalled: str, *,
                    deadline: float | None = None, fail: bool = True) -> None:
        """Pump segments until ``done()``; a failure (RST, ICMP error, given up) or the deadline
        raises :class:`ProbeFailure` (``stalled`` says what never came), unless not ``fail``."""
        until = self.deadline if deadline is None else deadline
        self.flush()
        while not done():
            if self.failure is not None:
                if not fail:
                    return
                raise self.failure
            now = time.monotonic()
            if now >= until:
                if not fail:
                    return
                raise ProbeFailure(Reason.TIMEOUT, f"{stalled} ({self.phase})", self.phase)
            timer = self.tcp.get_timer()
            got = await self.tunnel.receive(min(until, timer) if timer is not None else until)
            if got is not None:
                self._take(got[0])
            self.tcp.handle_timer(time.monotonic())
            self._events()
            self.flush()

    def _take(self, packet: bytes) -> None:
        c = self.tcp
        parsed = ipv4.parse(packet)
        if isinstance(parsed, ipv4.TcpSegment):
            if (parsed.src, parsed.sport, parsed.dport) == (c.dst, c.dport, c.sport):
                c.receive(parsed, time.monotonic())
        elif (isinstance(parsed, ipv4.IcmpError) and parsed.proto == ipv4.PROTO_TCP
              and parsed.dst == c.dst and parsed.first == c.sport and parsed.second == c.dport):
            self.failure = ProbeFailure(
                Reason.ICMP_UNREACHABLE,
                f"{parsed.describe()} for {c.dst}:{c.dport} ({self.phase})", self.phase)

    def _events(self) -> None:
        c = self.tcp
        while (event := c.next_event()) is not None:
            if isinstance(event, tcp.Connected):
                self.connected = True
            elif isinstance(event, tcp.Received):
                self.inbox += event.data
            elif isinstance(event, tcp.PeerClosed):
                self.peer_closed = True
            elif isinstance(event, tcp.Reset):
                self.failure = (
                    ProbeFailure(Reason.REFUSED, f"{c.dst}:{c.dport} answered the SYN with a "
                                                 "RST: nothing listens there", self.phase)
                    if event.during_connect else
                    ProbeFailure(Reason.BAD_RESPONSE, f"{c.dst}:{c.dport} reset the connection "
                                                      f"({self.phase})", self.phase))
            else:
                what = "the SYN" if event.connecting else "a segment"
                self.failure = ProbeFailure(
                    Reason.TIMEOUT, f"{what} to {c.dst}:{c.dport} went unanswered "
                                    f"{event.sends} times ({self.phase})", self.phase)

    def take_inbox(self) -> bytes:
        data = bytes(self.inbox)
        self.inbox.clear()
        return data


class _Tls:
    """A TLS client over the connection (memory BIOs: the bytes go through our TCP)."""

    def __init__(self, conn: _Connection, check: TransactionCheck) -> None:
        self.conn = conn
        try:
            context = tls_client_context(check.ca_file, check.verify)
        except (OSError, ssl.SSLError) as exc:
            raise ProbeFailure(Reason.PROBE_ERROR, f"TLS setup: {exc}") from None
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing,
                                    server_hostname=check.server_name or check.address)

    def _push(self) -> None:
        data = self.outgoing.read()
        if data:
            self.conn.tcp.send(data, time.monotonic())

    async def _more(self, stalled: str) -> None:
        """Wait for bytes (or the end) from the server and hand them to TLS."""
        conn = self.conn
        self._push()
        await conn.until(lambda: bool(conn.inbox) or conn.peer_closed, stalled)
        if conn.inbox:
            self.incoming.write(conn.take_inbox())
        elif conn.peer_closed:
            self.incoming.write_eof()

    async def handshake(self) -> str:
        while True:
            try:
                self.tls.do_handshake()
                self._push()
                return str(self.tls.version())
            except ssl.SSLWantReadError:
                await self._more("the server's TLS handshake stalled")
            except ssl.SSLCertVerificationError as exc:
                reason, detail = certificate_failure(exc)
                raise ProbeFailure(reason, detail, "tls") from None
            except ssl.SSLError as exc:
                raise ProbeFailure(Reason.TLS_FAILED, f"TLS handshake: {exc.reason or exc}",
                                   "tls") from None

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._push()

    async def receive(self) -> bytes:
        """Application bytes, or b"" at the end of the stream."""
        while True:
            try:
                return self.tls.read(MAX_HEAD_BYTES)
            except ssl.SSLWantReadError:
                if self.conn.peer_closed and not self.conn.inbox:
                    return b""
                await self._more("the HTTP answer stalled")
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLError as exc:
                raise ProbeFailure(Reason.TLS_FAILED, f"TLS after the handshake: "
                                                      f"{exc.reason or exc}", "http") from None


async def transaction_step(tunnel: Tunnel, probe: TunnelProbe,
                           check: TransactionCheck) -> CheckResult:
    """Connect, TLS, HEAD, FIN through ``tunnel``: judged as the module says. A failure ends
    the connection with a RST: the server must not wait for the rest of a handshake."""
    client = tcp.TcpClient(tunnel.source, check.address, 1024 + secrets.randbelow(64_000),
                           check.port, secrets.randbits(32), mss=check.mss)
    conn = _Connection(tunnel, client, probe.deadline)
    try:
        return await _exchange(conn, tunnel, probe, check)
    except ProbeFailure:
        client.abort()
        conn.flush()
        raise


async def _exchange(conn: _Connection, tunnel: Tunnel, probe: TunnelProbe,
                    check: TransactionCheck) -> CheckResult:
    client = conn.tcp
    facts = probe.facts
    started = time.monotonic()
    client.connect(started)
    await conn.until(lambda: conn.connected,
                     f"no SYN-ACK from {check.address}:{check.port} through the {tunnel.kind} "
                     f"within {check.connect_timeout:g}s",
                     deadline=min(probe.deadline, started + check.connect_timeout))
    probe.watch.lap("connect")
    tls: _Tls | None = None
    if check.tls:
        conn.phase = "tls"
        tls = _Tls(conn, check)
        facts["transaction_tls_version"] = await tls.handshake()
        probe.watch.lap("tls")
    if check.http_path is not None:
        conn.phase = "http"
        status = await _head(conn, tls, check)
        probe.watch.lap("http")
        facts["transaction_http_status"] = status
        if check.expect_status and status not in check.expect_status:
            await _leave(conn)
            return probe.watch.result(
                False, Reason.UNEXPECTED_REPLY, facts=facts,
                detail=f"HTTP {status} from {check.address}:{check.port}, expected one of "
                       f"{', '.join(map(str, check.expect_status))}")
    await _leave(conn)
    facts["transaction_segments_dropped"] = client.dropped
    return probe.watch.result(True, Reason.OK, facts=facts)


async def _head(conn: _Connection, tls: _Tls | None, check: TransactionCheck) -> int:
    host = check.server_name or check.address
    request = (f"HEAD {check.http_path} HTTP/1.1\r\nHost: {host}\r\n"
               "User-Agent: tunnelwatch\r\nAccept: */*\r\nConnection: close\r\n\r\n").encode()
    head = bytearray()
    if tls is not None:
        tls.send(request)
    else:
        conn.tcp.send(request, time.monotonic())
    while b"\r\n\r\n" not in head and len(head) < MAX_HEAD_BYTES:
        if tls is not None:
            chunk = await tls.receive()
        else:
            await conn.until(lambda: bool(conn.inbox) or conn.peer_closed,
                             "the HTTP answer stalled")
            chunk = conn.take_inbox()
        if not chunk:
            break
        head += chunk
    return parse_status(bytes(head), f"{check.address}:{check.port}")


def parse_status(head: bytes, where: str) -> int:
    """The status code of an HTTP/1.x answer's head; :class:`ProbeFailure` when it is not one."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ", 2)
    if (b"\r\n\r\n" not in head or len(parts) < 2 or not parts[0].startswith(b"HTTP/1.")
            or not (parts[1].isdigit() and len(parts[1]) == 3)):
        shown = line[:60].decode("ascii", "replace")
        raise ProbeFailure(Reason.BAD_RESPONSE, f"not an HTTP/1 answer from {where}: "
                                                f"{shown!r}", "http")
    return int(parts[1])


async def _leave(conn: _Connection) -> None:
    """FIN, and a moment for both FINs to be acknowledged; a RST if they are not (the server
    frees the connection either way). Never a failure: the exchange is done."""
    c = conn.tcp
    c.close(time.monotonic())
    until = min(conn.deadline, time.monotonic() + CLOSE_WAIT)
    await conn.until(lambda: c.all_acknowledged and conn.peer_closed, "", deadline=until,
                     fail=False)
    if not (c.all_acknowledged and conn.peer_closed):
        c.abort()
        conn.flush()
