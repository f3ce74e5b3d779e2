"""IKEv2 checks: ``ikev2.init`` (responder alive, proposal accepted), ``ikev2.auth`` (PSK IKE SA
with the responder's AUTH verified) and ``ikev2.tunnel`` (a CHILD_SA, then ICMP echoes in
ESP-in-UDP through it). A thin asyncio shell around :mod:`probes.protocols.ikev2.initiator`.

Half-open SAs: strongSwan answers the 4th concurrent half-open IKE SA from one address with a
COOKIE and silently drops from the 6th (protocols.md §6), which would look like an outage. So at
most :data:`MAX_HALF_OPEN` SA_INITs per responder are in flight from one agent (event loop), and a
probe that leaves a half-open SA behind (the init level always does; an auth probe whose IKE_AUTH
went unanswered) keeps its slot until the responder has expired it (:data:`HALF_OPEN_HOLD_SECONDS`).
Every SA that got established is deleted before the check returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from probes.checks.base import (
    CheckKind,
    CheckResult,
    ConfigError,
    Fact,
    Family,
    PlanContext,
    Planned,
    ProbeCommand,
    Stopwatch,
    first_retry_after,
)
from probes.checks.udp import IcmpError, UdpEndpoint
from probes.config import IKEv2Target, ikev2_problems
from probes.model import Quality, Reason, Tier
from probes.protocols.ikev2 import IKEv2Error
from probes.protocols.ikev2.crypto import CipherSuite
from probes.protocols.ikev2.esp import classify_nat_t
from probes.protocols.ikev2.initiator import (
    AuthCompleted,
    ChildRequest,
    ChildSa,
    Closed,
    Event,
    Failed,
    Failure,
    InitCompleted,
    Initiator,
    InitiatorConfig,
    InitRetried,
)
from probes.protocols.ikev2.proposals import (
    DEFAULT_ESP_PROPOSAL,
    DEFAULT_IKE_PROPOSALS,
    parse_ike_proposals,
)

log = logging.getLogger(__name__)

MAX_HALF_OPEN = 3  # strongSwan's cookie_threshold_ip default
HALF_OPEN_HOLD_SECONDS = 30.0  # strongSwan's half_open_timeout default
DELETE_BUDGET_SECONDS = 0.9  # must fit in base.CLEANUP_GRACE_SECONDS
ECHO_GRACE_SECONDS = 1.0  # how long to wait for echo replies after the last request


class Ikev2Params(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str
    port: int = 500
    nat_t_port: int = 4500
    proposals: tuple[str, ...] = DEFAULT_IKE_PROPOSALS
    psk: str | None = None  # or psk_file; needed by the auth and tunnel levels
    psk_file: str | None = None
    local_id: str = "tunnelwatch-probe"
    remote_id: str | None = None  # when set, the responder must identify as this
    force_nat_t: bool = False  # fake NAT-D so the exchange floats to 4500
    retransmit_initial: float = 0.5  # at most a quarter of the timeout (first_retry_after)
    # tunnel level
    ping: str | None = None  # address behind the responder; default: its single-host TSr
    inner_address: str | None = None  # our source inside the tunnel; default: from TSi
    echo_count: int = 5
    echo_interval: float = 0.05
    esp_proposal: str = DEFAULT_ESP_PROPOSAL


# --- half-open limiter ------------------------------------------------------------------------

_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, int],
                                                                     asyncio.Semaphore]] = \
    weakref.WeakKeyDictionary()


def half_open_limiter(host: str, port: int) -> asyncio.Semaphore:
    """The semaphore bounding this agent's half-open SAs to one responder (per event loop, as
    asyncio primitives belong to one loop)."""
    per_loop = _limiters.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault((host, port), asyncio.Semaphore(MAX_HALF_OPEN))


# --- the session ------------------------------------------------------------------------------

@dataclass
class _Outcome:
    init: InitCompleted | None = None
    auth: AuthCompleted | None = None
    failed: Failed | None = None
    closed: Closed | None = None
    retries: list[InitRetried] = field(default_factory=list)
    icmp: IcmpError | None = None


class _Session:
    """One initiator over a UDP socket to port 500 and, once floated, one to the NAT-T port."""

    def __init__(self, params: Ikev2Params, ep500: UdpEndpoint, initiator: Initiator) -> None:
        self.params = params
        self.ini = initiator
        self.eps: dict[int, UdpEndpoint] = {params.port: ep500}
        self.inbox: asyncio.Queue[tuple[int, bytes | IcmpError]] = asyncio.Queue()
        self.pumps: list[asyncio.Task[None]] = []
        # everything from the NAT-T port also lands here, for the echo loop (ESP)
        self.esp_inbox: asyncio.Queue[tuple[bytes, float]] = asyncio.Queue()
        self.outcome = _Outcome()
        self._closed = False
        self._pump(params.port, ep500)

    def _pump(self, port: int, ep: UdpEndpoint) -> None:
        async def pump() -> None:
            while True:
                try:
                    datagram = await ep.recv(3600.0)
                except IcmpError as exc:
                    self.inbox.put_nowait((port, exc))
                    continue
                if datagram is not None:
                    self.inbox.put_nowait((port, datagram.data))
                    if port != self.params.port:
                        self.esp_inbox.put_nowait((datagram.data, datagram.received_monotonic))

        self.pumps.append(asyncio.create_task(pump()))

    async def endpoint(self, port: int) -> UdpEndpoint:
        ep = self.eps.get(port)
        if ep is None:
            ep = await UdpEndpoint.open(self.params.host, port)
            self.eps[port] = ep
            self._pump(port, ep)
        return ep

    async def flush(self, now: float) -> None:
        for data, port in self.ini.datagrams_to_send(now):
            ep = await self.endpoint(port)
            try:
                ep.send(data)
            except IcmpError as exc:
                self._note_icmp(exc)

    def _note_icmp(self, exc: IcmpError) -> None:
        # Only meaningful before the responder ever answered: afterwards it is stale noise.
        if not self.ini.sa_init_answered and self.outcome.icmp is None:
            self.outcome.icmp = exc

    def _collect(self) -> None:
        while (event := self.ini.next_event()) is not None:
            self._record(event)

    def _record(self, event: Event) -> None:
        if isinstance(event, InitCompleted):
            self.outcome.init = event
        elif isinstance(event, InitRetried):
            self.outcome.retries.append(event)
        elif isinstance(event, AuthCompleted):
            self.outcome.auth = event
        elif isinstance(event, Failed):
            self.outcome.failed = event
        else:
            self.outcome.closed = event

    async def run_until(self, done: type, deadline: float) -> None:
        """Pump datagrams and timers until an event of type ``done`` arrives, or (except while
        closing, which must finish even after a failure) a failure."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            self.ini.handle_timer(now)  # no-op unless due; here so a busy inbox cannot starve it
            await self.flush(now)
            self._collect()
            if self._reached(done):
                return
            if done is not Closed and (self.outcome.failed is not None or self.outcome.icmp):
                return
            timer = self.ini.get_timer()
            wait = deadline - now if timer is None else min(timer, deadline) - now
            if now >= deadline:
                return
            try:
                port, item = await asyncio.wait_for(self.inbox.get(), max(wait, 0.0))
            except TimeoutError:
                self.ini.handle_timer(loop.time())
                continue
            if isinstance(item, IcmpError):
                self._note_icmp(item)
                continue
            if port != self.params.port:
                try:
                    kind, _ = classify_nat_t(item)
                except IKEv2Error:
                    continue
                if kind != "ike":
                    continue  # ESP goes to the echo loop through esp_inbox
            self.ini.receive_datagram(item, loop.time(), nat_t=port != self.params.port)

    def _reached(self, done: type) -> bool:
        o = self.outcome
        return {InitCompleted: o.init, AuthCompleted: o.auth, Closed: o.closed}.get(
            done) is not None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        self.ini.close(loop.time())
        if self.ini.get_timer() is not None:
            await self.run_until(Closed, loop.time() + DELETE_BUDGET_SECONDS)
        for task in self.pumps:
            task.cancel()
        for task in self.pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for ep in self.eps.values():
            ep.close()


