"""``ikev2.policy``: what an IKEv2 responder is willing to accept, not whether it works.

Each deprecated choice of :mod:`probes.protocols.ikev2.policy` is offered alone in its transform
type, one exchange per choice, and must be refused (NO_PROPOSAL_CHOSEN, or an INVALID_KE asking
for a group we did not offer). An accepted one is named, with what the responder chose. Each
accepted offer goes on through IKE_AUTH (the PSK: the scan needs one) and its IKE SA is deleted
at once, like every probe, so the node keeps nothing. Without a PSK each accepted offer would
leave a half-open SA for the responder's half-open timeout (30 s in strongSwan), and a dozen of
them from one address is what strongSwan answers with COOKIEs and then silence: not a scan a
node should pay for.

It also offers a hybrid post-quantum exchange (ML-KEM-768 as an RFC 9370 additional key
exchange) and reports whether the responder takes it: ``crypto.ike_pq_key_exchange`` and the
``node_pq_key_exchange_accepted`` gauge.

Tier ``policy`` (hourly by default): the results feed metrics and alerts, never verdicts.
"""

from __future__ import annotations

import time

import msgspec

from probes.checks.base import (
    CheckKind,
    CheckResult,
    Fact,
    PlanContext,
    Planned,
    Stopwatch,
    weak_choices_result,
)
from probes.model import Reason, Tier
from probes.protocols.ikev2.policy import (
    DEFAULT_ITEMS,
    ITEMS_BY_NAME,
    PQ_ITEM,
    PQ_PROPOSALS,
    WeakItem,
)

# the answers that say "no" to an offer; every other failure is the scan's, not the policy's
_REFUSALS = frozenset({Reason.NO_PROPOSAL_CHOSEN, Reason.INVALID_KE, Reason.CHILD_SA_FAILED})
ITEM_TIMEOUT_SECONDS = 5.0


class Ikev2PolicyParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str
    port: int = 500
    nat_t_port: int = 4500
    psk_file: str  # each accepted IKE SA is finished (IKE_AUTH), then deleted
    local_id: str = "tunnelwatch-probe"
    remote_id: str | None = None
    ca_file: str | None = None  # a responder that authenticates with a certificate
    items: tuple[str, ...] = DEFAULT_ITEMS  # the deprecated choices to offer
    post_quantum: bool = True  # also offer ML-KEM-768 (reported, never a failure)


def _item_facts(name: str, result: CheckResult) -> tuple[str, dict[str, Fact]]:
    """(outcome, facts) of one offer: "accepted", "refused" or "error"."""
    if result.ok:
        chosen = result.facts.get("proposal", "")
        esp = result.facts.get("crypto.esp_transform")
        return "accepted", {f"chosen.{name}": f"{chosen} / {esp}" if esp else chosen}
    if result.reason in _REFUSALS:
        return "refused", {}
    return "error", {f"error.{name}": f"{result.reason.value}: {result.detail}"[:200]}


async def _offer(params: Ikev2PolicyParams, proposals: tuple[str, ...], esp: str | None,
                 timeout: float, *, create_child: bool = False) -> CheckResult:
    # run_level is the functional probe's session (half-open limiter, Delete, cleanup); the
    # import is here because that module declares the ikev2 family, which lists this kind
    from probes.checks.ikev2 import Ikev2Params, run_level  # noqa: PLC0415 - a cycle

    offer = Ikev2Params(host=params.host, port=params.port, nat_t_port=params.nat_t_port,
                        proposals=proposals, psk_file=params.psk_file,
                        local_id=params.local_id, remote_id=params.remote_id,
                        ca_file=params.ca_file, esp_proposal=esp or "aes256gcm16")
    level = "create_child" if create_child else "child" if esp else "auth"
    return await run_level(offer, timeout, level)


