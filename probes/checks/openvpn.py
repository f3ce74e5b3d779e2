"""OpenVPN checks: ``openvpn.reset``, ``openvpn.tls``, ``openvpn.session``, ``openvpn.tunnel``.

A thin asyncio shell around the sans-I/O core :mod:`probes.protocols.openvpn`: it owns the socket
(UDP through :mod:`probes.checks.udp` for ICMP errors and kernel receive stamps; TCP with
TCP_NODELAY, since without it the small control packets wait ~40 ms for delayed ACKs), the clock
and the key files. Every level that got past TLS ends with ``EXIT`` so the server frees the
instance and its pool address at once instead of at ping-restart.

Levels, each including the ones before:

* ``reset``: the server answers a hard reset. Proves the daemon is up and, with tls-auth /
  tls-crypt / tls-crypt-v2, that our wrapping key is right (a wrong key gets silence).
* ``tls``: TLS handshake, the server chain verified against the configured CA and its EKU checked
  (``--remote-cert-tls server``), then key-method 2, which in TLS 1.3 is where the server's verdict
  on *our* certificate shows; certificate expiry is reported as facts.
* ``session``: PUSH_REPLY received; the pushed address and options are reported.
* ``tunnel``: data channel keys (TLS-EKM when pushed, else the key-method-2 PRF), K ICMP echoes to
  the server's tunnel address over DATA_V2, RTT and loss.

Outcomes (closed enum, :class:`probes.model.Reason`): ``reset-ignored`` (no answer to the hard
reset: a wrong wrapping key, or the host is down or filtered: over UDP these look alike),
``icmp-unreachable`` / ``refused`` (nothing listens), ``bad-packet`` (only unauthenticated answers),
``cert-verify-failed``, ``cert-expired``, ``tls-failed``, ``auth-failed`` (the server refused our
certificate or credentials), ``timeout`` (a later phase stalled), ``no-push-reply``,
``tunnel-no-reply``, ``tunnel-loss-over-threshold``, ``tunnel-rtt-over-threshold``,
``probe-error`` (our own configuration: unreadable key files).
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import socket
import ssl
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import msgspec

from probes.checks.base import (
    CLEANUP_GRACE_SECONDS,
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
    first_retry_after,
    section_plan,
)
from probes.checks.certs import chain_facts
from probes.checks.driver import Closed, Driver, Stream, Unreachable, connect_stream
from probes.checks.tunnel import (
    Tunnel,
    TunnelProbe,
    echo_node,
    in_turn,
    judge_echoes,
    run_through,
)
from probes.checks.udp import SendStamp, UdpEndpoint, round_trip_seconds
from probes.config import OpenVPNTarget, openvpn_problems
from probes.model import Reason, Tier
from probes.protocols.core import BadDatagram
from probes.protocols.openvpn import ekm
from probes.protocols.openvpn import session as ov
from probes.protocols.openvpn.data import Framing
from probes.protocols.openvpn.keymethod import EKM_LABEL, KEY2_LEN
from probes.protocols.openvpn.packet import OpenVPNError, TcpDeframer, frame_tcp
from probes.protocols.openvpn.wrap import (
    NoWrap,
    ReplayCounter,
    TlsAuth,
    TlsCrypt,
    TlsCryptV2,
    Wrapper,
    parse_static_key,
    parse_tls_crypt_v2_client_key,
)

log = logging.getLogger(__name__)

EXIT_WAIT = 0.8  # seconds past the check's deadline we wait for the EXIT to be acknowledged
EXIT_MAX_WAIT = 2.0  # and at most this long in all
EXIT_RESEND = 0.25  # an unacknowledged EXIT goes out again this often (no backoff)
# A 2.6 server keeps an instance ~5 s after EXIT ("Delayed exit"); a new probe that the kernel
# gives the same source port would land in that dying instance, so recent ports are avoided.
SOURCE_PORT_QUARANTINE = 10.0
_PORT_TRIES = 8
_recent_ports: dict[tuple[str, int], dict[int, float]] = {}


class Level(enum.IntEnum):
    RESET = 0
    TLS = 1
    SESSION = 2
    TUNNEL = 3


class OpenVPNParams(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    port: int = 1194
    proto: str = "udp"  # "udp" or "tcp"
    ca_file: str | None = None  # required from the tls level on
    cert_file: str | None = None  # one certificate per agent: a shared one evicts other agents
    key_file: str | None = None
    tls_crypt_file: str | None = None
    tls_auth_file: str | None = None
    key_direction: int | None = None  # tls-auth only; a client normally uses 1
    auth_digest: str = "SHA1"  # tls-auth HMAC digest (--auth)
    tls_crypt_v2_file: str | None = None  # the client key
    auth_user_pass_file: str | None = None  # two lines: username, password
    retry_interval: float = 1.0  # first control-packet retransmission (earlier if the timeout
    # is short: two retries always fit in it); doubles after
    ciphers: tuple[str, ...] = ("AES-256-GCM", "CHACHA20-POLY1305")
    tls_ekm: bool = True  # offer TLS-EKM key derivation when this Python can export keys
    # tunnel only
    compression: str = "none"  # none | comp-lzo | compress | compress-v2: the server's framing
    echo_count: int = 5
    echo_interval: float = 0.05
    echo_target: str | None = None  # default: the server's tunnel address from PUSH_REPLY
    loss_threshold: float = 0.5
    rtt_threshold: float | None = None
    dns_resolver: str | None = None  # default: the first resolver PUSH_REPLY names


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


_TLS_VERSIONS = frozenset({"SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"})
_DIGESTS = frozenset({"MD5", "SHA1", "SHA224", "SHA256", "SHA384", "SHA512"})


def tls_crypto_facts(event: ov.TlsEstablished, params: OpenVPNParams) -> dict[str, Fact]:
    """What the server negotiated on the control channel, as ``crypto.*`` facts (exported as
    ``tunnelwatch_node_crypto_info`` labels): each value from a closed set or "unknown". The
    suite name is OpenSSL's, one of the few dozen it implements."""
    if params.tls_auth_file:
        digest = params.auth_digest.upper().replace("-", "")
        wrap = f"tls-auth-{digest if digest in _DIGESTS else 'unknown'}"
    else:
        wrap = ("tls-crypt" if params.tls_crypt_file else "tls-crypt-v2"
                if params.tls_crypt_v2_file else "none")
    return {"crypto.tls_version": event.version if event.version in _TLS_VERSIONS
            else "unknown",
            "crypto.tls_cipher_suite": event.cipher if event.cipher.replace("-", "_").replace(
                "_", "").isalnum() and len(event.cipher) <= 64 else "unknown",
            "crypto.tls_group": event.group or "unknown",
            "crypto.control_channel_wrap": wrap}


