"""Reading the engine's state: the evidence behind a verdict, and the per-node picture for the API.

Evidence is built only when a verdict changes (rarely), so it may be thorough: the vote with its
threshold, then per voting vantage every check that is down (``check-down``; ``tier-cascade`` when
an L4 check of the same vantage is up: "alive but useless"), damped (``flap-damping``) or past a
quality bound (``quality-bound`` with the figure and the bound).
"""

from __future__ import annotations

from typing import Any

import msgspec

from probes.mesh.policy import DecisionPolicy
from probes.mesh.state import (
    CHECK_DOWN,
    CHECK_STATE_NAMES,
    CHECK_UP,
    OPINION_NAMES,
    CheckState,
    NodeState,
    NodeVantage,
)
from probes.model import Tier, VerdictReason


def evidence(policy: DecisionPolicy, node: NodeState, now: float) -> list[VerdictReason]:
    """Why the node is where it is: the vote, the checks behind it, the bounds crossed."""
    votes = node.votes
    voters = votes.up + votes.degraded + votes.down
    out: list[VerdictReason] = []
    if node.quorum_lost:
        out.append(
            VerdictReason(
                what="quorum-lost",
                value=float(voters),
                bound=float(policy.quorum.min_voters),
                note=f"{voters} voters, {votes.excluded_stale} stale, "
                f"{votes.excluded_impaired} impaired: keeping {node.probe_state.value}",
            )
        )
    else:
        share = votes.down / voters if voters else 0.0
        quorum = policy.quorum
        bound = 0.5 if quorum.mode == "majority" else 1 - quorum.healthy_percent / 100
        out.append(
            VerdictReason(
                what="vote",
                value=round(share, 6),
                bound=round(bound, 6),
                note=f"{policy.quorum.mode}: {votes.up} up, {votes.degraded} degraded, "
                f"{votes.down} down, {votes.excluded_stale} stale, "
                f"{votes.excluded_impaired} impaired",
            )
        )
    if node.guard_hold:
        pool = node.pool
        out.append(
            VerdictReason(
                what="pool-guard",
                value=float(pool.down),
                bound=float(pool.allowed_down(policy.pool_guard.max_down_share)),
                note=f"pool {pool.name} at its down limit: holding {node.probe_state.value}",
            )
        )
    stale = policy.stale_after_seconds
    for vantage_name, nv in node.nvs.items():
        if now - nv.seen > stale or nv.vantage.impaired:
            continue
        out.extend(_check_evidence(policy, vantage_name, nv, now))
    return out


def _check_evidence(
    policy: DecisionPolicy, vantage: str, nv: NodeVantage, now: float
) -> list[VerdictReason]:
    out: list[VerdictReason] = []
    l4_up = any(c.tier == Tier.L4 and c.effective(now) == CHECK_UP for c in nv.checks)
    for check in nv.checks:
        effective = check.effective(now)
        if effective == CHECK_DOWN:
            if now < check.suppressed_until:
                out.append(
                    VerdictReason(
                        what="flap-damping",
                        vantage=vantage,
                        check=check.name,
                        value=round(check.penalty, 3),
                        bound=policy.damping.suppress,
                        note=f"held down until {check.suppressed_until:.3f}",
                    )
                )
            if check.state != CHECK_DOWN:
                continue
            if check.tier != Tier.L4 and l4_up:
                out.append(
                    VerdictReason(
                        what="tier-cascade",
                        vantage=vantage,
                        check=check.name,
                        reason=check.reason.value,
                        note=f"alive but useless: L4 up, {check.tier.value} check failing",
                    )
                )
            else:
                out.append(
                    VerdictReason(
                        what="check-down",
                        vantage=vantage,
                        check=check.name,
                        reason=check.reason.value,
                        note=f"{check.tier.value} check down",
                    )
                )
        elif effective == CHECK_UP and check.breach:
            out.extend(_quality_evidence(policy, vantage, check))
    return out


def _quality_evidence(
    policy: DecisionPolicy, vantage: str, check: CheckState
) -> list[VerdictReason]:
    bounds = policy.quality
    out: list[VerdictReason] = []
    if check.loss is not None and check.loss > bounds.max_loss_ratio:
        out.append(
            VerdictReason(
                what="quality-bound",
                vantage=vantage,
                check=check.name,
                reason="loss",
                value=check.loss,
                bound=bounds.max_loss_ratio,
            )
        )
    if check.p99 is not None and check.p99 > bounds.max_rtt_p99_seconds:
        out.append(
            VerdictReason(
                what="quality-bound",
                vantage=vantage,
                check=check.name,
                reason="rtt-p99",
                value=check.p99,
                bound=bounds.max_rtt_p99_seconds,
            )
        )
    if not out:
        out.append(
            VerdictReason(
                what="quality-bound",
                vantage=vantage,
                check=check.name,
                reason=check.reason.value,
                note="agent reported a quality failure",
            )
        )
    return out


def node_view(policy: DecisionPolicy, node: NodeState, now: float) -> dict[str, Any]:
    """The per-vantage picture of one node, as plain data for the API and the status table."""
    node_id = node.info.node
    stale = policy.stale_after_seconds
    half_life = policy.damping.half_life_seconds
    vantages: dict[str, Any] = {}
    for name, nv in node.nvs.items():
        vantages[name] = {
            "opinion": OPINION_NAMES[nv.opinion],
            "stale": now - nv.seen > stale,
            "impaired": nv.vantage.impaired,
            # its peers' fresh evidence contradicts it (impaired once that has held long enough)
            "contradicted": nv.vantage.contradicted,
            "seen": nv.seen,
            "checks": {
                c.name: {
                    "kind": c.kind,
                    "tier": c.tier.value,
                    "state": CHECK_STATE_NAMES[c.state],
                    "effective": CHECK_STATE_NAMES[c.effective(now)],
                    "reason": c.reason.value,
                    "quality_breach": c.breach,
                    "loss_ratio": c.loss,
                    "rtt_p99_seconds": c.p99,
                    "damping_penalty": round(
                        c.penalty * 2.0 ** (-(now - c.penalty_at) / half_life), 3
                    ),
                    "suppressed_until": (c.suppressed_until if now < c.suppressed_until else None),
                    "seen": c.seen,
                }
                for c in nv.checks
            },
        }
    return {
        "node": node_id,
        "pool": node.info.pool,
        "pop": node.info.pop,
        "region": node.info.region,
        "state": node.state.value,
        "probe_state": node.probe_state.value,
        "admin": node.admin.value if node.admin is not None else None,
        "seq": node.seq,
        "quorum_lost": node.quorum_lost,
        "guard_hold": node.guard_hold,
        "votes": msgspec.to_builtins(node.votes),
        "last_verdict": msgspec.to_builtins(node.last) if node.last is not None else None,
        "vantages": vantages,
    }
