"""WireGuard checks: ``wireguard.handshake`` and ``wireguard.session``.

A thin asyncio shell around :mod:`probes.protocols.wireguard`: it owns the UDP socket
(:mod:`probes.checks.udp`, for ICMP errors and kernel receive timestamps), the clock, and the small
state file that keeps the last TAI64N timestamp per agent key across restarts.

Outcomes (closed enum, :class:`probes.model.Reason`):

* ``timeout``: no answer at all. WireGuard is silent to anything it cannot authenticate, so this
  means the server is down, the path filters UDP, the server does not know this agent's key, or
  the server public key we use is wrong; from one vantage these cannot be told apart.
* ``icmp-unreachable``: an ICMP error came back on the connected socket (nothing listens there).
* ``cookie-then-timeout``: the server is under load, sent a cookie, and the mac2 retry went
  unanswered.
* ``bad-response``: an answer that did not authenticate (most often a wrong preshared key).
* ``tunnel-no-reply`` / ``tunnel-loss-over-threshold`` / ``tunnel-rtt-over-threshold``: session.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

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
    first_retry_after,
    section_plan,
)
from probes.checks.driver import Closed, Driver, Unreachable
from probes.checks.tunnel import (
    Tunnel,
    TunnelProbe,
    echo_node,
    in_turn,
    judge_echoes,
    run_through,
)
from probes.checks.udp import Datagram, SendStamp, round_trip_seconds
from probes.config import WireGuardTarget, wireguard_problems
from probes.model import Reason, Tier
from probes.protocols import wireguard as wg
from probes.protocols.core import Address, BadDatagram

log = logging.getLogger(__name__)

WallClock = Callable[[], int]  # Unix nanoseconds; injectable so tests can step it back

DEFAULT_RETRY_INTERVAL = 1.0  # seconds between initiation retransmissions inside one check
# (at most a quarter of the check's timeout: checks.base.first_retry_after)


class WireGuardParams(WireGuardTarget, frozen=True, kw_only=True):
    """The ``wireguard:`` section (paths resolved), the node, and where timestamps persist."""

    host: str
    state_file: str | None = None  # last TAI64N timestamp per agent key; None = not persisted
    retry_interval: float = DEFAULT_RETRY_INTERVAL


def read_key_file(path: str, what: str) -> bytes:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from None
    try:
        return wg.decode_key(text, what)
    except wg.WireGuardError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_config(params: WireGuardParams) -> wg.InitiatorConfig:
    try:
        server_key = wg.decode_key(params.server_public_key, "server public key")
    except wg.WireGuardError as exc:
        raise ConfigError(str(exc)) from None
    private = read_key_file(params.private_key_file, "private key")
    psk = (read_key_file(params.preshared_key_file, "preshared key")
           if params.preshared_key_file else None)
    return wg.InitiatorConfig(private, server_key, psk)


# --- timestamp persistence ----------------------------------------------------------------------


class TimestampStore:
    """``{agent public key (b64): last TAI64N sent (hex)}`` in one small JSON file, mode 0600.

    Read-modify-write happens under an flock so two probe processes of one agent do not lose each
    other's updates; the file is replaced atomically so a crash never leaves it half written.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, str]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable WireGuard timestamp file %s: %s", self.path, exc)
            return {}
        if not isinstance(raw, dict):
            return {}
        return {str(k): str(v) for k, v in raw.items()}

    def load(self, key_id: str) -> bytes | None:
        value = self._read().get(key_id)
        if value is None:
            return None
        try:
            stamp = bytes.fromhex(value)
            wg.parse_tai64n(stamp)
        except (ValueError, wg.WireGuardError):
            return None
        return stamp

    def save(self, key_id: str, timestamp: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            old = data.get(key_id)
            if old is not None and len(old) == 24 and old >= timestamp.hex():
                return  # another process already went further (hex of fixed width sorts right)
            data[key_id] = timestamp.hex()
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(data, out, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)


# --- the probe ----------------------------------------------------------------------------------


class _Probe:
    """One check run: the initiator on the driver, stopwatch and facts."""

    def __init__(self, params: WireGuardParams, timeout: float, wall_ns: WallClock) -> None:
        self.params = params
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.wall_ns = wall_ns
        self.watch = Stopwatch()
        self.facts: dict[str, Fact] = {"cookie_used": False, "initiations_sent": 0}
        self.remote = (params.host, params.port)
        self.conn: wg.WireGuardInitiator | None = None
        self.driver: Driver[wg.Event] | None = None
        self.store = TimestampStore(params.state_file) if params.state_file else None
        self.key_id = ""
        self.initiations: dict[int, SendStamp] = {}  # sender index -> when it left

    async def open(self) -> None:
        config = load_config(self.params)
        self.key_id = wg.encode_key(wg.public_key(config.private_key))
        last = self.store.load(self.key_id) if self.store else None
        self.conn = wg.WireGuardInitiator(
            config, remote=self.remote, last_timestamp=last, wall_ns=self.wall_ns,
            retry_interval=first_retry_after(self.params.retry_interval, self.timeout))
        self.driver = Driver(self.conn, on_send=self._sent)
        try:
            await self.driver.open_udp(self.remote)
        except socket.gaierror as exc:
            raise ProbeFailure(Reason.RESOLVE_FAILED,
                               f"{self.params.host}: {exc.strerror}") from None
        except OSError as exc:
            raise ProbeFailure(Reason.NETWORK_UNREACHABLE, f"socket: {exc.strerror}") from None
        self.watch.lap("resolve")

    def _sent(self, data: bytes, addr: Address, stamp: SendStamp) -> None:
        if data[0] == wg.MESSAGE_INITIATION:
            self.initiations[int.from_bytes(data[4:8], "little")] = stamp
            self.facts["initiations_sent"] = int(self.facts["initiations_sent"]) + 1

    def _persist(self, event: wg.InitiationSent) -> None:
        """Before the initiation leaves: a crash must not let the next run reuse its stamp."""
        if self.store is None:
            return
        try:
            self.store.save(self.key_id, event.timestamp)
        except OSError as exc:
            log.warning("cannot persist WireGuard timestamp to %s: %s", self.store.path, exc)
            self.facts["timestamp_persist_failed"] = True

    async def handshake(self) -> None:
        assert self.conn is not None and self.driver is not None
        started = time.monotonic()
        self.conn.start(started)
        cookie = False
        while (event := await self.driver.next_event(self.deadline)) is not None:
            if isinstance(event, wg.InitiationSent):
                self._persist(event)
            elif isinstance(event, wg.CookieReceived):  # the core retries at once, with mac2
                cookie = True
                self.facts["cookie_used"] = True
                self.facts["cookies_received"] = self.conn.cookies_received
                self.watch.lap("cookie")
            elif isinstance(event, wg.HandshakeCompleted):
                assert self.driver.datagram is not None
                self._completed(event, self.initiations[event.local_index], self.driver.datagram)
                return
            elif isinstance(event, BadDatagram):
                raise ProbeFailure(Reason.BAD_RESPONSE, f"handshake answer rejected: "
                                                        f"{event.detail}")
            elif isinstance(event, Unreachable):
                raise ProbeFailure(event.error.reason, str(event.error))
        waited = time.monotonic() - started
        if cookie:
            raise ProbeFailure(Reason.COOKIE_THEN_TIMEOUT, "server under load sent a cookie "
                               f"reply, but the retry with mac2 got no response within "
                               f"{waited:.3g}s")
        raise ProbeFailure(Reason.TIMEOUT, f"no answer from {self.params.host}:{self.params.port} "
                           f"within {waited:.3g}s: the server is down, the path filters UDP, or "
                           "the server does not know this agent's key (or we have the wrong "
                           "server key); WireGuard answers nothing it cannot authenticate, so "
                           "these look alike")

    def _completed(self, event: wg.HandshakeCompleted, sent: SendStamp,
                   answer: Datagram) -> None:
        self.watch.lap("handshake")
        self.facts["handshake_rtt_seconds"] = round(round_trip_seconds(sent, answer), 9)
        self.facts["mac2_used"] = event.used_cookie
        self.facts["local_index"] = event.local_index

    async def establish(self) -> Tunnel:
        """The handshake; then the tunnel from ``tunnel_address`` (to ``canary``)."""
        await self.open()
        await self.handshake()
        conn, driver, params = self.conn, self.driver, self.params
        assert conn is not None and driver is not None
        if params.tunnel_address is None:
            raise ConfigError("traffic through the tunnel needs tunnel_address")
        source = str(ipaddress.ip_interface(params.tunnel_address).ip)

        def send(packet: bytes) -> SendStamp | None:
            try:
                conn.send_data(packet, time.monotonic())
            except wg.WireGuardError as exc:  # ours (keys expired mid-check)
                raise ConfigError(str(exc)) from None
            return driver.flush()

        return Tunnel(driver, source, params.canary or "", send, self._unwrap,
                      resolvers=(params.dns_resolver,) if params.dns_resolver else ())

    def _unwrap(self, event: wg.Event | BadDatagram | Unreachable | Closed) -> bytes | None:
        if isinstance(event, wg.DataReceived):
            return event.payload
        if isinstance(event, BadDatagram):
            # stray or duplicated packet: counted, never fatal for an in-tunnel measurement
            self.facts["bad_packets"] = int(self.facts.get("bad_packets", 0)) + 1
        elif isinstance(event, Unreachable):
            raise ProbeFailure(event.error.reason, str(event.error))
        return None

    async def finish(self) -> None:
        """A keepalive confirms the session to the server, which then frees the slot."""
        if self.conn is not None and self.driver is not None and "local_index" in self.facts:
            self.conn.send_keepalive(time.monotonic())
            self.driver.flush()
            self.facts["keepalive_sent"] = True
        if self.driver is not None:
            self.driver.close()


async def _session_step(tunnel: Tunnel, probe: TunnelProbe) -> CheckResult:
    assert isinstance(probe, _Probe)
    params = probe.params
    if params.canary is None:
        raise ConfigError("a session needs tunnel_address and canary")
    quality = await echo_node(tunnel, probe, params.echo_count, params.echo_interval,
                              b"tunnelwatch-wg-")
    return judge_echoes(probe.watch, quality, probe.facts, loss_threshold=params.loss_threshold,
                        rtt_threshold=params.rtt_threshold,
                        no_reply=f"handshake fine, none of {quality.sent} echoes to "
                                 f"{params.canary} came back through the tunnel")


def identity(params: WireGuardParams) -> tuple[str, str, int, str]:
    """This agent's identity with the server (its key): one handshake with it at a time
    (:func:`~probes.checks.tunnel.in_turn`), or the server moves its session to the newer."""
    return ("wireguard", params.host, params.port, params.private_key_file)


async def run_handshake(params: WireGuardParams, timeout: float,
                        wall_ns: WallClock = time.time_ns) -> CheckResult:
    """``wireguard.handshake``, in the identity's turn."""
    return await in_turn(identity(params), timeout,
                         lambda left: _handshake(params, left, wall_ns))


async def _handshake(params: WireGuardParams, timeout: float, wall_ns: WallClock) -> CheckResult:
    # the handshake check needs no tunnel address: its own establish stops at the handshake
    probe = _Probe(params, timeout, wall_ns)
    try:
        await probe.open()
        await probe.handshake()
        result = probe.watch.result(True, Reason.OK, facts=probe.facts)
    except (ProbeFailure, ConfigError, wg.WireGuardError) as exc:
        # a WireGuardError here is ours (keys expired mid-check): probe-error, as ConfigError
        result = probe.watch.failed(exc, probe.facts)
    await probe.finish()
    return result


def tunnel_probe(params: WireGuardParams, timeout: float,
                 wall_ns: WallClock = time.time_ns) -> _Probe:
    """One run of traffic through a WireGuard tunnel (the session and the user-path checks)."""
    return _Probe(params, timeout, wall_ns)


async def run_session(params: WireGuardParams, timeout: float,
                      wall_ns: WallClock = time.time_ns) -> CheckResult:
    """``wireguard.session``, in the identity's turn."""
    return await in_turn(identity(params), timeout, lambda left: run_through(
        _Probe(params, left, wall_ns), _session_step))


STATE_FILE_NAME = "wireguard-timestamps.json"


def plan(ctx: PlanContext) -> list[Planned]:
    """The ``wireguard:`` section -> ``wireguard.handshake``, and ``wireguard.session`` when the
    section names both ``tunnel_address`` and ``canary``. Timestamps persist in
    ``<state_dir>/wireguard-timestamps.json``."""
    section = ctx.target.wireguard
    if section is None:
        return []
    params = ctx.params(WireGuardParams, section, state_file=ctx.state_file(STATE_FILE_NAME),
                        private_key_file=ctx.path(section.private_key_file),
                        preshared_key_file=ctx.path(section.preshared_key_file))
    out = [Planned.of(HANDSHAKE, params)]
    if section.tunnel_address and section.canary:
        out.append(Planned.of(SESSION, params))
    return out


HANDSHAKE = CheckKind("wireguard.handshake", Tier.FUNCTIONAL, WireGuardParams, run_handshake,
                      "Noise_IKpsk2 initiation -> response (cookie + mac2 retry under load)")
SESSION = CheckKind("wireguard.session", Tier.SESSION, WireGuardParams, run_session,
                    "handshake, ICMP echoes to an in-tunnel canary, keepalive")


def _preflight(planned: Planned) -> None:
    load_config(planned.params)  # unreadable or malformed keys


COMMAND = ProbeCommand(
    name="wireguard", help="WireGuard handshake, or a session with --ping",
    description="Without --ping: wireguard.handshake. With --tunnel-address and --ping: "
                "wireguard.session (handshake, ICMP echoes to the in-tunnel address, keepalive).",
    options=WireGuardTarget, plan=section_plan("wireguard", plan), validate=wireguard_problems,
    preflight=_preflight, port_required=True, state_files=(STATE_FILE_NAME,),
    aliases={"--ping": "canary", "--count": "echo_count", "--interval": "echo_interval"})

FAMILY = Family("wireguard", (HANDSHAKE, SESSION), plan,
                "WireGuard: Noise handshake, in-tunnel echoes", (COMMAND,))
