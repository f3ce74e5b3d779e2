"""What to run against each node: config :class:`Target` -> list of :class:`PlannedCheck`.

Every family of :mod:`probes.checks.registry` plans its own checks from its config section
(:class:`probes.checks.base.Family`, ``plan(ctx)``): L4 one ``tcp:<port>`` per TCP port, one
``udp:<port>`` per UDP exchange and ``icmp``; a protocol section its protocol's kinds. ``checks:``
on a target filters: an entry matches a check name (``tcp:443``), a kind (``tcp``,
``wireguard.handshake``) or a protocol (``wireguard``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probes.checks import registry
from probes.checks.base import CheckKind, Family, PlanContext
from probes.config import AgentConfig, Target, resolve_path
from probes.model import Tier

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PlannedCheck:
    """One check of one node, as the scheduler runs it."""

    node: str
    pool: str
    pop: str
    region: str
    check: str  # name, unique per node: "tcp:443", "icmp", "wireguard.handshake"
    kind: CheckKind[Any]
    params: Any
    tier: Tier
    min_interval: float = 0.0  # never started sooner after its last start (Planned)
    # the scheduler's key (:func:`check_key`), made once: it is looked up for every probe
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", check_key(self.node, self.check))


def check_key(node: str, check: str) -> str:
    """The scheduler's key of a node's check (what the mesh's re-probe requests name)."""
    return f"{node}/{check}"


def _wanted(target: Target, check: str, kind: str) -> bool:
    if not target.checks:
        return True
    protocol = kind.split(".", 1)[0]
    return any(w in (check, kind, protocol) for w in target.checks)


def plan_target(target: Target, base_dir: Path, state_dir: Path,
                families: tuple[Family, ...] | None = None) -> list[PlannedCheck]:
    """The target's checks, family by family (default: the registry's families the target has
    a section for: only those are loaded)."""
    ctx = PlanContext(target, base_dir, state_dir)
    out: list[PlannedCheck] = []
    for family in registry.families(target) if families is None else families:
        try:
            planned = list(family.plan(ctx))
        except (ValueError, OSError) as exc:  # validated at load: a race with the disk at most
            log.warning("plan: node=%s family=%s skipped: %s", target.id, family.name, exc)
            continue
        out.extend(PlannedCheck(target.id, target.pool, target.pop, target.region, p.check,
                                p.kind, p.params, p.kind.tier, p.min_interval)
                   for p in planned if _wanted(target, p.check, p.kind.name))
    return out


MAX_RELOAD_REMOVAL = 0.5  # share of the running checks a reload may remove without force


def reload_removal_problem(running: list[PlannedCheck], planned: list[PlannedCheck]
                           ) -> str | None:
    """Why a reload from ``running`` to ``planned`` needs force: it would remove more than half
    of the running checks (a typo in a shared ``checks:`` or a half-written file once took
    every check of a target away in silence). None when it may go ahead."""
    keep = {c.key for c in planned}
    removed = [c for c in running if c.key not in keep]
    if not running or len(removed) <= MAX_RELOAD_REMOVAL * len(running):
        return None
    return (f"it would remove {len(removed)} of the {len(running)} running checks (more than "
            f"{MAX_RELOAD_REMOVAL:.0%}; first: {removed[0].key}): refused, the running config "
            "is kept; if that is meant, reload with force (POST /-/reload?force=true)")


def plan(config: AgentConfig, base_dir: Path) -> list[PlannedCheck]:
    """Every check of every target, in config order."""
    state_dir = resolve_path(config.agent.state_dir, base_dir)
    out: list[PlannedCheck] = []
    for target in config.targets:
        out.extend(plan_target(target, base_dir, state_dir))
    return out
