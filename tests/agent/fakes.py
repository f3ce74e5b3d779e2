"""Fake check kinds and plans for scheduler tests (no sockets)."""

from __future__ import annotations

from probes.agent.plan import PlannedCheck
from probes.checks.base import CheckKind, CheckResult
from probes.model import Reason, Tier


async def _never(params: object, timeout: float) -> CheckResult:
    return CheckResult(True, Reason.OK, 0.0)


KINDS = {
    Tier.L4: CheckKind("tcp", Tier.L4, object, _never),
    Tier.FUNCTIONAL: CheckKind("fake.handshake", Tier.FUNCTIONAL, object, _never),
    Tier.SESSION: CheckKind("fake.session", Tier.SESSION, object, _never),
    Tier.TELEMETRY: CheckKind("telemetry.fake", Tier.TELEMETRY, object, _never),
}


def planned(node: str, tier: Tier, name: str | None = None) -> PlannedCheck:
    kind = KINDS[tier]
    return PlannedCheck(node=node, pool="pool-a", pop="pop-1", region="eu", check=name or kind.name,
                        kind=kind, params=None, tier=tier)


def fleet(n: int, tiers: tuple[Tier, ...] = (Tier.L4, Tier.FUNCTIONAL, Tier.SESSION)) -> list[
        PlannedCheck]:
    return [planned(f"node-{i}", tier) for i in range(n) for tier in tiers]
