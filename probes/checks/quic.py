"""QUIC / HTTP/3 and MASQUE check kinds, on aioquic.

* ``quic.handshake``: a QUIC handshake with ALPN ``h3`` and certificate verification against a
  configured CA. Facts: ALPN, QUIC version, and (with ``resume``) whether a second handshake with
  the session ticket was resumed and its 0-RTT accepted.
* ``quic.connect-udp``: extended CONNECT ``:protocol connect-udp`` (RFC 9298 over RFC 9220) to a
  target, then HTTP datagrams (RFC 9297, context ID 0) echoed through the proxy: RTT and loss.
* ``quic.connect-ip``: extended CONNECT ``:protocol connect-ip`` (RFC 9484) up to a 2xx and a
  parsed ADDRESS_ASSIGN capsule.

aioquic's sans-I/O ``QuicConnection`` runs on the shared driver (:mod:`probes.checks.driver`), like
every other core, not on ``aioquic.asyncio``: that binds a dual-stack ``AF_INET6`` socket, which
fails on hosts without IPv6 (aioquic#253, #459), has no timeout and hides ICMP errors. The
driver's socket is in the target's own address family and *connected*, so ICMP port unreachable
comes back with its details (``IP_RECVERR``), and every wait ends at the check's deadline.

HTTP/3 datagrams need the ``H3_DATAGRAM`` setting, which aioquic only sends with WebTransport
enabled: :class:`H3DatagramConnection` adds it (and the peer needs the ``max_datagram_frame_size``
transport parameter, set in :func:`client_configuration`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path

import msgspec
from aioquic.h3.connection import H3Connection, Setting
from aioquic.h3.events import DatagramReceived, DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, QuicEvent, StreamReset
from aioquic.tls import SessionTicket
from cryptography import x509

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
from probes.checks.driver import Driver, Unreachable
from probes.checks.l4 import resolve
from probes.checks.tunnel import build_echo, echo_matcher, echo_quality, judge_echoes
from probes.config import MAX_ECHO_PAYLOAD, QUICTarget, parse_host_port, quic_problems
from probes.model import Reason, Tier
from probes.protocols import capsules as cap
from probes.protocols.core import Address

H3_ALPN = "h3"
MAX_DATAGRAM_FRAME_SIZE = 65536
ECHO_GRACE = 1.0  # seconds to wait for stragglers after the last datagram was sent
TICKET_WAIT = 1.0  # seconds to wait for a session ticket after the first handshake
_ECHO_MAGIC = b"twq1"

# TLS alerts (RFC 8446 §6) arrive as QUIC CRYPTO_ERROR 0x100 + alert (RFC 9001 §4.8)
_CRYPTO_ERROR = 0x100
_ALERT_CERT_EXPIRED = 45
_ALERT_NO_APPLICATION_PROTOCOL = 120
_CERT_ALERTS = frozenset({42, 43, 44, 46, 48})  # bad / unsupported / revoked / unknown / unknown_ca


class QuicParams(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    port: int = 443
    server_name: str | None = None  # SNI and the name to verify; default: host
    ca_file: str | None = None  # PEM CA bundle; default: certifi's bundle
    verify: bool = True
    alpn: str = H3_ALPN
    resume: bool = False  # handshake: reconnect with the session ticket (resumption, 0-RTT facts)
    # connect-udp
    target: str | None = None  # "host:port" of a UDP echo service behind the proxy
    echo_count: int = 5
    echo_interval: float = 0.05
    payload_size: int = 32
    loss_threshold: float = 0.5  # fail with tunnel-loss-over-threshold above this ratio
    rtt_threshold: float | None = None  # fail with tunnel-rtt-over-threshold if p50 is above
    # connect-ip
    ip_target: str = "*"  # RFC 9484 template variables; "*" = any
    ip_protocol: str = "*"
    ip_ping: str | None = None  # in-tunnel IPv4 address to ICMP-echo after ADDRESS_ASSIGN


class H3DatagramConnection(H3Connection):
    """An HTTP/3 connection that announces ``SETTINGS_H3_DATAGRAM`` (RFC 9297 §2.1.1)."""

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        settings[Setting.H3_DATAGRAM] = 1
        return settings


def client_configuration(params: QuicParams) -> QuicConfiguration:
    """The aioquic client configuration; raises :class:`ConfigError` for a bad CA file."""
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[params.alpn],
        server_name=params.server_name or params.host,
        max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
        verify_mode=ssl.CERT_REQUIRED if params.verify else ssl.CERT_NONE,
    )
    if params.ca_file:
        try:
            cadata = Path(params.ca_file).read_bytes()
            x509.load_pem_x509_certificates(cadata)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load CA file {params.ca_file}: {exc}") from None
        config.cadata = cadata
    return config


def split_target(target: str) -> tuple[str, int]:
    """``"host:port"`` / ``"[v6]:port"`` -> (host, port); raises :class:`ConfigError`."""
    try:
        return parse_host_port(target)
    except ValueError as exc:
        raise ConfigError(f"target must be host:port: {exc}") from None


def reason_for_close(event: ConnectionTerminated) -> Reason:
    """Closed-enum reason for a QUIC connection closed during a check."""
    code = event.error_code
    if _CRYPTO_ERROR <= code < _CRYPTO_ERROR + 0x100:
        alert = code - _CRYPTO_ERROR
        if alert == _ALERT_NO_APPLICATION_PROTOCOL:
            return Reason.NO_ALPN
        if alert == _ALERT_CERT_EXPIRED:
            return Reason.CERT_EXPIRED
        if alert in _CERT_ALERTS:
            return Reason.CERT_VERIFY_FAILED
        return Reason.TLS_FAILED
    return Reason.BAD_RESPONSE


def _reason_for_socket_error(exc: OSError) -> Reason:
    if exc.errno == errno.ECONNREFUSED:
        return Reason.ICMP_UNREACHABLE  # ICMP port unreachable on the connected socket
    if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL):
        return Reason.NETWORK_UNREACHABLE
    return Reason.PROBE_ERROR


class _Quic(QuicConnection):
    """aioquic's sans-I/O connection with the start verb every core has."""

    def __init__(self, remote: Address, configuration: QuicConfiguration,
                 tickets: list[SessionTicket] | None) -> None:
        super().__init__(configuration=configuration,
                         session_ticket_handler=tickets.append if tickets is not None else None)
        self.remote = remote

    def start(self, now: float) -> None:
        self.connect(self.remote, now)

    @property
    def version(self) -> int | None:
        version: int | None = self._version  # aioquic has no public getter
        return version