# --- the check --------------------------------------------------------------------------------

def _psk(params: Ikev2Params) -> bytes | None:
    if params.psk is not None:
        return params.psk.encode()
    if params.psk_file is not None:
        return Path(params.psk_file).read_text().strip().encode()
    return None


def suite_name(suite: CipherSuite) -> str:
    return f"encr{suite.encr}-{suite.encr_key_bytes * 8}/prf{suite.prf}/integ" \
           f"{suite.integ or 0}/dh{suite.group}"


_FAILURE_REASONS = {
    Failure.TIMEOUT: Reason.TIMEOUT,
    Failure.NO_PROPOSAL_CHOSEN: Reason.NO_PROPOSAL_CHOSEN,
    Failure.INVALID_KE: Reason.INVALID_KE,
    Failure.AUTH_FAILED: Reason.AUTH_FAILED,
    Failure.ERROR_NOTIFY: Reason.BAD_RESPONSE,
    Failure.BAD_PACKET: Reason.BAD_PACKET,
}


async def run_level(params: Ikev2Params, timeout: float, level: str) -> CheckResult:
    """One probe at ``level`` ("init", "auth" or "tunnel")."""
    if level == "tunnel":
        await asyncio.to_thread(load_scapy)  # once per process, before the clock starts
    watch = Stopwatch()
    facts: dict[str, Fact] = {}
    try:
        proposals = parse_ike_proposals(params.proposals)
        psk = _psk(params)
    except (IKEv2Error, OSError) as exc:
        return watch.result(False, Reason.PROBE_ERROR, detail=f"configuration: {exc}")
    if level != "init" and psk is None:
        return watch.result(False, Reason.PROBE_ERROR, detail=f"level {level} needs a PSK")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    limiter = half_open_limiter(params.host, params.port)
    try:
        await asyncio.wait_for(limiter.acquire(), timeout)
    except TimeoutError:
        return watch.result(False, Reason.OVERLOADED,
                            detail=f"{MAX_HALF_OPEN} half-open SAs to this responder in flight")
    watch.lap("queue")
    session: _Session | None = None
    try:
        try:
            ep = await UdpEndpoint.open(params.host, params.port)
        except socket.gaierror as exc:
            return watch.result(False, Reason.RESOLVE_FAILED, detail=str(exc))
        except IcmpError as exc:
            return watch.result(False, exc.reason, detail=str(exc))
        except OSError as exc:
            return watch.result(False, Reason.NETWORK_UNREACHABLE, detail=str(exc))
        child = ChildRequest(esp_proposal=params.esp_proposal) if level == "tunnel" else None
        config = InitiatorConfig(
            local_address=ep.local_address, remote_address=ep.remote,
            proposals=proposals, psk=None if level == "init" else psk,
            local_id=params.local_id, remote_id=params.remote_id, child=child,
            force_nat_t=params.force_nat_t or level == "tunnel",
            nat_t_port=params.nat_t_port,
            retransmit_initial=first_retry_after(params.retransmit_initial, timeout))
        session = _Session(params, ep, Initiator(config))
        try:
            result = await _probe(session, params, level, deadline, watch=watch, facts=facts)
        except (IKEv2Error, OSError) as exc:  # local trouble (e.g. sending failed): not the node
            result = watch.result(False, Reason.PROBE_ERROR, facts=facts,
                                  detail=f"{type(exc).__name__}: {exc}")
        await session.close()
        result.phases["delete"] = watch.lap("delete")
        result.duration_seconds = watch.elapsed()
        if session.outcome.closed is not None:
            result.facts["delete_acked"] = session.outcome.closed.acknowledged
        return result
    finally:
        if session is not None:
            await session.close()  # idempotent; here for cancellation
            _release(limiter, session.ini.half_open)
        else:
            limiter.release()