def build_wrapper(params: OpenVPNParams, wall_time: int) -> Wrapper:
    chosen = [p for p in (params.tls_crypt_file, params.tls_auth_file, params.tls_crypt_v2_file)
              if p]
    if len(chosen) > 1:
        raise ConfigError("use only one of tls-crypt, tls-auth and tls-crypt-v2")
    replay = ReplayCounter(wall_time)
    try:
        if params.tls_crypt_file:
            return TlsCrypt(parse_static_key(_read(params.tls_crypt_file, "tls-crypt key")),
                            replay)
        if params.tls_auth_file:
            return TlsAuth(parse_static_key(_read(params.tls_auth_file, "tls-auth key")), replay,
                           digest=params.auth_digest, key_direction=params.key_direction)
        if params.tls_crypt_v2_file:
            kc, wkc = parse_tls_crypt_v2_client_key(
                _read(params.tls_crypt_v2_file, "tls-crypt-v2 client key"))
            return TlsCryptV2(kc, wkc, replay)
    except OpenVPNError as exc:
        raise ConfigError(str(exc)) from None
    return NoWrap()


def build_ssl_context(params: OpenVPNParams) -> ssl.SSLContext:
    if not params.ca_file:
        raise ConfigError("the tls level and above need a CA file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # OpenVPN checks CA and EKU, not names (--remote-cert-tls)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(params.ca_file)
        if params.cert_file:
            context.load_cert_chain(params.cert_file, params.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS material: {exc}") from None
    return context


def parse_framing(name: str) -> Framing:
    try:
        return Framing(name)
    except ValueError:
        raise ConfigError(f"compression must be one of "
                          f"{', '.join(f.value for f in Framing)}, not {name!r}") from None


def read_user_pass(path: str) -> tuple[str, str]:
    lines = _read(path, "auth-user-pass file").splitlines()
    if len(lines) < 2:
        raise ConfigError(f"{path}: expected a username line and a password line")
    return lines[0].strip(), lines[1].rstrip("\r\n")


# --- one probe run ------------------------------------------------------------------------------

async def _open_fresh_udp(host: str, port: int) -> UdpEndpoint:
    """A connected UDP endpoint whose source port this process has not used toward the same
    server within :data:`SOURCE_PORT_QUARANTINE` seconds."""
    now = time.monotonic()
    recent = _recent_ports.setdefault((host, port), {})
    for old in [p for p, at in recent.items() if now - at > SOURCE_PORT_QUARANTINE]:
        del recent[old]
    endpoint = await UdpEndpoint.open(host, port)
    for _ in range(_PORT_TRIES):
        local_port = endpoint.local_address[1]
        if local_port not in recent:
            break
        retry = await UdpEndpoint.open(host, port)
        endpoint.close()
        endpoint = retry
    recent[endpoint.local_address[1]] = now
    return endpoint


# over UDP a control packet is retried twice within the timeout (first_retry_after), so one
# sent this often without an ACK is silence, not loss
SILENT_AFTER_SENDS = 3


class _Probe:
    def __init__(self, params: OpenVPNParams, level: Level, timeout: float) -> None:
        self.params = params
        self.level = level
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.watch = Stopwatch()
        self.facts: dict[str, Fact] = {"proto": params.proto}
        self.remote = (params.host, params.port)
        self.transport: UdpEndpoint | Stream | None = None  # until the driver adopts it
        self.session: ov.ClientSession | None = None
        self.driver: Driver[ov.Event] | None = None
        self.reset_answered = False
        self.tls_done = False
        self.key_exchanged = False
        self.last_bad_packet = ""
        self.framing = Framing.NONE
        self.transport_lost = False  # unreachable or closed: no EXIT to say

    # setup

    def build_session(self) -> ov.ClientSession:
        params = self.params
        if params.proto not in ("udp", "tcp"):
            raise ConfigError(f"proto must be udp or tcp, not {params.proto!r}")
        wrapper = build_wrapper(params, int(time.time()))
        self.framing = parse_framing(params.compression)
        user = password = None
        if params.auth_user_pass_file:
            user, password = read_user_pass(params.auth_user_pass_file)
        context = build_ssl_context(params) if self.level >= Level.TLS else None
        options = ov.SessionOptions(
            ssl_context=context, key_exchange=True, want_push=self.level >= Level.SESSION,
            username=user, password=password, ciphers=tuple(params.ciphers),
            tls_ekm=self.level == Level.TUNNEL and params.tls_ekm and ekm.available(),
            proto_name="UDPv4" if params.proto == "udp" else "TCPv4_CLIENT",
            retransmit=params.proto == "udp",
            initial_timeout=first_retry_after(params.retry_interval, self.timeout))
        return ov.ClientSession(wrapper, options, remote=self.remote)

    async def open(self) -> None:
        params = self.params
        try:
            if params.proto == "udp":
                self.transport = await _open_fresh_udp(params.host, params.port)
            else:
                self.transport = await connect_stream(self.remote, self.remaining())
        except socket.gaierror as exc:
            raise ProbeFailure(Reason.RESOLVE_FAILED, f"{params.host}: {exc.strerror}") from None
        except ConnectionRefusedError:
            raise ProbeFailure(Reason.REFUSED, f"TCP connection to {params.host}:{params.port} "
                                               "refused: nothing listens") from None
        except TimeoutError:
            raise ProbeFailure(Reason.TIMEOUT, f"TCP connect to {params.host}:{params.port} "
                                               "unanswered") from None
        except OSError as exc:
            raise ProbeFailure(Reason.NETWORK_UNREACHABLE, f"socket: {exc.strerror}") from None
        self.watch.lap("connect")

    def drive(self, session: ov.ClientSession) -> Driver[ov.Event]:
        """The driver of ``session`` over the transport :meth:`open` made."""
        driver = self.driver = Driver(session)
        transport, self.transport = self.transport, None
        if isinstance(transport, UdpEndpoint):
            driver.adopt_udp(self.remote, transport)
        elif transport is not None:
            driver.adopt_stream(self.remote, transport, frame_tcp, TcpDeframer())
        return driver

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    # the events

    def handle(self, event: ov.Event | Unreachable | Closed) -> None:
        driver = self.driver
        assert driver is not None
        if isinstance(event, ov.ResetAnswered):
            self.reset_answered = True
            self.facts["early_negotiation"] = bool(event.early_negotiation_flags)
            if driver.datagram is not None and driver.last_sent is not None:
                # against the latest (re)send of the reset; kernel receive stamp for UDP
                self.facts["reset_rtt_seconds"] = round(
                    round_trip_seconds(driver.last_sent, driver.datagram), 9)
        elif isinstance(event, ov.TlsEstablished):
            self.on_tls(event)
        elif isinstance(event, ov.TlsFailed):
            self.facts.update(chain_facts(event.chain) if event.chain else {})
            raise _tls_failure(event, after_handshake=self.tls_done)
        elif isinstance(event, ov.KeyExchanged):
            self.key_exchanged = True
        elif isinstance(event, ov.AuthFailed):
            raise ProbeFailure(Reason.AUTH_FAILED, f"server says {event.detail}")
        elif isinstance(event, BadDatagram):
            self.last_bad_packet = event.detail
        elif isinstance(event, ov.ServerMisbehaved):
            raise ProbeFailure(Reason.BAD_RESPONSE, f"server broke the protocol: {event.detail}")
        elif isinstance(event, ov.ControlMessage):
            log.debug("openvpn control message: %s", event.text)
        elif isinstance(event, Unreachable):
            self.transport_lost = True
            raise ProbeFailure(event.error.reason, str(event.error))
        elif isinstance(event, Closed):
            self.transport_lost = True
            raise self.closed(event)

    def closed(self, event: Closed) -> ProbeFailure:
        if event.error:  # a broken TCP frame
            return ProbeFailure(Reason.BAD_PACKET, event.error)
        if self.reset_answered:
            return ProbeFailure(Reason.TLS_FAILED, "server closed the TCP connection")
        return ProbeFailure(Reason.RESET_IGNORED, "server closed the TCP connection without "
                                                  "answering the hard reset (wrong key?)")

    async def run_until(self, done: Callable[[], bool], phase: str) -> None:
        """Events until ``done()`` or the deadline; a deadline becomes this phase's failure."""
        assert self.driver is not None
        while not done():
            event = await self.driver.next_event(self.deadline)
            if event is None:
                raise self.stalled(phase)
            self.handle(event)

    def stalled(self, phase: str) -> ProbeFailure:
        assert self.session is not None
        waited = f"within {self.watch.elapsed():.3g}s"
        if phase == "reset":
            if self.session.bad_packets:
                return ProbeFailure(Reason.BAD_PACKET, f"only unauthenticated answers to the hard "
                                                   f"reset ({self.last_bad_packet})", phase)
            return ProbeFailure(Reason.RESET_IGNORED, f"no answer to the hard reset {waited}: a "
                            "wrong tls-crypt/tls-auth key, or the host is down or filtered",
                            phase)
        if phase == "push":
            return ProbeFailure(Reason.NO_PUSH_REPLY,
                            f"key exchange done but no PUSH_REPLY {waited}", phase)
        # over UDP only a packet sent SILENT_AFTER_SENDS times without an ACK is silence: once
        # or twice is what loss does (5 % loss made half the failures "auth-failed" before)
        sends_needed = SILENT_AFTER_SENDS if self.params.proto == "udp" else 1
        if (phase in ("tls", "key_exchange") and self.params.cert_file
                and self.session.tls_bytes_received
                and self.session.fewest_sends_unacknowledged >= sends_needed):
            # The server judges our certificate after our certificate flight (TLS 1.2) or after
            # our last flight (TLS 1.3). On a rejection (revoked, unknown CA, expired) OpenVPN
            # 2.6 restarts the instance before its alert leaves, so all we see is a server that
            # spoke TLS and then never ACKed what we sent after it.
            return ProbeFailure(Reason.AUTH_FAILED, "the server went silent right after our "
                            f"certificate (our packets not ACKed {waited}): our client "
                            "certificate was most likely rejected (revoked, unknown CA, "
                            "expired)", phase)
        return ProbeFailure(Reason.TIMEOUT, f"{phase} did not finish {waited}", phase)

    # phases

    def on_tls(self, event: ov.TlsEstablished) -> None:
        self.tls_done = True
        self.watch.lap("tls")
        self.facts["tls_version"] = event.version
        self.facts["tls_cipher"] = event.cipher
        self.facts.update(tls_crypto_facts(event, self.params))
        self.facts.update(chain_facts(event.chain))
        not_after = dt.datetime.fromtimestamp(event.not_after, dt.UTC)
        self.facts["cert_not_after"] = not_after.isoformat()
        self.facts["cert_expires_in_seconds"] = round(event.not_after - time.time(), 3)
        # node_* facts become agent gauges (tunnelwatch_node_...): the expiry alert reads this
        self.facts["node_certificate_expiry_timestamp_seconds"] = float(event.not_after)
        self.facts["cert_subject"] = event.subject

    async def handshake(self) -> None:
        session = self.session = self.build_session()
        self.drive(session)
        session.start(time.monotonic())
        await self.run_until(lambda: self.reset_answered, "reset")
        self.watch.lap("reset")
        if self.level == Level.RESET:
            return
        await self.run_until(lambda: self.tls_done, "tls")
        await self.run_until(lambda: self.key_exchanged, "key_exchange")
        self.watch.lap("key_exchange")
        if self.level == Level.TLS:
            return
        await self.run_until(lambda: session.push_reply is not None, "push")
        self.watch.lap("push")
        self.report_push()

    def report_push(self) -> None:
        assert self.session is not None and self.session.push_reply is not None
        reply = self.session.push_reply
        if reply.ifconfig is not None:
            self.facts["pushed_ifconfig"] = " ".join(reply.ifconfig)
        for name in ("route-gateway", "topology", "cipher", "peer-id", "key-derivation",
                     "protocol-flags"):
            args = reply.get(name)
            if args is not None:
                self.facts[f"pushed_{name.replace('-', '_')}"] = " ".join(args)
        self.facts["pushed_options"] = ",".join(sorted({name for name, _ in reply.options}))

    async def establish(self) -> Tunnel:
        """Reset, TLS, key exchange, PUSH_REPLY, then the data channel: the tunnel from the
        pushed address to the server's own (or ``echo_target``)."""
        await self.open()
        await self.handshake()
        session, driver = self.session, self.driver
        assert session is not None and session.push_reply is not None and driver is not None
        reply = session.push_reply
        target = self.params.echo_target or reply.server_tunnel_address
        if reply.ifconfig is None or target is None:
            raise ProbeFailure(Reason.BAD_RESPONSE, "PUSH_REPLY has no ifconfig/route-gateway to "
                                                "send in-tunnel packets with")
        key2 = None
        if reply.uses_tls_ekm:
            tls = session.tls_object
            if tls is None:
                raise ProbeFailure(Reason.PROBE_ERROR, "server wants TLS-EKM but TLS is gone")
            key2 = ekm.export_keying_material(tls, EKM_LABEL, KEY2_LEN)
        self.facts["key_derivation"] = "tls-ekm" if key2 is not None else "prf"
        try:
            channel = session.start_data_channel(key2, self.framing)
        except OpenVPNError as exc:  # e.g. a pushed cipher we do not speak
            raise ProbeFailure(Reason.BAD_RESPONSE, f"data channel: {exc}") from None
        self.facts["data_cipher"] = channel.cipher
        self.facts["crypto.data_cipher"] = channel.cipher  # one we speak: a bounded name
        self.facts["compression_framing"] = channel.framing.value
        resolvers = ((self.params.dns_resolver,) if self.params.dns_resolver
                     else reply.dns_servers)

        def send(packet: bytes) -> SendStamp | None:
            session.send_data(packet)
            return driver.flush()

        return Tunnel(driver, reply.ifconfig[0], target, send, self._unwrap, resolvers)

    def _unwrap(self, event: ov.Event | Unreachable | Closed) -> bytes | None:
        if isinstance(event, ov.DataReceived):
            return event.payload
        self.handle(event)
        return None

    async def finish(self) -> None:
        await self.leave()
        self.close()

    async def leave(self) -> None:
        """Say EXIT and wait (briefly, also after a failure) until the server has it."""
        session, driver = self.session, self.driver
        if (session is None or driver is None or self.transport_lost
                or not session.send_exit(time.monotonic())):
            return
        self.facts["exit_sent"] = True
        now = time.monotonic()
        until = min(now + EXIT_MAX_WAIT,
                    max(self.deadline, now) + min(EXIT_WAIT, CLEANUP_GRACE_SECONDS))
        resend_at = now + EXIT_RESEND
        while not session.exit_acknowledged and time.monotonic() < until:
            if time.monotonic() >= resend_at:
                session.resend_unacknowledged(time.monotonic())
                resend_at = time.monotonic() + EXIT_RESEND
            event = await driver.next_event(min(until, resend_at))
            if isinstance(event, Unreachable | Closed):
                log.debug("EXIT not confirmed: %s", event)
                return
        self.facts["exit_acknowledged"] = session.exit_acknowledged
        self.watch.lap("exit")

    def close(self) -> None:
        if self.driver is not None:
            self.driver.close()
        elif isinstance(self.transport, UdpEndpoint):
            self.transport.close()
        elif self.transport is not None:
            self.transport[1].close()
        if self.session is not None:
            self.facts["retransmissions"] = self.session.retransmissions
            if self.session.bad_packets:
                self.facts["bad_packets"] = self.session.bad_packets


def _tls_failure(event: ov.TlsFailed, *, after_handshake: bool) -> ProbeFailure:
    if event.failure == ov.TlsFailure.EXPIRED:
        return ProbeFailure(Reason.CERT_EXPIRED, f"server certificate: {event.detail}")
    if event.failure in (ov.TlsFailure.VERIFY, ov.TlsFailure.EKU):
        return ProbeFailure(Reason.CERT_VERIFY_FAILED, f"server certificate: {event.detail}")
    if event.failure == ov.TlsFailure.PEER_REJECTED:
        return ProbeFailure(Reason.AUTH_FAILED, f"server refused our certificate: {event.detail}")
    when = "after" if after_handshake else "during"
    return ProbeFailure(Reason.TLS_FAILED, f"TLS failed {when} the handshake: {event.detail}")


async def _tunnel_step(tunnel: Tunnel, probe: TunnelProbe) -> CheckResult:
    assert isinstance(probe, _Probe)
    params = probe.params
    quality = await echo_node(tunnel, probe, params.echo_count, params.echo_interval,
                              b"tunnelwatch-ovpn-")
    return judge_echoes(probe.watch, quality, probe.facts, loss_threshold=params.loss_threshold,
                        rtt_threshold=params.rtt_threshold,
                        no_reply=f"session up, none of {quality.sent} echoes came back through "
                                 "the tunnel: the data plane is broken")


def tunnel_probe(params: OpenVPNParams, timeout: float) -> _Probe:
    """One run of traffic through an OpenVPN data channel (the tunnel and user-path checks)."""
    return _Probe(params, Level.TUNNEL, timeout)


def identity(params: OpenVPNParams) -> tuple[str, str, int, str]:
    """This agent's identity with the server (its certificate, or its user): one session with
    it at a time (:func:`~probes.checks.tunnel.in_turn`); without ``duplicate-cn`` the server
    drops the older session of a common name once a newer one authenticates."""
    return ("openvpn", params.host, params.port,
            params.cert_file or params.auth_user_pass_file or "")


async def run_level(params: OpenVPNParams, timeout: float, level: Level) -> CheckResult:
    """One probe at ``level``; beyond the reset (which authenticates nothing), in the
    identity's turn."""
    if level == Level.RESET:
        return await _run_level(params, timeout, level)
    return await in_turn(identity(params), timeout,
                         lambda left: _run_level(params, left, level))


async def _run_level(params: OpenVPNParams, timeout: float, level: Level) -> CheckResult:
    probe = _Probe(params, level, timeout)
    if level == Level.TUNNEL:
        return await run_through(probe, _tunnel_step)
    try:
        try:
            await probe.open()
            await probe.handshake()
            result = probe.watch.result(True, Reason.OK, facts=probe.facts)
        except (ProbeFailure, ConfigError) as exc:
            result = probe.watch.failed(exc, probe.facts)
        await probe.leave()  # also after a failure; a no-op before the session was built
        result.phases = dict(probe.watch.phases)  # with the EXIT's
        result.duration_seconds = probe.watch.elapsed()
        return result
    finally:
        probe.close()


def _kind(level: Level, tier: Tier, description: str) -> CheckKind[OpenVPNParams]:
    """The kind that probes to ``level`` (``openvpn.<level>``)."""
    return CheckKind(f"openvpn.{level.name.lower()}", tier, OpenVPNParams,
                     partial(run_level, level=level), description)


RESET = _kind(Level.RESET, Tier.FUNCTIONAL, "hard reset answered (daemon up, wrapping key right)")
TLS = _kind(Level.TLS, Tier.FUNCTIONAL, "reset, TLS with CA + EKU verification, key-method 2, EXIT")
SESSION = _kind(Level.SESSION, Tier.SESSION,
                "reset, TLS, key-method 2, PUSH_REPLY (pushed address), EXIT")
TUNNEL = _kind(Level.TUNNEL, Tier.SESSION,
               "session plus DATA_V2 ICMP echoes to the server's tunnel address, EXIT")
KINDS = {Level.RESET: RESET, Level.TLS: TLS, Level.SESSION: SESSION, Level.TUNNEL: TUNNEL}


def plan_params(ctx: PlanContext, section: OpenVPNTarget) -> OpenVPNParams:
    """The check params of a target's ``openvpn:`` section (also the policy scan's base)."""
    return OpenVPNParams(
        host=ctx.target.address, port=section.port, proto=section.proto,
        ca_file=ctx.path(section.ca_file), cert_file=ctx.path(section.cert_file),
        key_file=ctx.path(section.key_file), tls_crypt_file=ctx.path(section.tls_crypt_file),
        tls_auth_file=ctx.path(section.tls_auth_file), key_direction=section.key_direction,
        auth_digest=section.auth_digest, tls_crypt_v2_file=ctx.path(section.tls_crypt_v2_file),
        auth_user_pass_file=ctx.path(section.auth_user_pass_file),
        compression=section.compression, echo_count=section.echo_count,
        echo_interval=section.echo_interval, dns_resolver=section.dns_resolver)


def plan(ctx: PlanContext) -> list[Planned]:
    """The ``openvpn:`` section -> its checks.

    The functional tier always runs ``openvpn.tls`` (reset, verified TLS, key-method 2, EXIT:
    cheap, and it catches a dead daemon, a wrong wrapping key and certificate trouble). The
    section's ``level`` adds the deeper check in the session tier: ``session`` (PUSH_REPLY) or
    ``tunnel`` (data-channel echoes); ``reset`` alone replaces the TLS check.
    """
    section = ctx.target.openvpn
    if section is None:
        return []
    params = plan_params(ctx, section)
    if section.level == "reset":
        return [Planned.of(RESET, params)]
    out = [Planned.of(TLS, params)]
    if section.level == "session":
        out.append(Planned.of(SESSION, params))
    elif section.level == "tunnel":
        out.append(Planned.of(TUNNEL, params))
    return out


def _plan_with_policy(ctx: PlanContext) -> list[Planned]:
    """What ``tunnelwatch probe openvpn`` plans: the section's checks, then (``--policy-scan``)
    the policy scan, the last planned, so the one the command runs."""
    # the scan's module builds on this one (its probe subclasses _Probe): imported when used
    from probes.checks.openvpn_policy import plan as policy_plan  # noqa: PLC0415

    return [*plan(ctx), *policy_plan(ctx)]


def _preflight(planned: Planned) -> None:
    """Every key and certificate the check will need, read now."""
    params: OpenVPNParams = planned.params
    build_wrapper(params, 0)
    if planned.kind is not RESET:
        build_ssl_context(params)
    if params.auth_user_pass_file:
        read_user_pass(params.auth_user_pass_file)


COMMAND = ProbeCommand(
    name="openvpn",
    help="OpenVPN hard reset, TLS, key-method 2 + PUSH_REPLY, or in-tunnel echoes",
    description="Probe an OpenVPN 2.x server like a client would; ends with EXIT. --level "
                "picks the deepest step: reset, tls, session (PUSH_REPLY) or tunnel.",
    options=OpenVPNTarget, plan=section_plan("openvpn", _plan_with_policy),
    validate=openvpn_problems,
    preflight=_preflight, port_required=True,
    aliases={"--ca": "ca_file", "--cert": "cert_file", "--key": "key_file",
             "--tls-crypt": "tls_crypt_file", "--tls-auth": "tls_auth_file",
             "--tls-crypt-v2": "tls_crypt_v2_file", "--auth": "auth_digest",
             "--auth-user-pass": "auth_user_pass_file", "--count": "echo_count",
             "--interval": "echo_interval"})

FAMILY = Family("openvpn", (RESET, TLS, SESSION, TUNNEL), plan,
                "OpenVPN: hard reset, TLS, key-method 2 and PUSH_REPLY, data-channel echoes",
                (COMMAND,))
