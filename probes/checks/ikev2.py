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
    Stopwatch,
    first_retry_after,
    section_plan,
)
from probes.checks.certs import chain_facts, read_ca_file, verify_chain
from probes.checks.driver import Closed as DriverClosed
from probes.checks.driver import Driver, Unreachable
from probes.checks.ikev2_policy import POLICY, plan_policy
from probes.checks.tunnel import EchoRun, build_echo, judge_echoes
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
    ChildSa,
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


async def run_level(params: Ikev2Params, timeout: float, level: str) -> CheckResult:
    """One probe at ``level``: "init", "auth", "tunnel", or the policy scan's: "child" (an IKE
    SA and a CHILD_SA of ``esp_proposal`` in IKE_AUTH, any transform allowed, no traffic) and
    "create_child" (the same CHILD_SA in a CREATE_CHILD_SA of its own, without a KE payload)."""
    watch = Stopwatch()
    facts: dict[str, Fact] = {}
    try:
        proposals = parse_ike_proposals(params.proposals)
        psk = _psk(params)
        trusted = read_ca_file(params.ca_file) if params.ca_file else ()
    except (IKEv2Error, OSError, ConfigError) as exc:
        return watch.result(False, Reason.PROBE_ERROR, detail=f"configuration: {exc}")
    if level != "init" and psk is None:
        return watch.result(False, Reason.PROBE_ERROR, detail=f"level {level} needs a PSK")
    deadline = time.monotonic() + timeout
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
        child = (ChildRequest(esp_proposal=params.esp_proposal, aead_only=level == "tunnel",
                              in_create_child=level == "create_child")
                 if level in _CHILD_LEVELS else None)
        config = InitiatorConfig(
            local_address=ep.local_address, remote_address=ep.remote,
            proposals=proposals, psk=None if level == "init" else psk,
            local_id=params.local_id, remote_id=params.remote_id, child=child,
            trusted_ca_hashes=tuple(ca_hash(ca.public_bytes(serialization.Encoding.DER))
                                    for ca in trusted),
            force_nat_t=params.force_nat_t or level == "tunnel",
            nat_t_port=params.nat_t_port,
            retransmit_initial=first_retry_after(params.retransmit_initial, timeout))
        initiator = Initiator(config)
        driver: Driver[Event] = Driver(initiator)
        driver.adopt_udp(ep.remote, ep)
        session = _Session(initiator, driver)
        try:
            result = await _probe(session, params, level, deadline, watch=watch, facts=facts,
                                  trusted=trusted)
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
                 watch: Stopwatch, facts: dict[str, Fact],
                 trusted: tuple[x509.Certificate, ...]) -> CheckResult:
    session.ini.start(time.monotonic())
    await session.run_until(InitCompleted, deadline)
    watch.lap("sa_init")
    result = _init_result(session, watch, facts)
    if result is not None or level == "init":
        return result or watch.result(True, Reason.OK, facts=facts)
    await session.run_until(AuthCompleted, deadline)
    watch.lap("auth")
    result = _auth_result(session, watch, facts, level, trusted)
    if result is not None or level in ("auth", "child"):
        return result or watch.result(True, Reason.OK, facts=facts)
    if level == "create_child":
        await session.run_until(ChildCreated, deadline)
        watch.lap("create_child")
        return _created_result(session, watch, facts)
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
        facts.update(negotiated_facts(o.init.suite))
        facts.update(alive=True, proposal=suite_label(o.init.suite), dh_group=o.init.suite.group,
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
                 level: str, trusted: tuple[x509.Certificate, ...]) -> CheckResult | None:
    o = session.outcome
    if o.auth is None:
        failed = o.failed
        if failed is None:
            return watch.result(False, Reason.TIMEOUT, detail="no IKE_AUTH answer", facts=facts)
        return watch.result(False, _FAILURE_REASONS[failed.failure], detail=failed.detail,
                            facts=facts)
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
            return watch.result(False, untrusted[0], detail=untrusted[1], facts=facts)
    if o.auth.child_error:
        facts["child_sa_error"] = o.auth.child_error
    if o.auth.child is not None:
        facts["crypto.esp_transform"] = esp_label(o.auth.child.proposal)
    if level in _CHILD_LEVELS and level != "create_child" and o.auth.child is None:
        return watch.result(False, Reason.CHILD_SA_FAILED,
                            detail=f"IKE SA established; CHILD_SA refused: {o.auth.child_error}",
                            facts=facts)
    return None


def _created_result(session: _Session, watch: Stopwatch,
                    facts: dict[str, Fact]) -> CheckResult:
    o = session.outcome
    if o.created is None:
        failed = o.failed
        if failed is None:
            return watch.result(False, Reason.TIMEOUT, detail="no CREATE_CHILD_SA answer",
                                facts=facts)
        return watch.result(False, _FAILURE_REASONS[failed.failure], detail=failed.detail,
                            facts=facts)
    if o.created.child is None:
        facts["child_sa_error"] = o.created.error
        # an error notify is the responder's "no"; a flawed answer is not a refusal
        reason = Reason.CHILD_SA_FAILED if o.created.refused else Reason.BAD_RESPONSE
        return watch.result(False, reason, facts=facts,
                            detail=f"CREATE_CHILD_SA refused: {o.created.error}")
    facts["crypto.esp_transform"] = esp_label(o.created.child.proposal)
    return watch.result(True, Reason.OK, facts=facts)


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


async def _tunnel(session: _Session, child: ChildSa, params: Ikev2Params, deadline: float, *,
                  watch: Stopwatch, facts: dict[str, Fact]) -> CheckResult:
    if child.esp is None:
        return watch.result(False, Reason.PROBE_ERROR, facts=facts,
                            detail="the responder chose an ESP transform the probe cannot speak")
    esp_sa = child.esp
    src = _pick_address(child.ts_i, params.inner_address)
    dst = _pick_address(child.ts_r, params.ping)
    if src is None or dst is None:
        return watch.result(False, Reason.PROBE_ERROR, facts=facts,
                            detail="no inner source or ping target: set ping/inner_address")
    facts.update(inner_source=src, ping=dst)
    driver = session.driver
    nat_t = (session.ini.config.remote_address[0], session.ini.remote_port)
    run = EchoRun(int.from_bytes(session.ini.spi_i[:2], "big"))
    payload = b"tunnelwatch" + bytes(21)
    bad = 0

    def send(seq: int) -> SendStamp | None:
        return driver.send(esp_sa.seal(build_echo(src, dst, run.ident, seq, payload)), nat_t)

    def handle(event: Event | Unreachable | DriverClosed) -> None:
        nonlocal bad
        if not isinstance(event, EspPacket) or driver.datagram is None:
            session.record(event)  # the IKE SA goes on (the initiator answers requests)
            return
        try:
            kind, esp = classify_nat_t(event.data)
            if kind != "esp":
                return  # a NAT keepalive
            _, inner = esp_sa.open(esp)
        except IKEv2Error:
            bad += 1
            return
        run.reply(inner, driver.datagram)

    await run.run(driver, params.echo_count, params.echo_interval, deadline, send=send,
                  handle=handle)
    watch.lap("tunnel")
    if bad:
        facts["esp_rejected"] = bad
    # no loss or RTT bound here: any reply through the CHILD_SA passes
    return judge_echoes(watch, run.quality(), facts, loss_threshold=1.0, rtt_threshold=None,
                        no_reply=f"no echo reply from {dst} through the CHILD_SA")


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
                       force_nat_t=section.force_nat_t)
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