async def _probe(session: _Session, params: Ikev2Params, level: str, deadline: float, *,
                 watch: Stopwatch, facts: dict[str, Fact]) -> CheckResult:
    session.ini.start(asyncio.get_running_loop().time())
    await session.run_until(InitCompleted, deadline)
    watch.lap("sa_init")
    result = _init_result(session, watch, facts)
    if result is not None or level == "init":
        return result or watch.result(True, Reason.OK, facts=facts)
    await session.run_until(AuthCompleted, deadline)
    watch.lap("auth")
    result = _auth_result(session, watch, facts, level)
    if result is not None or level == "auth":
        return result or watch.result(True, Reason.OK, facts=facts)
    auth = session.outcome.auth
    assert auth is not None and auth.child is not None
    return await _tunnel(session, auth.child, params, deadline, watch=watch, facts=facts)


def _release(limiter: asyncio.Semaphore, half_open: bool) -> None:
    if half_open:
        asyncio.get_running_loop().call_later(HALF_OPEN_HOLD_SECONDS, limiter.release)
    else:
        limiter.release()


def _init_result(session: _Session, watch: Stopwatch,
                 facts: dict[str, Fact]) -> CheckResult | None:
    o = session.outcome
    facts["cookie_rounds"] = sum(r.why == "cookie" for r in o.retries)
    facts["invalid_ke_rounds"] = sum(r.why == "invalid-ke" for r in o.retries)
    if o.init is not None:
        facts.update(alive=True, proposal=suite_name(o.init.suite), dh_group=o.init.suite.group,
                     nat_t=o.init.floated, behind_nat=o.init.nat_local,
                     responder_behind_nat=o.init.nat_remote,
                     childless_supported=o.init.childless_supported,
                     fragmentation_supported=o.init.fragmentation_supported)
        return None
    if o.icmp is not None:
        return watch.result(False, o.icmp.reason, detail=str(o.icmp), facts=facts)
    if o.failed is not None:
        # any answer at all (NO_PROPOSAL_CHOSEN, INVALID_KE, other notifies) proves liveness
        facts["alive"] = o.failed.failure not in (Failure.TIMEOUT, Failure.BAD_PACKET)
        return watch.result(False, _FAILURE_REASONS[o.failed.failure], detail=o.failed.detail,
                            facts=facts)
    if session.ini.dropped:  # something answers on the port, but it does not speak IKEv2 to us
        return watch.result(False, Reason.BAD_RESPONSE, facts=facts,
                            detail=f"{session.ini.dropped} datagrams back, none an IKE answer")
    return watch.result(False, Reason.TIMEOUT, detail="no IKE_SA_INIT answer", facts=facts)