class _Reset(H3Event):
    """The peer reset a stream (aioquic's H3 layer does not surface this as an event)."""

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code


class _Session:
    """One QUIC connection on the driver, and its HTTP/3 layer once the handshake chose h3."""

    def __init__(self, quic: _Quic, driver: Driver[QuicEvent], deadline: float) -> None:
        self.quic = quic
        self.driver = driver
        self.deadline = deadline
        self.h3: H3DatagramConnection | None = None
        self.handshake: HandshakeCompleted | None = None
        self.h3_events: collections.deque[H3Event] = collections.deque()

    async def step(self) -> None:
        """Handle the next event; a closed connection or socket error is the check's end."""
        event = await self.driver.next_event(self.deadline)
        if event is None:
            raise TimeoutError
        if isinstance(event, Unreachable):
            raise ProbeFailure(event.error.reason, str(event.error))
        if isinstance(event, ConnectionTerminated):
            raise ProbeFailure(reason_for_close(event), f"connection closed: error "
                               f"0x{event.error_code:x} {event.reason_phrase}".strip())
        if isinstance(event, HandshakeCompleted):
            self.handshake = event
            if event.alpn_protocol == H3_ALPN:
                self.h3 = H3DatagramConnection(self.quic)
        elif isinstance(event, StreamReset):
            self.h3_events.append(_Reset(event.stream_id, event.error_code))
        if self.h3 is not None and isinstance(event, QuicEvent):
            self.h3_events.extend(self.h3.handle_event(event))

    async def settings(self, h3: H3Connection) -> dict[int, int]:
        while h3.received_settings is None:
            await self.step()
        return h3.received_settings

    async def next_h3_event(self) -> H3Event:
        while not self.h3_events:
            await self.step()
        return self.h3_events.popleft()


