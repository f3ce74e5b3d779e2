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
import datetime as dt
import ipaddress
import logging
import socket
import time
import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization

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
from probes.checks.certs import chain_facts, read_ca_file, verify_chain
from probes.checks.driver import Closed as DriverClosed
from probes.checks.driver import Driver, Unreachable
from probes.checks.ikev2_policy import POLICY, plan_policy
from probes.checks.tunnel import (
    Tunnel,
    TunnelProbe,
    echo_node,
    in_turn,
    judge_echoes,
    run_probe,
    run_through,
)
from probes.checks.udp import IcmpError, SendStamp, UdpEndpoint
from probes.config import IKEv2Target, ikev2_problems
from probes.model import Reason, Tier
from probes.protocols.ikev2 import IKEv2Error
from probes.protocols.ikev2.crypto import CipherSuite
from probes.protocols.ikev2.esp import classify_nat_t
from probes.protocols.ikev2.initiator import (
    AuthCompleted,
    ChildCreated,
    ChildRequest,
    Closed,
    EspPacket,
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
    encr_name,
    esp_label,
    group_name,
    integ_name,
    parse_ike_proposals,
    prf_name,
    suite_label,
)
from probes.protocols.ikev2.signature import ca_hash

log = logging.getLogger(__name__)

MAX_HALF_OPEN = 3  # strongSwan's cookie_threshold_ip default
HALF_OPEN_HOLD_SECONDS = 30.0  # strongSwan's half_open_timeout default
DELETE_BUDGET_SECONDS = 0.9  # must fit in base.CLEANUP_GRACE_SECONDS