async def run_policy(params: Ikev2PolicyParams, timeout: float) -> CheckResult:
    watch = Stopwatch()
    deadline = time.monotonic() + timeout
    facts: dict[str, Fact] = {"post_quantum": "n/a"}
    accepted: list[str] = []
    errors: list[tuple[str, CheckResult]] = []
    unknown = [name for name in params.items if name not in ITEMS_BY_NAME]
    if unknown:
        return watch.result(False, Reason.PROBE_ERROR, detail=f"unknown items: {unknown}")
    items: list[WeakItem] = [ITEMS_BY_NAME[name] for name in params.items]
    for item in items:
        left = deadline - time.monotonic()
        if left <= 0:
            errors.append((item.name, watch.result(False, Reason.TIMEOUT, detail="no time left")))
            continue
        result = await _offer(params, item.ike, item.esp, min(ITEM_TIMEOUT_SECONDS, left),
                              create_child=item.create_child)
        outcome, more = _item_facts(item.name, result)
        facts[f"policy.{item.name}"] = outcome
        facts.update(more)
        if outcome == "accepted":
            accepted.append(item.name)
        elif outcome == "error":
            errors.append((item.name, result))
    watch.lap("weak")
    if params.post_quantum and deadline > time.monotonic():
        result = await _offer(params, PQ_PROPOSALS, None,
                              min(ITEM_TIMEOUT_SECONDS, deadline - time.monotonic()))
        facts.update(_pq_facts(result))
        watch.lap("post_quantum")
    if weak := weak_choices_result(
            watch, facts, accepted,
            lambda n: f"{ITEMS_BY_NAME[n].what}: {facts.get(f'chosen.{n}', '')}"):
        return weak
    if errors:
        name, first = errors[0]
        return watch.result(False, first.reason, facts=facts,
                            detail=f"{len(errors)} offer(s) unanswered; {name}: {first.detail}")
    return watch.result(True, Reason.OK, facts=facts)


def _pq_facts(result: CheckResult) -> dict[str, Fact]:
    """Whether the responder took the hybrid ML-KEM offer. It accepts it only by choosing it
    (SA_INIT answered with the additional key exchange in the proposal); the probe then stops,
    as it does not run IKE_INTERMEDIATE."""
    chosen = result.facts.get("crypto.ike_pq_key_exchange")
    if chosen not in (None, "none"):
        return {"post_quantum": "accepted", "crypto.ike_pq_key_exchange": str(chosen),
                f"policy_pq.{PQ_ITEM}": "accepted", "node_pq_key_exchange_accepted": 1}
    if result.reason in _REFUSALS or chosen == "none":
        # refused, or answered with a classical proposal (the additional exchange dropped)
        return {"post_quantum": "refused", "crypto.ike_pq_key_exchange": "none",
                f"policy_pq.{PQ_ITEM}": "refused", "node_pq_key_exchange_accepted": 0}
    return {"post_quantum": "error", f"error.{PQ_ITEM}": f"{result.reason.value}: "
            f"{result.detail}"[:200]}


POLICY = CheckKind("ikev2.policy", Tier.POLICY, Ikev2PolicyParams, run_policy,
                   "deprecated IKE/ESP proposals offered one by one, each must be refused; "
                   "hybrid ML-KEM offered and reported")


def plan_policy(ctx: PlanContext) -> list[Planned]:
    """``ikev2.policy_scan: true`` -> ``ikev2.policy`` with the section's identity and PSK."""
    section = ctx.target.ikev2
    if section is None or not section.policy_scan or section.psk_file is None:
        return []  # without a PSK: refused by the config check (ikev2_problems)
    return [Planned.of(POLICY, Ikev2PolicyParams(
        host=ctx.target.address, port=section.port, psk_file=ctx.path(section.psk_file),
        local_id=section.local_id or "tunnelwatch-probe", remote_id=section.remote_id,
        ca_file=ctx.path(section.ca_file),
        items=tuple(section.policy_items) if section.policy_items is not None
        else DEFAULT_ITEMS))]