@contextlib.asynccontextmanager
async def _connection(params: QuicParams, config: QuicConfiguration, sw: Stopwatch,
                      deadline: float, tickets: list[SessionTicket] | None = None,
                      ) -> AsyncIterator[_Session]:
    """A QUIC connection over a connected UDP socket of the target's own address family."""
    try:
        _, address = await resolve(params.host, params.port, socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as exc:
        raise ProbeFailure(Reason.RESOLVE_FAILED, f"cannot resolve {params.host}: {exc}") from None
    sw.lap("resolve")
    remote = (str(address[0]), int(address[1]))
    quic = _Quic(remote, config, tickets)
    driver: Driver[QuicEvent] = Driver(quic)
    try:
        await driver.open_udp(remote)
    except OSError as exc:
        raise ProbeFailure(_reason_for_socket_error(exc), str(exc)) from None
    try:
        quic.start(time.monotonic())
        yield _Session(quic, driver, deadline)
    finally:
        quic.close()  # CONNECTION_CLOSE now: no draining period for a probe
        driver.flush()
        driver.close()


async def _handshake(conn: _Session, params: QuicParams, sw: Stopwatch,
                     phase: str = "handshake") -> HandshakeCompleted:
    while conn.handshake is None:
        await conn.step()
    done = conn.handshake
    sw.lap(phase)
    if done.alpn_protocol != params.alpn:
        raise ProbeFailure(Reason.NO_ALPN, f"server chose ALPN {done.alpn_protocol!r}")
    return done


_Body = Callable[[QuicParams, QuicConfiguration, Stopwatch, dict[str, Fact], float],
                 Awaitable[CheckResult]]


async def _run(params: QuicParams, timeout: float, body: _Body) -> CheckResult:
    """Common frame: configuration, a hard time bound, and reasons for every way out."""
    sw = Stopwatch()
    facts: dict[str, Fact] = {}
    try:
        config = client_configuration(params)
        return await body(params, config, sw, facts, time.monotonic() + timeout)
    except (ProbeFailure, ConfigError) as exc:
        return sw.failed(exc, facts)
    except TimeoutError:
        return sw.result(False, Reason.TIMEOUT, facts=facts,
                         detail=f"no answer within {timeout:g}s after {list(sw.phases)}")


# ----------------------------------------------------------------------------- handshake


async def _handshake_body(params: QuicParams, config: QuicConfiguration, sw: Stopwatch,
                          facts: dict[str, Fact], deadline: float) -> CheckResult:
    tickets: list[SessionTicket] = []
    async with _connection(params, config, sw, deadline, tickets) as conn:
        done = await _handshake(conn, params, sw)
        facts["alpn"] = done.alpn_protocol or ""
        if (version := conn.quic.version) is not None:
            facts["quic_version"] = f"0x{version:08x}"
        facts["session_resumed"] = done.session_resumed
        if not params.resume:
            return sw.result(True, Reason.OK, facts=facts)
        # the server sends NewSessionTicket right after the handshake; give it a moment
        conn.deadline = min(deadline, time.monotonic() + TICKET_WAIT)
        with contextlib.suppress(TimeoutError):
            while not tickets:
                await conn.step()
        sw.lap("ticket")
    facts["ticket_received"] = bool(tickets)
    if not tickets:
        return sw.result(True, Reason.OK, facts=facts, detail="no session ticket to resume with")
    config.session_ticket = tickets[-1]
    async with _connection(params, config, sw, deadline) as again:
        resumed = await _handshake(again, params, sw, "resumed_handshake")
        facts["resumed"] = resumed.session_resumed
        facts["early_data_accepted"] = resumed.early_data_accepted
    return sw.result(True, Reason.OK, facts=facts)


run_handshake = partial(_run, body=_handshake_body)


# ------------------------------------------------------------------------ extended CONNECT


def _path_segment(value: str) -> str:
    # RFC 9298 §2: IPv6 literals go into the URI template with their colons percent-encoded
    return value.replace("%", "%25").replace(":", "%3A")


async def _extended_connect(conn: _Session, params: QuicParams, sw: Stopwatch,
                            protocol: str, path: str) -> tuple[H3Connection, int]:
    """Handshake, SETTINGS, then CONNECT with ``:protocol``; returns the stream on a 2xx."""
    await _handshake(conn, params, sw)
    h3 = conn.h3
    assert h3 is not None  # _handshake checked the ALPN
    settings = await conn.settings(h3)
    sw.lap("settings")
    if settings.get(Setting.ENABLE_CONNECT_PROTOCOL) != 1:
        raise ProbeFailure(Reason.BAD_RESPONSE, "server does not allow extended CONNECT (RFC 9220)")
    if settings.get(Setting.H3_DATAGRAM) != 1:
        raise ProbeFailure(Reason.BAD_RESPONSE, "server does not support HTTP datagrams (RFC 9297)")
    authority = (params.server_name or params.host).encode()
    if params.port != 443:
        authority += b":%d" % params.port
    stream_id = conn.quic.get_next_available_stream_id()
    h3.send_headers(stream_id, [
        (b":method", b"CONNECT"), (b":protocol", protocol.encode()), (b":scheme", b"https"),
        (b":authority", authority), (b":path", path.encode()), (b"capsule-protocol", b"?1"),
        (b"user-agent", b"tunnelwatch"),
    ])
    while True:
        event = await conn.next_h3_event()
        if isinstance(event, _Reset) and event.stream_id == stream_id:
            raise ProbeFailure(Reason.CONNECT_REFUSED,
                               f"stream reset, error 0x{event.error_code:x}")
        if not isinstance(event, HeadersReceived) or event.stream_id != stream_id:
            continue
        status = dict(event.headers).get(b":status", b"")
        if status.startswith(b"1"):
            continue  # interim response
        sw.lap("connect")
        if not status.startswith(b"2"):
            raise ProbeFailure(Reason.CONNECT_REFUSED,
                               f"CONNECT {protocol}: status {status.decode()}")
        if event.stream_ended:
            raise ProbeFailure(Reason.BAD_RESPONSE, "2xx response ended the stream")
        return h3, stream_id


def _echo_payload(seq: int, size: int) -> bytes:
    head = _ECHO_MAGIC + seq.to_bytes(4, "big")
    return head + os.urandom(max(0, size - len(head)))


def _echo_payload_seq(payload: bytes) -> int | None:
    if len(payload) < len(_ECHO_MAGIC) + 4 or not payload.startswith(_ECHO_MAGIC):
        return None
    return int.from_bytes(payload[len(_ECHO_MAGIC):len(_ECHO_MAGIC) + 4], "big")


def _check_echo_params(params: QuicParams) -> None:
    if not 1 <= params.echo_count <= 10_000:
        raise ConfigError(f"echo_count must be 1..10000, got {params.echo_count}")
    if not 0 <= params.payload_size <= MAX_ECHO_PAYLOAD:
        raise ConfigError(f"payload_size must be 0..{MAX_ECHO_PAYLOAD}")


async def _echo_through(conn: _Session, h3: H3Connection, stream_id: int,
                        params: QuicParams, *, build: Callable[[int], tuple[bytes, int]],
                        key_of: Callable[[bytes], int | None]) -> list[float]:
    """Send ``echo_count`` HTTP datagrams (context ID 0) and time the replies.

    ``build(seq)`` gives a payload and the key its reply must carry; ``key_of(payload)`` reads
    the key of a received payload (None: not ours). Returns the RTTs of the replies that came.
    """
    sent_at: dict[int, float] = {}
    rtts: list[float] = []
    parser = cap.CapsuleParser()

    def on_payload(data: bytes, now: float) -> None:
        try:
            context_id, payload = cap.decode_http_datagram(data)
        except cap.CapsuleError:
            return
        key = key_of(payload) if context_id == 0 else None
        sent = sent_at.pop(key, None) if key is not None else None
        if sent is not None:
            rtts.append(now - sent)

    async def sender() -> None:
        for seq in range(params.echo_count):
            payload, key = build(seq)
            sent_at[key] = time.monotonic()
            h3.send_datagram(stream_id, cap.encode_http_datagram(0, payload))
            conn.driver.flush()
            await asyncio.sleep(params.echo_interval)

    send_task = asyncio.create_task(sender())
    # stop early enough to report what came back rather than a bare timeout
    conn.deadline = min(conn.deadline, time.monotonic() + params.echo_count * params.echo_interval
                        + ECHO_GRACE)
    try:
        with contextlib.suppress(TimeoutError):
            while len(rtts) < params.echo_count:
                event = await conn.next_h3_event()
                now = time.monotonic()
                if isinstance(event, DatagramReceived) and event.stream_id == stream_id:
                    on_payload(event.data, now)
                elif isinstance(event, DataReceived) and event.stream_id == stream_id:
                    # datagrams may also come as DATAGRAM capsules on the stream
                    for capsule in parser.feed(event.data):
                        if capsule.type == cap.CapsuleType.DATAGRAM:
                            on_payload(capsule.value, now)
                    if event.stream_ended:
                        raise ProbeFailure(Reason.TUNNEL_NO_REPLY, "proxy ended the stream")
    except cap.CapsuleError as exc:
        raise ProbeFailure(Reason.BAD_PACKET, f"bad capsule: {exc}") from None
    finally:
        send_task.cancel()
    return rtts


def _echo_result(params: QuicParams, sw: Stopwatch, rtts: list[float],
                 facts: dict[str, Fact]) -> CheckResult:
    return judge_echoes(sw, echo_quality(params.echo_count, rtts), facts,
                        loss_threshold=params.loss_threshold, rtt_threshold=params.rtt_threshold,
                        no_reply="no echo came back through the proxy")


async def _connect_udp_body(params: QuicParams, config: QuicConfiguration, sw: Stopwatch,
                            facts: dict[str, Fact], deadline: float) -> CheckResult:
    if not params.target:
        raise ConfigError("quic.connect-udp needs a target (host:port)")
    target_host, target_port = split_target(params.target)
    _check_echo_params(params)
    path = f"/.well-known/masque/udp/{_path_segment(target_host)}/{target_port}/"
    facts["target"] = params.target
    async with _connection(params, config, sw, deadline) as conn:
        h3, stream_id = await _extended_connect(conn, params, sw, "connect-udp", path)
        rtts = await _echo_through(
            conn, h3, stream_id, params,
            build=lambda seq: (_echo_payload(seq, params.payload_size), seq),
            key_of=_echo_payload_seq)
        sw.lap("echo")
        with contextlib.suppress(Exception):
            h3.send_data(stream_id, b"", end_stream=True)
    return _echo_result(params, sw, rtts, facts)


run_connect_udp = partial(_run, body=_connect_udp_body)


async def _connect_ip_body(params: QuicParams, config: QuicConfiguration, sw: Stopwatch,
                           facts: dict[str, Fact], deadline: float) -> CheckResult:
    path = (f"/.well-known/masque/ip/{_path_segment(params.ip_target)}/"
            f"{_path_segment(params.ip_protocol)}/")
    try:
        ping = ipaddress.IPv4Address(params.ip_ping) if params.ip_ping else None
    except ValueError:
        raise ConfigError(f"ip_ping must be an IPv4 address, got {params.ip_ping!r}") from None
    if ping is not None:
        _check_echo_params(params)
    async with _connection(params, config, sw, deadline) as conn:
        h3, stream_id = await _extended_connect(conn, params, sw, "connect-ip", path)
        # ask for any IPv4 address (RFC 9484 §4.7.2: all-zero address = no preference)
        request = cap.PrefixedAddress(1, ipaddress.IPv4Address(0), 32)
        h3.send_data(stream_id, cap.encode_capsule(
            cap.CapsuleType.ADDRESS_REQUEST, cap.encode_prefixed_addresses([request])), False)
        parser = cap.CapsuleParser()
        assigned: list[cap.PrefixedAddress] | None = None
        routes: list[cap.AddressRange] = []
        try:
            while assigned is None:
                event = await conn.next_h3_event()
                if not isinstance(event, DataReceived) or event.stream_id != stream_id:
                    continue
                for capsule in parser.feed(event.data):
                    if capsule.type == cap.CapsuleType.ADDRESS_ASSIGN:
                        assigned = cap.decode_prefixed_addresses(capsule.value, request=False)
                    elif capsule.type == cap.CapsuleType.ROUTE_ADVERTISEMENT:
                        routes = cap.decode_route_advertisement(capsule.value)
                if assigned is None and event.stream_ended:
                    parser.end()
                    raise ProbeFailure(Reason.BAD_RESPONSE, "stream ended without ADDRESS_ASSIGN")
        except cap.CapsuleError as exc:
            raise ProbeFailure(Reason.BAD_PACKET, f"bad capsule: {exc}") from None
        sw.lap("address_assign")
        if not assigned:
            return sw.result(False, Reason.BAD_RESPONSE, facts=facts,
                             detail="ADDRESS_ASSIGN assigned no address")
        facts["assigned"] = ",".join(f"{a.address}/{a.prefix_length}" for a in assigned)
        facts["routes"] = len(routes)
        if ping is None:
            with contextlib.suppress(Exception):
                h3.send_data(stream_id, b"", end_stream=True)
            return sw.result(True, Reason.OK, facts=facts)
        source = next((a.address for a in assigned
                       if isinstance(a.address, ipaddress.IPv4Address)), None)
        if source is None:
            return sw.result(False, Reason.BAD_RESPONSE, facts=facts,
                             detail="no IPv4 address assigned to ping from")
        ident = int.from_bytes(os.urandom(2), "big")
        pad = bytes(max(0, params.payload_size))
        rtts = await _echo_through(
            conn, h3, stream_id, params,
            build=lambda seq: (build_echo(str(source), str(ping), ident, seq, pad), seq),
            key_of=echo_matcher(ident))
        sw.lap("echo")
        with contextlib.suppress(Exception):
            h3.send_data(stream_id, b"", end_stream=True)
    facts["ping"] = str(ping)
    return _echo_result(params, sw, rtts, facts)


run_connect_ip = partial(_run, body=_connect_ip_body)


HANDSHAKE = CheckKind(
    "quic.handshake", Tier.FUNCTIONAL, QuicParams, run_handshake,
    "QUIC handshake with ALPN h3 and certificate verification; resumption and 0-RTT facts")
CONNECT_UDP = CheckKind(
    "quic.connect-udp", Tier.SESSION, QuicParams, run_connect_udp,
    "MASQUE CONNECT-UDP (RFC 9298): HTTP datagrams echoed through the proxy, RTT and loss")
CONNECT_IP = CheckKind(
    "quic.connect-ip", Tier.SESSION, QuicParams, run_connect_ip,
    "MASQUE CONNECT-IP (RFC 9484): 2xx, a parsed ADDRESS_ASSIGN, optional in-tunnel ICMP echo")


def plan(ctx: PlanContext) -> list[Planned]:
    """The ``quic:`` section -> ``quic.handshake``; ``quic.connect-udp`` when
    ``connect_udp_target`` is set; ``quic.connect-ip`` only with ``connect_ip`` or when the
    target's ``checks`` ask for it (an HTTP/3 node is not necessarily a MASQUE proxy)."""
    section = ctx.target.quic
    if section is None:
        return []
    base = QuicParams(host=ctx.target.address, port=section.port,
                      server_name=section.server_name, ca_file=ctx.path(section.ca_file),
                      verify=section.verify, alpn=section.alpn, resume=section.resume,
                      target=section.connect_udp_target, echo_count=section.echo_count,
                      echo_interval=section.echo_interval, payload_size=section.payload_size,
                      loss_threshold=section.loss_threshold, rtt_threshold=section.rtt_threshold,
                      ip_ping=section.ip_ping)
    out = [Planned.of(HANDSHAKE, base)]
    if section.connect_udp_target is not None:
        out.append(Planned.of(CONNECT_UDP, base))
    if section.connect_ip or CONNECT_IP.name in ctx.target.checks:
        out.append(Planned.of(CONNECT_IP, base))
    return out


def _preflight(planned: Planned) -> None:
    params: QuicParams = planned.params
    client_configuration(params)  # the CA file
    if params.target is not None:
        split_target(params.target)


COMMAND = ProbeCommand(
    name="quic", help="QUIC/HTTP/3 handshake, or MASQUE CONNECT-UDP / CONNECT-IP",
    description="QUIC handshake (ALPN h3, certificate verified), or a MASQUE session: "
                "CONNECT-UDP with HTTP datagrams echoed through the proxy (RTT, loss), or "
                "CONNECT-IP up to a parsed ADDRESS_ASSIGN capsule.",
    options=QUICTarget, plan=section_plan("quic", plan), validate=quic_problems,
    preflight=_preflight,
    positional=("host",),
    aliases={"--connect-udp": "connect_udp_target", "--count": "echo_count",
             "--interval": "echo_interval", "--size": "payload_size"},
    negated={"--insecure": "verify"})

FAMILY = Family("quic", (HANDSHAKE, CONNECT_UDP, CONNECT_IP), plan,
                "QUIC / MASQUE: HTTP/3 handshake, CONNECT-UDP and CONNECT-IP sessions",
                (COMMAND,))
