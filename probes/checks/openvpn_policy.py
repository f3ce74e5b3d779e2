"""``openvpn.policy``: what an OpenVPN server's control channel is willing to accept.

Each item is one ClientHello offering only something deprecated, written by
:mod:`probes.protocols.tlswire` (so the offer does not depend on what the local TLS library
still sends), inside the OpenVPN control channel after the usual hard reset (the target's own
tls-crypt / tls-auth / tls-crypt-v2 key). A ServerHello taking it is an acceptance. A TLS
server refuses with an alert, but OpenVPN drops the client instance on the TLS error before its
alert leaves (its log says "Sent fatal SSL alert", the wire says nothing): so a hello the server
has ACKed and not answered within :data:`REFUSAL_SILENCE_SECONDS` is a refusal too (an accepted
hello is answered at once, and a lost ServerHello is resent by the server's reliability layer
within 2 s). After an accepted offer the probe ends the handshake with a fatal alert, which
makes the server drop that instance at once. Either way nothing lingers, and each refused offer
costs the server one "TLS handshake failed" line in its log.

* ``tls_version_1_0`` / ``tls_version_1_1``: only that version (every pre-1.2 suite);
* ``tls_kx_rsa``: TLS 1.2 with only RSA key-transport suites (no forward secrecy);
* ``tls_auth_md5`` / ``tls_auth_sha1`` (targets using tls-auth): a hard reset authenticated with
  that digest; an answer means the server's ``--auth`` is it.
* ``data_cipher_bf_cbc`` / ``data_cipher_none`` (targets with a CA file): a whole session (TLS,
  key-method 2, PUSH_REQUEST) whose client speaks only that data-channel cipher (IV_CIPHERS and
  the OCC options string); a PUSH_REPLY with ``cipher`` that one is an acceptance, OpenVPN's
  AUTH_FAILED "cipher negotiation failed" a refusal. Then EXIT, like every session probe.

And the post-quantum offer: TLS 1.3 with X25519MLKEM768 as the only group and key share,
reported as ``crypto.tls_pq_group`` and ``node_pq_key_exchange_accepted``.

Tier ``policy``: hourly, metrics and ``--json`` only, never verdicts.
"""

from __future__ import annotations

import os
import time

import msgspec
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from probes.checks.base import (
    CheckKind,
    CheckResult,
    Fact,
    Family,
    PlanContext,
    Planned,
    ProbeFailure,
    Stopwatch,
    weak_choices_result,
)
from probes.checks.driver import Closed, Unreachable
from probes.checks.openvpn import (
    Level,
    OpenVPNParams,
    _Probe,
    build_wrapper,
    plan_params,
    run_level,
)
from probes.model import Reason, Tier
from probes.protocols.openvpn import session as ov
from probes.protocols.openvpn.policy import CIPHER_ITEMS, DEFAULT_ITEMS, DIGEST_ITEMS, HELLO_ITEMS
from probes.protocols.tlswire import (
    SUITES,
    TLS13,
    X25519MLKEM768,
    HelloOffer,
    ServerFlight,
    client_hello,
    group_name,
)

PQ_ITEM = "tls_pq_x25519mlkem768"
# a server's X25519MLKEM768 share: the ML-KEM-768 ciphertext (1088) then its X25519 key (32)
SERVER_SHARE_LENGTHS = {X25519MLKEM768: 1088 + 32}
ITEM_TIMEOUT_SECONDS = 5.0
REFUSAL_SILENCE_SECONDS = 3.0


class OpenVPNPolicyParams(OpenVPNParams, frozen=True, kw_only=True):
    items: tuple[str, ...] = DEFAULT_ITEMS
    post_quantum: bool = True


def _pq_offer() -> HelloOffer:
    """The hybrid share (draft-ietf-tls-ecdhe-mlkem): ML-KEM-768 encapsulation key, then
    X25519 key."""
    share = (mlkem.MLKEM768PrivateKey.generate().public_key().public_bytes_raw()
             + x25519.X25519PrivateKey.generate().public_key().public_bytes_raw())
    return HelloOffer((TLS13,), (0x1301, 0x1302, 0x1303), (X25519MLKEM768,),
                      ((X25519MLKEM768, share),))