def _auth_result(session: _Session, watch: Stopwatch, facts: dict[str, Fact],
                 level: str) -> CheckResult | None:
    o = session.outcome
    if o.auth is None:
        failed = o.failed
        if failed is None:
            return watch.result(False, Reason.TIMEOUT, detail="no IKE_AUTH answer", facts=facts)
        return watch.result(False, _FAILURE_REASONS[failed.failure], detail=failed.detail,
                            facts=facts)
    facts.update(responder_id=o.auth.responder_id, responder_auth_verified=True,
                 childless=o.auth.childless)
    if o.auth.child_error:
        facts["child_sa_error"] = o.auth.child_error
    if level == "tunnel" and o.auth.child is None:
        return watch.result(False, Reason.CHILD_SA_FAILED,
                            detail=f"IKE SA established; CHILD_SA refused: {o.auth.child_error}",
                            facts=facts)
    return None


# --- tunnel level -----------------------------------------------------------------------------

def _pick_address(selectors: tuple[object, ...], explicit: str | None) -> str | None:
    if explicit:
        return explicit
    for ts in selectors:
        start, end = getattr(ts, "start", None), getattr(ts, "end", None)
        if isinstance(start, ipaddress.IPv4Address) and isinstance(end, ipaddress.IPv4Address):
            if start == end:
                return str(start)
            if int(end) - int(start) >= 2:
                return str(start + 1)
    return None


