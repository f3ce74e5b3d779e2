"""PoP verdicts for anycast: node verdicts and anycast probes in, announce/drain/withdraw out.

Pure and deterministic, like the node engine: every input takes an explicit ``now``.

Theory of operation
-------------------
An anycast PoP announces the same prefixes as every other PoP. What it should announce follows
from two signals:

* the verdicts of its VPN nodes (already debounced, voted and guarded by the node engine);
* the verdicts of *anycast checks*: pseudo-nodes whose role is ``anycast``, probed by external
  vantages through the anycast address itself, which catch "all green inside, unreachable from
  outside".

Raw PoP health at an instant:

* ``DOWN`` — no usable node (UP or DEGRADED), or its anycast checks say DOWN;
* ``DEGRADED`` — fewer than ``degraded_below_share`` of its nodes are UP, or an anycast check
  says DEGRADED;
* ``UP`` — otherwise.

Raw health becomes the PoP state through hysteresis in time (a worse state must hold for
``down_after_seconds``, a better one for ``up_after_seconds`` before it is acted on), RFC 2439
flap damping (each withdrawal adds a penalty; above ``suppress`` the PoP stays withdrawn until
the penalty decays below ``reuse``), and the fleet-wide guard: never more than
``max_withdrawn`` PoPs (and never more than ``max_withdrawn_share`` of them) withdrawn at once.
A withdrawal beyond the guard is *held*: the PoP stays announced (soft-drained), the hold is
reported in every change and counted, and it is applied as soon as the guard allows.

Operators can pin a PoP ``announced`` or ``withdrawn``; pins win over probes and are audited.
A pinned withdrawal still respects the guard unless forced.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from probes.mesh.policy import DampingPolicy
from probes.model import VerdictState


class PopState(enum.StrEnum):
    ANNOUNCED = "ANNOUNCED"  # healthy: announce with the normal attributes
    DRAINED = "DRAINED"  # degraded: still announced, less preferred (higher MED / prepends)
    WITHDRAWN = "WITHDRAWN"


class Pin(enum.StrEnum):
    ANNOUNCED = "announced"
    WITHDRAWN = "withdrawn"


_RANK = {PopState.ANNOUNCED: 0, PopState.DRAINED: 1, PopState.WITHDRAWN: 2}
USABLE = frozenset({VerdictState.UP, VerdictState.DEGRADED})


class PopPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The ``anycast:`` policy section."""

    degraded_below_share: float = 1.0  # UP share of nodes under which the PoP soft-drains
    down_after_seconds: float = 0.0  # node verdicts are already debounced: act at once
    up_after_seconds: float = 10.0  # a recovered PoP must stay healthy this long
    max_withdrawn: int = 1
    max_withdrawn_share: float = 0.5
    damping: DampingPolicy = msgspec.field(
        default_factory=lambda: DampingPolicy(penalty=1000.0, half_life_seconds=300.0,
                                              suppress=2500.0, reuse=800.0,
                                              max_hold_seconds=1800.0))

    def allowed_withdrawn(self, pops: int) -> int:
        return max(0, min(self.max_withdrawn, math.floor(self.max_withdrawn_share * pops)))


class PopChange(msgspec.Struct, frozen=True, omit_defaults=True):
    """A change of what one PoP announces, with why."""

    pop: str
    state: PopState
    previous: PopState
    at: float
    reasons: list[str] = msgspec.field(default_factory=list)
    held_by_guard: bool = False  # the wanted state was WITHDRAWN but the guard kept it announced
    pinned: bool = False


@dataclass
class _Pop:
    name: str
    nodes: dict[str, VerdictState] = field(default_factory=dict)
    anycast: dict[str, VerdictState] = field(default_factory=dict)
    state: PopState = PopState.ANNOUNCED
    wanted: PopState = PopState.ANNOUNCED  # after hysteresis and damping, before the guard
    raw: PopState = PopState.ANNOUNCED
    raw_since: float = 0.0
    penalty: float = 0.0
    penalty_at: float = 0.0
    suppressed_until: float = 0.0
    held: bool = False
    pin: Pin | None = None
    pin_forced: bool = False
    raw_reasons: list[str] = field(default_factory=list)