class _HelloProbe(_Probe):
    """The OpenVPN probe's transport and reset, with one ClientHello of ours instead of TLS."""

    def __init__(self, params: OpenVPNParams, hello: bytes, timeout: float) -> None:
        super().__init__(params, Level.RESET, timeout)
        self.hello = hello
        self.answer: ServerFlight | None = None
        self.dropped = False  # ACKed, never answered: the server dropped us (a refusal)

    def build_session(self) -> ov.ClientSession:
        params = self.params
        options = ov.SessionOptions(
            hello=self.hello, key_exchange=False, want_push=False,
            proto_name="UDPv4" if params.proto == "udp" else "TCPv4_CLIENT",
            retransmit=params.proto == "udp")
        return ov.ClientSession(build_wrapper(params, int(time.time())), options,
                                remote=self.remote)

    def handle(self, event: ov.Event | Unreachable | Closed) -> None:
        if isinstance(event, ov.HelloAnswered):
            self.answer = event.flight
        else:  # a malformed answer to the hello is ServerMisbehaved: bad-response there
            super().handle(event)

    async def run(self) -> ServerFlight | None:
        """The server's answer to the hello; None when it ACKed it and then fell silent."""
        await self.open()
        session = self.session = self.build_session()
        driver = self.drive(session)
        session.start(time.monotonic())
        await self.run_until(lambda: self.reset_answered, "reset")
        acked_at: float | None = None
        while self.answer is None:
            if acked_at is None and session.fewest_sends_unacknowledged == 0:
                acked_at = time.monotonic()
            until = self.deadline if acked_at is None else min(
                self.deadline, acked_at + REFUSAL_SILENCE_SECONDS)
            event = await driver.next_event(until)
            if event is None:
                if acked_at is None:
                    raise self.stalled("hello")
                self.dropped = True
                return None
            self.handle(event)
        return self.answer

    async def leave(self) -> None:
        """End our handshake with an alert; wait briefly for its ACK (the server has it)."""
        session, driver = self.session, self.driver
        if (self.dropped or session is None or driver is None
                or not session.end_hello(time.monotonic())):
            return
        until = time.monotonic() + min(1.0, max(self.remaining(), 0.2))
        while not session.exit_acknowledged and time.monotonic() < until:
            if await driver.next_event(until) is None:
                break
        self.facts["alert_acknowledged"] = session.exit_acknowledged


async def _hello(params: OpenVPNParams, offer: HelloOffer, timeout: float
                 ) -> ServerFlight | CheckResult | None:
    probe = _HelloProbe(params, client_hello(offer, os.urandom(32)), timeout)
    try:
        return await probe.run()
    except ProbeFailure as exc:
        return probe.watch.result(False, exc.reason, detail=exc.detail)
    finally:
        await probe.finish()


def _hello_outcome(name: str, offer: HelloOffer, answer: ServerFlight | CheckResult | None
                   ) -> tuple[str, dict[str, Fact]]:
    if answer is None:
        return "refused", {f"refusal.{name}": "dropped without an answer"}
    if isinstance(answer, CheckResult):
        return "error", {f"error.{name}": f"{answer.reason.value}: {answer.detail}"[:200]}
    hello = answer.hello
    if answer.alert is not None or hello is None or hello.retry:
        why = answer.alert.name if answer.alert is not None else "HelloRetryRequest"
        return "refused", {f"refusal.{name}": why}
    if hello.version not in offer.versions or hello.suite not in offer.suites:
        return "error", {f"error.{name}": f"bad-response: the server chose {hello.version_name}"
                                          f"/{hello.suite:#06x}, which was not offered"}
    if offer.key_shares and (hello.group not in offer.groups
                         or hello.key_share_len != SERVER_SHARE_LENGTHS.get(hello.group,
                                                                            hello.key_share_len)):
        return "error", {f"error.{name}": f"bad-response: the server's key share "
                                          f"({group_name(hello.group or 0)}, "
                                          f"{hello.key_share_len} bytes) is not one offered"}
    suite = SUITES[hello.suite].name
    return "accepted", {f"chosen.{name}": f"{hello.version_name} {suite}"}


async def _digest(params: OpenVPNParams, digest: str, timeout: float) -> str:
    probe = _Probe(msgspec.structs.replace(params, auth_digest=digest), Level.RESET, timeout)
    try:
        await probe.open()
        session = probe.session = probe.build_session()
        probe.drive(session)
        session.start(time.monotonic())
        await probe.run_until(lambda: probe.reset_answered, "reset")
        return "accepted"
    except ProbeFailure as exc:
        return "refused" if exc.reason is Reason.RESET_IGNORED else "error"
    finally:
        await probe.finish()