def load_scapy() -> None:
    """Import scapy's IP layer (about 1 s here), so the first tunnel probe does not pay for it
    inside its timed window."""
    import scapy.layers.inet  # noqa: PLC0415, F401 - scapy is slow to import; only the tunnel needs it


def build_echo(src: str, dst: str, ident: int, seq: int, payload: bytes) -> bytes:
    from scapy.layers.inet import ICMP, IP  # noqa: PLC0415 - see load_scapy

    return bytes(IP(src=src, dst=dst, ttl=64) / ICMP(type=8, id=ident, seq=seq) / payload)


def parse_echo_reply(packet: bytes, ident: int) -> int | None:
    """The sequence number of an ICMP echo reply with our identifier, else None."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != 1:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 8:
        return None
    icmp_type, _, _, rid, rseq = struct.unpack_from("!BBHHH", packet, ihl)
    return rseq if icmp_type == 0 and rid == ident else None


async def _tunnel(session: _Session, child: ChildSa, params: Ikev2Params, deadline: float, *,
                  watch: Stopwatch, facts: dict[str, Fact]) -> CheckResult:
    src = _pick_address(child.ts_i, params.inner_address)
    dst = _pick_address(child.ts_r, params.ping)
    if src is None or dst is None:
        return watch.result(False, Reason.PROBE_ERROR, facts=facts,
                            detail="no inner source or ping target: set ping/inner_address")
    facts.update(inner_source=src, ping=dst)
    loop = asyncio.get_running_loop()
    ep = await session.endpoint(session.ini.remote_port)
    ident = int.from_bytes(session.ini.spi_i[:2], "big")
    sent_at: dict[int, float] = {}
    rtts: dict[int, float] = {}
    bad = 0

    def absorb(packet: bytes, received: float) -> None:
        nonlocal bad
        try:
            kind, esp = classify_nat_t(packet)
            if kind != "esp":
                return
            _, inner = child.esp.open(esp)
        except IKEv2Error:
            bad += 1
            return
        seq = parse_echo_reply(inner, ident)
        if seq is not None and seq in sent_at and seq not in rtts:
            rtts[seq] = received - sent_at[seq]

    async def receive_until(until: float) -> None:
        while (now := loop.time()) < until:
            if len(rtts) == params.echo_count:
                return
            try:
                packet, received = await asyncio.wait_for(session.esp_inbox.get(), until - now)
            except TimeoutError:
                return
            absorb(packet, received)

    # built up front: a scapy build takes milliseconds, and replies arriving meanwhile would
    # only be read (and timestamped) after it
    echoes = [build_echo(src, dst, ident, seq, b"tunnelwatch" + bytes(21))
              for seq in range(1, params.echo_count + 1)]
    for seq, echo in enumerate(echoes, 1):
        if loop.time() >= deadline:
            break
        sent_at[seq] = loop.time()
        try:
            ep.send(child.esp.seal(echo))
        except IcmpError as exc:
            log.debug("echo %d: %s", seq, exc)
        await receive_until(min(loop.time() + params.echo_interval, deadline))
    await receive_until(min(loop.time() + ECHO_GRACE_SECONDS, deadline))
    watch.lap("tunnel")
    sent = len(sent_at)
    samples = sorted(rtts.values())
    quality = Quality(
        sent=sent, received=len(samples),
        loss_ratio=(sent - len(samples)) / sent if sent else 1.0,
        rtt_p50_seconds=samples[len(samples) // 2] if samples else None,
        rtt_p99_seconds=samples[min(len(samples) - 1, int(len(samples) * 0.99))]
        if samples else None,
        rtt_max_seconds=samples[-1] if samples else None)
    if bad:
        facts["esp_rejected"] = bad
    if not samples:
        return watch.result(False, Reason.TUNNEL_NO_REPLY, quality=quality, facts=facts,
                            detail=f"no echo reply from {dst} through the CHILD_SA")
    return watch.result(True, Reason.OK, quality=quality, facts=facts)


# --- registration -----------------------------------------------------------------------------

async def run_init(params: Ikev2Params, timeout: float) -> CheckResult:
    return await run_level(params, timeout, "init")


async def run_auth(params: Ikev2Params, timeout: float) -> CheckResult:
    return await run_level(params, timeout, "auth")


async def run_tunnel(params: Ikev2Params, timeout: float) -> CheckResult:
    return await run_level(params, timeout, "tunnel")


INIT = CheckKind("ikev2.init", Tier.FUNCTIONAL, Ikev2Params, run_init,
                 "IKE_SA_INIT answered with an accepted proposal")
AUTH = CheckKind("ikev2.auth", Tier.FUNCTIONAL, Ikev2Params, run_auth,
                 "PSK IKE SA established, responder AUTH verified, then deleted")
TUNNEL = CheckKind("ikev2.tunnel", Tier.SESSION, Ikev2Params, run_tunnel,
                   "CHILD_SA + ICMP echoes in ESP-in-UDP (AES-GCM), then deleted")


def plan(ctx: PlanContext) -> list[Planned]:
    """The ``ikev2:`` section -> ``ikev2.init``; ``ikev2.auth`` with a ``psk_file``;
    ``ikev2.tunnel`` with a ``psk_file`` and a ``ping`` address (or when ``level`` asks for it:
    the responder's single-host traffic selector is echoed then). ``level`` stops at a kind."""
    section = ctx.target.ikev2
    if section is None:
        return []
    psk_file = ctx.path(section.psk_file)
    base = Ikev2Params(host=ctx.target.address, port=section.port,
                       proposals=tuple(section.proposals), psk_file=psk_file,
                       local_id=section.local_id or "tunnelwatch-probe",
                       remote_id=section.remote_id, ping=section.ping,
                       inner_address=section.inner_address, echo_count=section.echo_count,
                       force_nat_t=section.force_nat_t)
    level = section.level
    out = [Planned.of(INIT, base)]
    if psk_file is not None and level != "init":
        out.append(Planned.of(AUTH, base))
        if level == "tunnel" or (level is None and section.ping is not None):
            out.append(Planned.of(TUNNEL, base))
    return out


def _plan_options(section: IKEv2Target, ctx: PlanContext) -> list[Planned]:
    return plan(ctx.with_sections(ikev2=section))


def _preflight(planned: Planned) -> None:
    try:
        _psk(planned.params)
    except OSError as exc:
        raise ConfigError(f"psk_file: {exc}") from None


COMMAND = ProbeCommand(
    name="ikev2", help="IKEv2 responder: SA_INIT, PSK IKE_AUTH, or ESP echoes",
    description="--level init: alive and a proposal accepted; auth: a PSK IKE SA with the "
                "responder's AUTH verified; tunnel: ICMP echoes through ESP. Every SA made is "
                "deleted.",
    options=IKEv2Target, plan=_plan_options, validate=ikev2_problems, preflight=_preflight,
    aliases={"--proposal": "proposals", "--count": "echo_count"},
    # a one-shot probe offers the usual suites and stops at init unless asked
    defaults={"level": "init", "proposals": list(DEFAULT_IKE_PROPOSALS)})

FAMILY = Family("ikev2", (INIT, AUTH, TUNNEL), plan,
                "IKEv2: IKE_SA_INIT, PSK IKE_AUTH, ESP-in-UDP echoes", (COMMAND,))