class PopEngine:
    """PoP states from node and anycast-check verdicts. ``pops`` maps node id -> (pop, role)."""

    def __init__(self, policy: PopPolicy, members: Iterable[tuple[str, str, str]]) -> None:
        self.policy = policy
        self._pops: dict[str, _Pop] = {}
        self._member: dict[str, tuple[_Pop, str]] = {}
        self.guard_holds_total = 0
        self.audit: list[dict[str, object]] = []
        for node, pop, role in members:
            p = self._pops.setdefault(pop, _Pop(pop))
            if role == "anycast":
                p.anycast[node] = VerdictState.UNKNOWN
            else:
                p.nodes[node] = VerdictState.UNKNOWN
            self._member[node] = (p, role)

    # ------------------------------------------------------------------ inputs

    def on_verdict(self, node: str, state: VerdictState, now: float) -> list[PopChange]:
        member = self._member.get(node)
        if member is None:
            return []
        pop, role = member
        (pop.anycast if role == "anycast" else pop.nodes)[node] = state
        self._update_raw(pop, now)
        return self._settle(now)

    def tick(self, now: float) -> list[PopChange]:
        return self._settle(now)

    def pin(self, pop: str, pin: Pin | None, now: float, *, who: str, note: str = "",
            force: bool = False) -> list[PopChange]:
        p = self._pops[pop]
        previous = p.pin.value if p.pin else None
        self.audit.append({"at": now, "pop": pop, "pin": pin.value if pin else None, "who": who,
                           "note": note, "force": force, "previous": previous})
        p.pin, p.pin_forced = pin, force and pin is Pin.WITHDRAWN
        return self._settle(now)

    def restore_pins(self, pins: dict[str, tuple[Pin, bool]]) -> None:
        """Pins saved before a restart (no audit entry: they were audited when set)."""
        for pop, (pin, force) in pins.items():
            if pop in self._pops:
                self._pops[pop].pin = pin
                self._pops[pop].pin_forced = force and pin is Pin.WITHDRAWN

    def pins(self) -> dict[str, tuple[Pin, bool]]:
        return {name: (p.pin, p.pin_forced) for name, p in self._pops.items()
                if p.pin is not None}

    # ------------------------------------------------------------------ views

    def state(self, pop: str) -> PopState:
        return self._pops[pop].state

    def states(self) -> dict[str, PopState]:
        return {name: p.state for name, p in self._pops.items()}

    def view(self, pop: str, now: float) -> dict[str, object]:
        p = self._pops[pop]
        return {"pop": pop, "state": p.state.value, "wanted": p.wanted.value, "raw": p.raw.value,
                "held_by_guard": p.held, "pin": p.pin.value if p.pin else None,
                "suppressed": now < p.suppressed_until,
                "penalty": round(self._decayed(p, now), 1),
                "nodes": {n: s.value for n, s in p.nodes.items()},
                "anycast": {n: s.value for n, s in p.anycast.items()},
                "reasons": list(p.raw_reasons)}

    # ------------------------------------------------------------------ internals

    def _update_raw(self, p: _Pop, now: float) -> None:
        reasons: list[str] = []
        # UNKNOWN means "no evidence yet": it neither drains nor withdraws a PoP
        nodes = [s for s in p.nodes.values() if s is not VerdictState.UNKNOWN]
        checks = [s for s in p.anycast.values() if s is not VerdictState.UNKNOWN]
        usable = sum(1 for s in nodes if s in USABLE)
        up = sum(1 for s in nodes if s is VerdictState.UP)
        anycast_down = 2 * sum(1 for s in checks if s is VerdictState.DOWN) > len(checks) > 0
        if not nodes and not checks:
            raw = p.wanted
        elif nodes and usable == 0:
            raw = PopState.WITHDRAWN
            reasons.append(f"no usable node (0 of {len(nodes)} UP or DEGRADED)")
        elif anycast_down:
            raw = PopState.WITHDRAWN
            reasons.append("anycast checks see the PoP DOWN from most vantages")
        elif nodes and up < self.policy.degraded_below_share * len(nodes):
            raw = PopState.DRAINED
            reasons.append(f"{up} of {len(nodes)} nodes UP (drain below "
                           f"{self.policy.degraded_below_share:.0%})")
        elif any(s is VerdictState.DEGRADED for s in checks):
            raw = PopState.DRAINED
            reasons.append("an anycast check sees the PoP DEGRADED")
        else:
            raw = PopState.ANNOUNCED
        if raw is not p.raw:
            p.raw, p.raw_since = raw, now
        p.raw_reasons = reasons

    def adopt(self, pop: str, state: PopState, now: float) -> None:
        """Start from what the speaker announces now (after a restart), so nothing flaps."""
        p = self._pops[pop]
        p.state = p.wanted = p.raw = state
        p.raw_since = now

    def _decayed(self, p: _Pop, now: float) -> float:
        d = self.policy.damping
        return float(p.penalty * 2.0 ** (-(now - p.penalty_at) / d.half_life_seconds))

    def _add_penalty(self, p: _Pop, now: float) -> None:
        d = self.policy.damping
        if not d.enabled:
            return
        p.penalty = self._decayed(p, now) + d.penalty
        p.penalty_at = now
        if p.penalty > d.suppress:
            release = now + d.half_life_seconds * math.log2(p.penalty / d.reuse)
            p.suppressed_until = min(release, now + d.max_hold_seconds)

    def _wanted(self, p: _Pop, now: float) -> PopState:
        """Hysteresis and damping applied to the raw state (guard not yet)."""
        if p.pin is Pin.ANNOUNCED:
            return PopState.ANNOUNCED
        if p.pin is Pin.WITHDRAWN:
            return PopState.WITHDRAWN
        current = p.wanted
        if now < p.suppressed_until and current is PopState.WITHDRAWN:
            return PopState.WITHDRAWN  # damped: stays withdrawn until the penalty decays
        held_for = now - p.raw_since
        if _RANK[p.raw] > _RANK[current]:
            return p.raw if held_for >= self.policy.down_after_seconds else current
        if _RANK[p.raw] < _RANK[current]:
            return p.raw if held_for >= self.policy.up_after_seconds else current
        return current

    def _settle(self, now: float) -> list[PopChange]:
        for p in self._pops.values():
            wanted = self._wanted(p, now)
            newly_down = wanted is PopState.WITHDRAWN and p.wanted is not PopState.WITHDRAWN
            if newly_down and p.pin is None:
                self._add_penalty(p, now)
            p.wanted = wanted
        allowed = self.policy.allowed_withdrawn(len(self._pops))
        withdrawn = sum(1 for p in self._pops.values() if p.state is PopState.WITHDRAWN)
        changes: list[PopChange] = []
        # recoveries first, so a slot freed in this step can be used by a withdrawal
        ordered = sorted(self._pops.values(), key=lambda q: (_RANK[q.wanted], q.name))
        for p in ordered:
            target = p.wanted
            held = False
            if target is PopState.WITHDRAWN and p.state is not PopState.WITHDRAWN:
                if withdrawn >= allowed and not p.pin_forced:
                    target, held = PopState.DRAINED, True
                else:
                    withdrawn += 1
            elif p.state is PopState.WITHDRAWN and target is not PopState.WITHDRAWN:
                withdrawn -= 1
            if held and not p.held:
                self.guard_holds_total += 1
            newly_held = held != p.held
            p.held = held
            if target is not p.state or newly_held:
                reasons = list(p.raw_reasons)
                if held:
                    reasons.append(f"guard: {withdrawn} of {len(self._pops)} PoPs withdrawn "
                                   f"already (at most {allowed})")
                if p.pin is not None:
                    reasons.append(f"pinned {p.pin.value} by an operator")
                if now < p.suppressed_until and target is PopState.WITHDRAWN:
                    reasons.append("flap damping: suppressed")
                changes.append(PopChange(pop=p.name, state=target, previous=p.state, at=now,
                                         reasons=reasons, held_by_guard=held,
                                         pinned=p.pin is not None))
                p.state = target
        return changes

    def next_timer(self, now: float) -> float | None:
        """When ``tick`` next has something to do (hysteresis or damping expiry), if ever."""
        times: list[float] = []
        for p in self._pops.values():
            if p.raw is not p.wanted:
                delay = (self.policy.down_after_seconds if _RANK[p.raw] > _RANK[p.wanted]
                         else self.policy.up_after_seconds)
                times.append(p.raw_since + delay)
            if p.suppressed_until > now:
                times.append(p.suppressed_until)
        future = [t for t in times if t > now]
        return min(future) if future else None