async def _data_cipher(params: OpenVPNParams, name: str, timeout: float
                       ) -> tuple[str, dict[str, Fact]]:
    """A session whose only data-channel cipher is the item's: what the server pushes."""
    cipher = CIPHER_ITEMS[name]
    result = await run_level(msgspec.structs.replace(params, ciphers=(cipher,)), timeout,
                             Level.SESSION)
    pushed = result.facts.get("pushed_cipher")
    if result.ok and pushed == cipher:
        return "accepted", {f"chosen.{name}": f"cipher {cipher}"}
    if result.ok:  # it pushed another cipher: one we did not offer, so not ours to take
        return "refused", {f"refusal.{name}": f"pushed cipher {pushed}, not the one offered"}
    if result.reason is Reason.AUTH_FAILED and "cipher" in result.detail:
        # OpenVPN 2.5+: "AUTH_FAILED,Data channel cipher negotiation failed (no shared cipher)"
        return "refused", {f"refusal.{name}": result.detail[:200]}
    return "error", {f"error.{name}": f"{result.reason.value}: {result.detail}"[:200]}


async def run_policy(params: OpenVPNPolicyParams, timeout: float) -> CheckResult:
    watch = Stopwatch()
    deadline = time.monotonic() + timeout
    facts: dict[str, Fact] = {}
    accepted: list[str] = []
    errors: list[str] = []
    unknown = [n for n in params.items
               if n not in HELLO_ITEMS and n not in DIGEST_ITEMS and n not in CIPHER_ITEMS]
    if unknown:
        return watch.result(False, Reason.PROBE_ERROR, detail=f"unknown items: {unknown}")

    def budget() -> float:
        return min(ITEM_TIMEOUT_SECONDS, deadline - time.monotonic())

    for name in params.items:
        if budget() <= 0:
            errors.append(name)
            facts[f"error.{name}"] = "timeout: no time left"
            continue
        if name in DIGEST_ITEMS:
            if not params.tls_auth_file:
                facts[f"policy.{name}"] = "n/a"  # tls-crypt(-v2) has no digest to choose
                continue
            outcome = await _digest(params, DIGEST_ITEMS[name], budget())
            more: dict[str, Fact] = {}
        elif name in CIPHER_ITEMS:
            if not params.ca_file:
                facts[f"policy.{name}"] = "n/a"  # no session without a CA to verify against
                continue
            outcome, more = await _data_cipher(params, name, budget())
        else:
            offer = HELLO_ITEMS[name][1]
            outcome, more = _hello_outcome(name, offer, await _hello(params, offer, budget()))
        facts[f"policy.{name}"] = outcome
        facts.update(more)
        (accepted if outcome == "accepted" else errors if outcome == "error" else []).append(name)
    watch.lap("weak")
    if params.post_quantum and budget() > 0:
        pq = _pq_offer()
        outcome, more = _hello_outcome(PQ_ITEM, pq, await _hello(params, pq, budget()))
        facts.update(more)
        facts["post_quantum"] = outcome
        if outcome != "error":
            facts["crypto.tls_pq_group"] = group_name(X25519MLKEM768) if outcome == "accepted" \
                else "none"
            facts["node_pq_key_exchange_accepted"] = int(outcome == "accepted")
        watch.lap("post_quantum")
    if weak := weak_choices_result(
            watch, facts, accepted,
            lambda n: f"{_what(n)}: {facts.get(f'chosen.{n}', DIGEST_ITEMS.get(n, ''))}"):
        return weak
    if errors:
        return watch.result(False, Reason.BAD_RESPONSE if any(
            str(facts.get(f"error.{n}", "")).startswith("bad-") for n in errors)
            else Reason.TIMEOUT, facts=facts,
            detail=f"{len(errors)} offer(s) without a usable answer: "
                   f"{facts.get(f'error.{errors[0]}', errors[0])}")
    return watch.result(True, Reason.OK, facts=facts)


def _what(name: str) -> str:
    if name in HELLO_ITEMS:
        return HELLO_ITEMS[name][0]
    if name in CIPHER_ITEMS:
        return f"data-channel cipher {CIPHER_ITEMS[name]}"
    return f"tls-auth with {DIGEST_ITEMS[name]}"


POLICY = CheckKind("openvpn.policy", Tier.POLICY, OpenVPNPolicyParams, run_policy,
                   "TLS 1.0/1.1, RSA key transport, weak tls-auth digests and the BF-CBC and "
                   "none data ciphers offered one by one, each must be refused; X25519MLKEM768 "
                   "offered and reported")


def plan(ctx: PlanContext) -> list[Planned]:
    """``openvpn.policy_scan: true`` -> ``openvpn.policy`` with the section's wrapping key."""
    section = ctx.target.openvpn
    if section is None or not section.policy_scan:
        return []
    base = plan_params(ctx, section)
    return [Planned.of(POLICY, OpenVPNPolicyParams(
        **msgspec.structs.asdict(base),
        items=tuple(section.policy_items) if section.policy_items is not None
        else DEFAULT_ITEMS))]


# the openvpn section's second family: its kind subclasses the functional probe's session
FAMILY = Family("openvpn", (POLICY,), plan,
                "OpenVPN crypto policy scan (tier policy)")