class Ikev2Params(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str
    port: int = 500
    nat_t_port: int = 4500
    proposals: tuple[str, ...] = DEFAULT_IKE_PROPOSALS
    psk: str | None = None  # or psk_file; needed by the auth and tunnel levels
    psk_file: str | None = None
    local_id: str = "tunnelwatch-probe"
    remote_id: str | None = None  # when set, the responder must identify as this
    # a responder that authenticates with a certificate: the CA(s) its chain must lead to
    ca_file: str | None = None
    force_nat_t: bool = False  # fake NAT-D so the exchange floats to 4500
    retransmit_initial: float = 0.5  # at most a quarter of the timeout (first_retry_after)
    # tunnel level
    ping: str | None = None  # address behind the responder; default: its single-host TSr
    inner_address: str | None = None  # our source inside the tunnel; default: from TSi
    echo_count: int = 5
    echo_interval: float = 0.05
    esp_proposal: str = DEFAULT_ESP_PROPOSAL
    request_config: bool = False  # ask for an inner address and resolvers (CP)
    dns_resolver: str | None = None  # the user-path DNS check's resolver (else INTERNAL_IP4_DNS)


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
    created: ChildCreated | None = None  # the CREATE_CHILD_SA's answer
    failed: Failed | None = None
    closed: Closed | None = None
    retries: list[InitRetried] = field(default_factory=list)
    icmp: IcmpError | None = None


class _Session:
    """One initiator on the driver: port 500 and, once floated, the NAT-T port."""

    def __init__(self, ini: Initiator, driver: Driver[Event]) -> None:
        self.ini = ini
        self.driver = driver
        self.outcome = _Outcome()
        self._closed = False

    def record(self, event: Event | Unreachable | DriverClosed) -> None:
        o = self.outcome
        if isinstance(event, InitCompleted):
            o.init = event
        elif isinstance(event, InitRetried):
            o.retries.append(event)
        elif isinstance(event, AuthCompleted):
            o.auth = event
        elif isinstance(event, ChildCreated):
            o.created = event
        elif isinstance(event, Failed):
            o.failed = event
        elif isinstance(event, Closed):
            o.closed = event
        elif (isinstance(event, Unreachable) and not self.ini.sa_init_answered
              and o.icmp is None):
            # only meaningful before the responder ever answered: afterwards it is stale noise
            o.icmp = event.error
        # BadDatagram: counted by the initiator (dropped); EspPacket: the echo loop's

    async def run_until(self, done: type, deadline: float) -> None:
        """Events until one of type ``done`` arrives, or (except while closing, which must
        finish even after a failure) a failure, or the deadline."""
        while not self._reached(done):
            if done is not Closed and (self.outcome.failed is not None or self.outcome.icmp):
                return
            event = await self.driver.next_event(deadline)
            if event is None:
                return
            self.record(event)

    def _reached(self, done: type) -> bool:
        o = self.outcome
        return {InitCompleted: o.init, AuthCompleted: o.auth, ChildCreated: o.created,
                Closed: o.closed}.get(done) is not None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        now = time.monotonic()
        self.ini.close(now)
        if self.ini.get_timer() is not None:
            await self.run_until(Closed, now + DELETE_BUDGET_SECONDS)
        self.driver.close()


# --- the check --------------------------------------------------------------------------------

def _psk(params: Ikev2Params) -> bytes | None:
    if params.psk is not None:
        return params.psk.encode()
    if params.psk_file is not None:
        return Path(params.psk_file).read_text().strip().encode()
    return None


def negotiated_facts(suite: CipherSuite) -> dict[str, Fact]:
    """What the responder chose for the IKE SA, as ``crypto.*`` facts: each value one of a known
    few names (strongSwan's tokens, "unknown" otherwise), so the agent exports them as labels of
    ``tunnelwatch_node_crypto_info``."""
    return {"crypto.ike_encryption": encr_name(suite.encr, suite.encr_key_bytes * 8),
            "crypto.ike_integrity": integ_name(suite.integ),
            "crypto.ike_prf": prf_name(suite.prf),
            "crypto.ike_dh_group": group_name(suite.group),
            "crypto.ike_pq_key_exchange": ",".join(group_name(m) for m in suite.additional)
            or "none"}


_CHILD_LEVELS = ("tunnel", "child", "create_child")
_FAILURE_REASONS = {
    Failure.TIMEOUT: Reason.TIMEOUT,
    Failure.NO_PROPOSAL_CHOSEN: Reason.NO_PROPOSAL_CHOSEN,
    Failure.INVALID_KE: Reason.INVALID_KE,
    Failure.AUTH_FAILED: Reason.AUTH_FAILED,
    Failure.ERROR_NOTIFY: Reason.BAD_RESPONSE,
    Failure.BAD_PACKET: Reason.BAD_PACKET,
}


class _Probe:
    """One check run at a level: the half-open slot, the initiator on the driver, the
    exchanges the level asks for; at the tunnel level a :class:`Tunnel` through the CHILD_SA
    (ESP-in-UDP), so the session's echoes and the user-path steps run through it alike."""

    def __init__(self, params: Ikev2Params, timeout: float, level: str) -> None:
        self.params, self.level = params, level
        self.watch = Stopwatch()
        self.facts: dict[str, Fact] = {}
        self.deadline = time.monotonic() + timeout
        self.limiter: asyncio.Semaphore | None = None
        self.session: _Session | None = None
        self.trusted: tuple[x509.Certificate, ...] = ()
        self.esp_rejected = 0

    async def negotiate(self) -> None:
        """IKE_SA_INIT, then (beyond init) IKE_AUTH with the CHILD_SA the level asks for;
        :class:`ProbeFailure` or :class:`ConfigError` when a step fails."""
        params, level = self.params, self.level
        try:
            proposals = parse_ike_proposals(params.proposals)
            psk = _psk(params)
            self.trusted = read_ca_file(params.ca_file) if params.ca_file else ()
        except (IKEv2Error, OSError, ConfigError) as exc:
            raise ConfigError(f"configuration: {exc}") from None
        if level != "init" and psk is None:
            raise ConfigError(f"level {level} needs a PSK")
        limiter = half_open_limiter(params.host, params.port)
        try:
            # not wait_for: on 3.11 it swallows a cancel that comes as a slot is freed, and
            # the cancelled probe ran all the same (probes/aio.py)
            async with asyncio.timeout(self.deadline - time.monotonic()):
                await limiter.acquire()
        except TimeoutError:
            raise ProbeFailure(Reason.OVERLOADED, f"{MAX_HALF_OPEN} half-open SAs to this "
                                                  "responder in flight") from None
        self.limiter = limiter
        self.watch.lap("queue")
        try:
            ep = await UdpEndpoint.open(params.host, params.port)
        except socket.gaierror as exc:
            raise ProbeFailure(Reason.RESOLVE_FAILED, str(exc)) from None
        except IcmpError as exc:
            raise ProbeFailure(exc.reason, str(exc)) from None
        except OSError as exc:
            raise ProbeFailure(Reason.NETWORK_UNREACHABLE, str(exc)) from None
        child = (ChildRequest(esp_proposal=params.esp_proposal, aead_only=level == "tunnel",
                              in_create_child=level == "create_child",
                              request_config=level == "tunnel" and params.request_config)
                 if level in _CHILD_LEVELS else None)
        config = InitiatorConfig(
            local_address=ep.local_address, remote_address=ep.remote,
            proposals=proposals, psk=None if level == "init" else psk,
            local_id=params.local_id, remote_id=params.remote_id, child=child,
            trusted_ca_hashes=tuple(ca_hash(ca.public_bytes(serialization.Encoding.DER))
                                    for ca in self.trusted),
            force_nat_t=params.force_nat_t or level == "tunnel",
            nat_t_port=params.nat_t_port,
            retransmit_initial=first_retry_after(params.retransmit_initial,
                                                 self.deadline - time.monotonic()))
        initiator = Initiator(config)
        driver: Driver[Event] = Driver(initiator)
        driver.adopt_udp(ep.remote, ep)
        self.session = _Session(initiator, driver)
        try:
            await self._exchanges(self.session)
        except (IKEv2Error, OSError) as exc:  # local trouble (sending failed): not the node
            raise ProbeFailure(Reason.PROBE_ERROR, f"{type(exc).__name__}: {exc}") from None

    async def _exchanges(self, session: _Session) -> None:
        session.ini.start(time.monotonic())
        await session.run_until(InitCompleted, self.deadline)
        self.watch.lap("sa_init")
        failure = _init_failure(session, self.facts)
        if failure is not None:
            raise failure
        if self.level == "init":
            return
        await session.run_until(AuthCompleted, self.deadline)
        self.watch.lap("auth")
        failure = _auth_failure(session, self.facts, self.level, self.trusted)
        if failure is not None:
            raise failure
        if self.level == "create_child":
            await session.run_until(ChildCreated, self.deadline)
            self.watch.lap("create_child")
            failure = _created_failure(session, self.facts)
            if failure is not None:
                raise failure

    async def negotiated(self) -> CheckResult:
        """A run without traffic (init, auth, child, create_child): the exchanges are the
        check."""
        await self.negotiate()
        return self.watch.result(True, Reason.OK, facts=self.facts)

    async def establish(self) -> Tunnel:
        """The exchanges with a CHILD_SA, then the tunnel from our inner address (the one the
        responder assigned, ``inner_address``, or one out of TSi) to ``ping`` (or the
        responder's single-host TSr)."""
        await self.negotiate()
        session, params = self.session, self.params
        assert session is not None and session.outcome.auth is not None
        auth = session.outcome.auth
        child = auth.child
        assert child is not None
        if child.esp is None:
            raise ProbeFailure(Reason.PROBE_ERROR,
                               "the responder chose an ESP transform the probe cannot speak")
        esp_sa = child.esp
        if auth.internal_address is not None:
            self.facts.update(internal_address=auth.internal_address,
                              internal_dns=",".join(auth.internal_dns))
        elif params.request_config:
            self.facts["internal_address"] = "none assigned"
        src = _pick_address(child.ts_i, auth.internal_address or params.inner_address)
        dst = _pick_address(child.ts_r, params.ping)
        if src is None or dst is None:
            raise ProbeFailure(Reason.PROBE_ERROR,
                               "no inner source or ping target: set ping/inner_address")
        self.facts.update(inner_source=src, ping=dst)
        driver = session.driver
        nat_t = (session.ini.config.remote_address[0], session.ini.remote_port)

        def send(packet: bytes) -> SendStamp | None:
            try:
                return driver.send(esp_sa.seal(packet), nat_t)
            except (IKEv2Error, OSError) as exc:  # ours: not the node
                raise ProbeFailure(Reason.PROBE_ERROR,
                                   f"{type(exc).__name__}: {exc}") from None

        def unwrap(event: Event | Unreachable | DriverClosed) -> bytes | None:
            if not isinstance(event, EspPacket):
                session.record(event)  # the IKE SA goes on (the initiator answers requests)
                return None
            try:
                kind, esp = classify_nat_t(event.data)
                if kind != "esp":
                    return None  # a NAT keepalive
                return esp_sa.open(esp)[1]
            except IKEv2Error:
                self.esp_rejected += 1
                return None

        resolvers = (params.dns_resolver,) if params.dns_resolver else auth.internal_dns
        return Tunnel(driver, src, dst, send, unwrap, resolvers, kind="CHILD_SA")

    async def finish(self) -> None:
        """Delete what was made (the CHILD_SA, then the IKE SA), give the slot back."""
        if self.esp_rejected:
            self.facts["esp_rejected"] = self.esp_rejected
        if self.session is not None:
            await self.session.close()
            self.watch.lap("delete")
        self.release()

    def release(self) -> None:
        """Idempotent; a half-open SA keeps its slot until the responder has expired it."""
        if self.limiter is None:
            return
        limiter, self.limiter = self.limiter, None
        if self.session is not None and self.session.ini.half_open:
            asyncio.get_running_loop().call_later(HALF_OPEN_HOLD_SECONDS, limiter.release)
        else:
            limiter.release()


async def run_level(params: Ikev2Params, timeout: float, level: str) -> CheckResult:
    """One probe at ``level``: "init", "auth", "tunnel" (in the identity's turn), or the policy
    scan's: "child" (an IKE SA and a CHILD_SA of ``esp_proposal`` in IKE_AUTH, any transform
    allowed, no traffic) and "create_child" (the same CHILD_SA in a CREATE_CHILD_SA of its own,
    without a KE payload)."""
    if level == "tunnel":
        return await in_turn(identity(params), timeout,
                             lambda left: _run_level(params, left, level))
    return await _run_level(params, timeout, level)


async def _run_level(params: Ikev2Params, timeout: float, level: str) -> CheckResult:
    probe = _Probe(params, timeout, level)
    try:
        if level == "tunnel":
            result = await run_through(probe, _echo_step)
        else:
            result = await run_probe(probe, probe.negotiated)
    finally:
        if probe.session is not None:
            await probe.session.close()  # idempotent; here for cancellation
        probe.release()
    if probe.session is not None and probe.session.outcome.closed is not None:
        result.facts["delete_acked"] = probe.session.outcome.closed.acknowledged
    return result


async def _echo_step(tunnel: Tunnel, probe: TunnelProbe) -> CheckResult:
    assert isinstance(probe, _Probe)
    quality = await echo_node(tunnel, probe, probe.params.echo_count, probe.params.echo_interval,
                              b"tunnelwatch-ike-")
    # no loss or RTT bound here: any reply through the CHILD_SA passes
    return judge_echoes(probe.watch, quality, probe.facts, loss_threshold=1.0, rtt_threshold=None,
                        no_reply=f"no echo reply from {tunnel.node} through the CHILD_SA")


def tunnel_probe(params: Ikev2Params, timeout: float) -> _Probe:
    """One run of traffic through a CHILD_SA (the tunnel and the user-path checks)."""
    return _Probe(params, timeout, "tunnel")


def identity(params: Ikev2Params) -> tuple[str, str, int, str]:
    """This agent's IKE identity with the responder: one CHILD_SA with traffic at a time
    (:func:`~probes.checks.tunnel.in_turn`); a second one with the same selectors takes the
    inner address's route from the first."""
    return ("ikev2", params.host, params.port, params.local_id)


def _unanswered(failed: Failed | None, exchange: str) -> ProbeFailure:
    """The initiator's own failure of ``exchange`` (what the answer was), else no answer."""
    if failed is None:
        return ProbeFailure(Reason.TIMEOUT, f"no {exchange} answer")
    return ProbeFailure(_FAILURE_REASONS[failed.failure], failed.detail)


def _init_failure(session: _Session, facts: dict[str, Fact]) -> ProbeFailure | None:
    o = session.outcome
    facts["cookie_rounds"] = sum(r.why == "cookie" for r in o.retries)
    facts["invalid_ke_rounds"] = sum(r.why == "invalid-ke" for r in o.retries)
    if o.init is not None:
        facts.update(negotiated_facts(o.init.suite))
        facts.update(alive=True, proposal=suite_label(o.init.suite), dh_group=o.init.suite.group,
                     nat_t=o.init.floated, behind_nat=o.init.nat_local,
                     responder_behind_nat=o.init.nat_remote,
                     childless_supported=o.init.childless_supported,
                     fragmentation_supported=o.init.fragmentation_supported)
        return None
    if o.icmp is not None:
        return ProbeFailure(o.icmp.reason, str(o.icmp))
    if o.failed is not None:
        # any answer at all (NO_PROPOSAL_CHOSEN, INVALID_KE, other notifies) proves liveness
        facts["alive"] = o.failed.failure not in (Failure.TIMEOUT, Failure.BAD_PACKET)
        return _unanswered(o.failed, "IKE_SA_INIT")
    if session.ini.dropped:  # something answers on the port, but it does not speak IKEv2 to us
        return ProbeFailure(Reason.BAD_RESPONSE,
                            f"{session.ini.dropped} datagrams back, none an IKE answer")
    return ProbeFailure(Reason.TIMEOUT, "no IKE_SA_INIT answer")


def _auth_failure(session: _Session, facts: dict[str, Fact], level: str,
                  trusted: tuple[x509.Certificate, ...]) -> ProbeFailure | None:
    o = session.outcome
    if o.auth is None:
        return _unanswered(o.failed, "IKE_AUTH")
    facts.update(responder_id=o.auth.responder_id, responder_auth_verified=True,
                 childless=o.auth.childless,
                 responder_auth="certificate" if o.auth.certificates else "psk")
    if o.auth.certificates:
        # its AUTH is signed by the first one's key (the initiator checked); is it trusted?
        facts.update(chain_facts(o.auth.certificates))
        untrusted = (verify_chain(o.auth.certificates, trusted, dt.datetime.now(dt.UTC))
                     if trusted else (Reason.CERT_VERIFY_FAILED,
                                      "the responder authenticates with a certificate: set "
                                      "ca_file to verify it"))
        if untrusted is not None:
            return ProbeFailure(*untrusted)
    if o.auth.child_error:
        facts["child_sa_error"] = o.auth.child_error
    if o.auth.child is not None:
        facts["crypto.esp_transform"] = esp_label(o.auth.child.proposal)
    if level in _CHILD_LEVELS and level != "create_child" and o.auth.child is None:
        return ProbeFailure(Reason.CHILD_SA_FAILED,
                            f"IKE SA established; CHILD_SA refused: {o.auth.child_error}")
    return None


def _created_failure(session: _Session, facts: dict[str, Fact]) -> ProbeFailure | None:
    o = session.outcome
    if o.created is None:
        return _unanswered(o.failed, "CREATE_CHILD_SA")
    if o.created.child is None:
        facts["child_sa_error"] = o.created.error
        # an error notify is the responder's "no"; a flawed answer is not a refusal
        reason = Reason.CHILD_SA_FAILED if o.created.refused else Reason.BAD_RESPONSE
        return ProbeFailure(reason, f"CREATE_CHILD_SA refused: {o.created.error}")
    facts["crypto.esp_transform"] = esp_label(o.created.child.proposal)
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


# --- registration -----------------------------------------------------------------------------

INIT = CheckKind("ikev2.init", Tier.FUNCTIONAL, Ikev2Params, partial(run_level, level="init"),
                 "IKE_SA_INIT answered with an accepted proposal")
AUTH = CheckKind("ikev2.auth", Tier.FUNCTIONAL, Ikev2Params, partial(run_level, level="auth"),
                 "PSK IKE SA established, responder AUTH verified, then deleted")
TUNNEL = CheckKind("ikev2.tunnel", Tier.SESSION, Ikev2Params, partial(run_level, level="tunnel"),
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
                       ca_file=ctx.path(section.ca_file),
                       local_id=section.local_id or "tunnelwatch-probe",
                       remote_id=section.remote_id, ping=section.ping,
                       inner_address=section.inner_address, echo_count=section.echo_count,
                       force_nat_t=section.force_nat_t, request_config=section.request_config,
                       dns_resolver=section.dns_resolver)
    level = section.level
    out = [Planned.of(INIT, base)]
    if psk_file is not None and level != "init":
        out.append(Planned.of(AUTH, base))
        if level == "tunnel" or (level is None and section.ping is not None):
            out.append(Planned.of(TUNNEL, base))
    return out + plan_policy(ctx)


def _preflight(planned: Planned) -> None:
    try:
        _psk(planned.params)
    except OSError as exc:
        raise ConfigError(f"psk_file: {exc}") from None
    if planned.params.ca_file:
        read_ca_file(planned.params.ca_file)


COMMAND = ProbeCommand(
    name="ikev2", help="IKEv2 responder: SA_INIT, PSK IKE_AUTH, or ESP echoes",
    description="--level init: alive and a proposal accepted; auth: a PSK IKE SA with the "
                "responder's AUTH verified; tunnel: ICMP echoes through ESP. Every SA made is "
                "deleted.",
    options=IKEv2Target, plan=section_plan("ikev2", plan), validate=ikev2_problems,
    preflight=_preflight,
    aliases={"--proposal": "proposals", "--count": "echo_count", "--ca": "ca_file"},
    # a one-shot probe offers the usual suites and stops at init unless asked
    defaults={"level": "init", "proposals": list(DEFAULT_IKE_PROPOSALS)})

FAMILY = Family("ikev2", (INIT, AUTH, TUNNEL, POLICY), plan,
                "IKEv2: IKE_SA_INIT, PSK IKE_AUTH, ESP-in-UDP echoes", (COMMAND,))
