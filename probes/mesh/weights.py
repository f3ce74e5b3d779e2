"""The weight engine: node load and node states in, published node weights out. Pure and
replayable, like the decision engine beside it.

Theory of operation
-------------------
Three inputs, each with an explicit ``now``; no I/O, no clock, no randomness, so the same calls
give the same weights bit for bit (``tunnelwatch mesh replay --weights`` and the recorded-trace
test rely on it):

* :meth:`WeightEngine.load` — load samples read on nodes (:class:`probes.model.NodeLoad`);
* :meth:`WeightEngine.set_state` — a node's published verdict state changed (UP, DEGRADED, DOWN,
  DRAINING, MAINTENANCE);
* :meth:`WeightEngine.tick` — time passed: at most once per ``step_seconds`` every weight is
  recomputed.

A weight is a percent of the node's nominal weight (what its balancer is configured with). Per
step and node:

1. **Smoothing.** Each load signal is an EWMA over irregular samples: a sample pulls the average
   by ``1 - 2^(-dt / half_life)`` of the way, ``dt`` being the time since the node's previous
   sample. Load older than ``load_stale_after_seconds`` lapses: no evidence, no cut.
2. **Step table.** Each signal's table gives a cut: the deepest step its value reached (a step is
   left only once the value fell ``step_hysteresis`` below it), or in a proportional table the
   cut interpolated between its steps. Relative tables compare the node's figure per unit of
   capacity with its pool's mean, and their cuts are taken relative to the pool's least-cut
   serving node (a preference between peers: the coldest keeps its full weight). The deepest cut
   of all tables decides; the result is never below ``floor_percent``: load alone never takes a
   node out.
3. **Caps from the state.** UP 100, DEGRADED ``degraded_cap_percent``, DOWN / DRAINING /
   MAINTENANCE 0; a node back from one of the last three ramps from
   ``slow_start_initial_percent`` to its cap over ``slow_start_seconds``.
4. **Pool guard.** If the available nodes' load-cut weights (x capacity) sum to less than
   ``guard_share`` of their caps (x capacity), every load-cut weight is scaled up by one factor
   until they do (each still under its cap): ratios between nodes are kept, none is zeroed.
5. **Rate limit.** Load and slow start move a weight by at most ``max_step_percent`` per step;
   caps apply at once (a DOWN node leaves now).
6. **Dead band.** The published (integer) weight changes only when the new one is
   ``dead_band_percent`` away from it, or reaches 0, its cap, or crosses back from 0.

Every published weight carries its evidence: the signals that cut it (smoothed value, step,
cut) and the rules that shaped it.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from probes.mesh.weight_policy import SignalSteps, WeightPolicy
from probes.model import NodeLoad, Observation, Verdict, VerdictState, WeightChange, WeightReason

__all__ = ["NodeWeight", "WeightEngine", "WeightNode", "follow", "signals_of", "split_load"]

FULL = 100.0
_ZERO_STATES = frozenset({VerdictState.DOWN, VerdictState.DRAINING, VerdictState.MAINTENANCE})
_SERVING = frozenset({VerdictState.UP, VerdictState.DEGRADED})
_ROUND = 6  # digits of the figures in the evidence: stable text, no float noise


class WeightNode(msgspec.Struct, frozen=True):
    """A node as the weight engine sees it: its pool and its capacity (1.0 = a typical node;
    relative signals are compared per unit of capacity, the guard counts capacity)."""

    node: str
    pool: str
    capacity: float = 1.0


_load_of = operator.attrgetter("load")  # a NodeLoad is always true, None false


def split_load(
    observations: Sequence[Observation],
) -> tuple[Sequence[Observation], list[tuple[str, NodeLoad]]]:
    """Check results for the decision engine, load reads for the weight engine: a load read is
    never evidence of a node's health (its absence says nothing about the service)."""
    if not any(map(_load_of, observations)):  # at C speed: load reads are rare in a batch
        return observations, []
    loads = [(o.node, o.load) for o in observations if o.load is not None]
    return [o for o in observations if o.load is None], loads


def follow(weights: WeightEngine, loads: Sequence[tuple[str, NodeLoad]],
           verdicts: Sequence[Verdict], now: float, ticked: bool) -> list[WeightChange]:
    """One mesh input's effect on the weights, in the one order the mesh, its restart replay and
    ``mesh replay`` all use: the input's load reads, then the verdict states it changed, then
    (a tick) the weights' step."""
    if loads:
        weights.load(loads, now)
    changes: list[WeightChange] = []
    for verdict in verdicts:
        changes += weights.set_state(verdict.node, verdict.state, now)
    if ticked:
        changes += weights.tick(now)
    return changes


def signals_of(sample: NodeLoad) -> dict[str, float]:
    """The step-table signals one load sample gives (absent figures are left out)."""
    out: dict[str, float] = {}
    if sample.cpu_busy_ratio is not None:
        out["cpu"] = sample.cpu_busy_ratio
    drops = sample.drops_per_second
    seen = sample.packets_per_second + drops
    out["drops"] = drops / seen if seen > 0 else 0.0
    if sample.effective_sessions is not None:
        out["effective_sessions"] = sample.effective_sessions
    if sample.active_sessions is not None:
        out["sessions"] = float(sample.active_sessions)
    out["packets"] = sample.packets_per_second
    out["bytes"] = sample.bytes_per_second
    return out


class NodeWeight:
    """Per-node state of the weight engine."""

    __slots__ = ("cap", "capacity", "effective", "ewma", "last", "limit", "load_at",
                 "load_reasons", "load_target", "node", "pool", "published", "reasons", "seq",
                 "sessions", "slow_start_at", "state", "steps", "target", "weight")

    def __init__(self, info: WeightNode) -> None:
        self.node = info.node
        self.pool = info.pool
        self.capacity = info.capacity
        self.state = VerdictState.UNKNOWN
        self.ewma: dict[str, float] = {}
        self.load_at = -math.inf  # when the last load sample arrived
        self.sessions: int | None = None  # last raw active sessions
        self.effective: float | None = None  # last raw effective sessions (a drain follows it)
        self.steps: dict[int, int] = {}  # table index -> step index reached (hysteresis)
        self.load_target = FULL  # what load allows, as of the last step (floored)
        self.load_reasons: list[WeightReason] = []  # the signals that cut it
        self.weight: float | None = None  # the internal, rate-limited weight (percent)
        self.target = 0.0  # what the weight moves towards
        self.cap = 0.0  # the state's cap (percent)
        self.limit = 0.0  # the cap with slow start's ramp
        self.published: int | None = None
        self.seq = 0
        self.slow_start_at: float | None = None
        self.reasons: list[WeightReason] = []  # evidence of the last computation
        self.last: WeightChange | None = None  # the last published change (reconcile sends it)

    def load_fresh(self, now: float, stale_after: float) -> bool:
        return now - self.load_at <= stale_after


_NODE_FIELDS = ("state", "ewma", "load_at", "sessions", "effective", "steps", "load_target",
                "weight", "target", "cap", "limit", "published", "seq", "slow_start_at")


class WeightEngine:
    """The engine state plus the three inputs. See the module docstring."""

    def __init__(self, policy: WeightPolicy, nodes: Iterable[WeightNode]) -> None:
        self.policy = policy
        self.nodes: dict[str, NodeWeight] = {}
        self.pools: dict[str, list[NodeWeight]] = {}
        self.guard_scale: dict[str, float] = {}  # pool -> last guard factor (1.0 = not holding)
        self.last_step = -math.inf
        self.changes_total = 0
        self.guard_steps_total = 0  # steps in which a pool's guard scaled its weights
        for info in nodes:
            self._add(info)

    def _add(self, info: WeightNode) -> None:
        if info.node in self.nodes:
            raise ValueError(f"node {info.node!r} registered twice")
        node = self.nodes[info.node] = NodeWeight(info)
        self.pools.setdefault(info.pool, []).append(node)

    def reconfigure(self, policy: WeightPolicy, nodes: Iterable[WeightNode]) -> None:
        """Apply a config change between inputs: nodes kept keep their state."""
        old = self.nodes
        self.policy = policy
        self.nodes = {}
        self.pools = {}
        for info in nodes:
            self._add(info)
            kept = old.get(info.node)
            if kept is not None:
                _copy_state(kept, self.nodes[info.node])
        self.guard_scale = {p: s for p, s in self.guard_scale.items() if p in self.pools}

    # ---- inputs -----------------------------------------------------------------------------

    def load(self, samples: Sequence[tuple[str, NodeLoad]], now: float) -> int:
        """Fold load samples of known nodes into their averages; returns how many were used."""
        used = 0
        half_life = self.policy.half_life_seconds
        stale = self.policy.load_stale_after_seconds
        for node_id, sample in samples:
            node = self.nodes.get(node_id)
            if node is None:
                continue
            used += 1
            values = signals_of(sample)
            if not node.load_fresh(now, stale):
                node.ewma = values  # after a gap the old average is no evidence: start again
            else:
                pull = 1.0 - 2.0 ** (-max(0.0, now - node.load_at) / half_life)
                ewma = node.ewma
                for name, value in values.items():
                    old = ewma.get(name)
                    ewma[name] = value if old is None else old + pull * (value - old)
            node.load_at = now
            if sample.active_sessions is not None:
                node.sessions = sample.active_sessions
            if sample.effective_sessions is not None:
                node.effective = sample.effective_sessions
        return used

    def set_state(self, node_id: str, state: VerdictState, now: float) -> list[WeightChange]:
        """A node's published state changed; caps apply at once. Unknown nodes are ignored."""
        node = self.nodes.get(node_id)
        if node is None or state == node.state:
            return []
        previous = node.state
        node.state = state
        if state in _SERVING and previous in _ZERO_STATES and self.policy.slow_start_seconds > 0:
            node.slow_start_at = now
        elif state not in _SERVING:
            node.slow_start_at = None
        changes: list[WeightChange] = []
        self._compute(node, now, self.guard_scale.get(node.pool, 1.0), changes)
        return changes

    def tick(self, now: float) -> list[WeightChange]:
        """Recompute every weight, at most once per ``step_seconds``."""
        if now - self.last_step < self.policy.step_seconds:
            return []
        self.last_step = now
        changes: list[WeightChange] = []
        for pool, members in self.pools.items():
            self._step_pool(pool, members, now, changes)
        return changes

    # ---- the rules --------------------------------------------------------------------------

    def _caps(self, node: NodeWeight, now: float) -> tuple[float, float, list[WeightReason]]:
        """(the state's cap, the cap with slow start's ramp, why) in percent."""
        policy = self.policy
        state = node.state
        if state in _ZERO_STATES:
            return 0.0, 0.0, [WeightReason("state", note=state.value)]
        cap = FULL
        reasons: list[WeightReason] = []
        if state == VerdictState.DEGRADED:
            cap = policy.degraded_cap_percent
            reasons.append(WeightReason("degraded-cap", bound=cap))
        limit = cap
        if node.slow_start_at is not None:
            elapsed = now - node.slow_start_at
            if elapsed >= policy.slow_start_seconds:
                node.slow_start_at = None
            else:
                initial = policy.slow_start_initial_percent
                ramp = initial + (FULL - initial) * elapsed / policy.slow_start_seconds
                if ramp < cap:
                    limit = ramp
                    reasons.append(WeightReason("slow-start", value=_r(elapsed),
                                                bound=policy.slow_start_seconds))
        return cap, limit, reasons

    def _compared(self, node: NodeWeight, signal: str, now: float) -> float | None:
        """A node's figure for a relative table, if it takes part in the comparison (serving,
        with fresh load)."""
        if node.state not in _SERVING or not node.load_fresh(now,
                                                             self.policy.load_stale_after_seconds):
            return None
        return node.ewma.get(signal)

    def _relative_means(self, members: list[NodeWeight], now: float) -> dict[int, float]:
        """Per relative table: the pool's mean figure per unit of capacity, over serving nodes
        with fresh load (at least two of them, else there is nothing to compare with)."""
        means: dict[int, float] = {}
        for index, table in enumerate(self.policy.steps):
            if not table.relative:
                continue
            total = capacity = 0.0
            count = 0
            for node in members:
                value = self._compared(node, table.signal, now)
                if value is None:
                    continue
                total += value
                capacity += node.capacity
                count += 1
            if count >= 2 and total > 0 and total / capacity >= table.min_mean:
                means[index] = total / capacity
        return means

    def _cuts(self, node: NodeWeight, now: float,
              means: dict[int, float]) -> list[tuple[int, float, float, float]] | None:
        """Every table that cuts the node: (table index, value compared, step's ``at``, cut).
        None: no fresh load, nothing to go by."""
        policy = self.policy
        if not node.ewma or not node.load_fresh(now, policy.load_stale_after_seconds):
            node.steps.clear()
            return None
        out = []
        for index, table in enumerate(policy.steps):
            value = node.ewma.get(table.signal)
            if value is None:
                continue
            if table.relative:
                mean = means.get(index)
                if mean is None:
                    node.steps.pop(index, None)
                    continue
                value = value / node.capacity / mean
            if table.proportional:
                at, cut = _interpolated(table, value)
                if cut > 0:
                    out.append((index, value, at, cut))
                continue
            level = _step_level(table, value, node.steps.get(index, -1), policy.step_hysteresis)
            if level < 0:
                node.steps.pop(index, None)
                continue
            node.steps[index] = level
            step = table.steps[level]
            out.append((index, value, step.at, step.cut))
        return out

    def _least_cuts(self, members: list[NodeWeight], now: float, means: dict[int, float],
                    cuts: dict[str, list[tuple[int, float, float, float]] | None],
                    ) -> dict[int, float]:
        """Per relative table: the smallest cut among the nodes compared (0 when one of them is
        not cut): what each node's cut is taken relative to."""
        least: dict[int, float] = {}
        for index in means:
            signal = self.policy.steps[index].signal
            for node in members:
                if self._compared(node, signal, now) is None:
                    continue
                cut = next((c[3] for c in cuts[node.node] or () if c[0] == index), 0.0)
                least[index] = min(least.get(index, 1.0), cut)
        return least

    def _load_target(self, node: NodeWeight, cuts: list[tuple[int, float, float, float]] | None,
                     least: dict[int, float]) -> tuple[float, list[WeightReason]]:
        """The weight load allows (percent, floored) and the signals that cut it."""
        policy = self.policy
        if cuts is None:
            return FULL, [WeightReason("load-stale")] if node.ewma else []
        deepest = 0.0
        reasons: list[WeightReason] = []
        for index, value, at, raw in cuts:
            table = policy.steps[index]
            cut, note = raw, ""
            if table.relative:
                base = least.get(index, 0.0)
                if base >= cut:
                    continue  # the least-cut node itself (or as cut as it): no preference
                if base > 0:
                    cut = 1.0 - (1.0 - cut) / (1.0 - base)
                    note = f"beside the pool's least cut {_r(base)}"
            what = f"{table.signal}-share" if table.relative else table.signal
            reasons.append(WeightReason(what, value=_r(value), bound=at, cut=_r(cut), note=note))
            deepest = max(deepest, cut)
        target = FULL * (1.0 - deepest)
        if target < policy.floor_percent:
            target = policy.floor_percent
            reasons.append(WeightReason("floor", bound=policy.floor_percent))
        return target, reasons

    def _step_pool(self, pool: str, members: list[NodeWeight], now: float,
                   changes: list[WeightChange]) -> None:
        means = self._relative_means(members, now)
        cuts = {node.node: self._cuts(node, now, means) for node in members}
        least = self._least_cuts(members, now, means, cuts)
        # the guard: load-cut weights of the available nodes against their caps
        demand: list[tuple[float, float, float]] = []  # (capacity, cap, load target)
        for node in members:
            node.load_target, node.load_reasons = self._load_target(node, cuts[node.node], least)
            if node.state in _SERVING:
                _, limit, _ = self._caps(node, now)
                demand.append((node.capacity, limit, node.load_target))
        scale = _guard_scale(demand, self.policy.guard_share)
        if scale > 1.0:
            self.guard_steps_total += 1
        self.guard_scale[pool] = scale
        for node in members:
            self._compute(node, now, scale, changes)

    def _compute(self, node: NodeWeight, now: float, scale: float,
                 changes: list[WeightChange]) -> None:
        """Move one node's weight towards its target and publish it if it moved enough."""
        policy = self.policy
        if node.state == VerdictState.UNKNOWN:
            return  # no verdict yet: nothing to say to a balancer
        cap, limit, reasons = self._caps(node, now)
        load_target = node.load_target
        if cap > 0:  # a node taken out by its state: its load is not why
            reasons = reasons + node.load_reasons
        if cap > 0 and scale > 1.0 and load_target < limit:
            load_target = load_target * scale
            reasons.append(WeightReason("pool-guard", value=_r(scale),
                                        bound=policy.guard_share))
        target = min(limit, load_target)
        previous = node.weight
        if previous is None or cap == 0:
            weight = target  # the first weight, or a state that takes the node out: at once
        elif target > previous:
            weight = min(target, previous + policy.max_step_percent)
        else:
            weight = max(target, previous - policy.max_step_percent)
        weight = min(weight, limit)  # caps are health: never rate-limited
        if weight != target:
            reasons.append(WeightReason("max-step", value=_r(weight), bound=_r(target)))
        node.weight = weight
        node.target = target
        node.cap = cap
        node.limit = limit
        node.reasons = reasons
        self._publish(node, now, changes)

    def _publish(self, node: NodeWeight, now: float, changes: list[WeightChange]) -> None:
        weight = node.weight
        assert weight is not None
        rounded = math.floor(weight + 0.5)
        published = node.published
        if published == rounded:
            return
        if published is not None:
            moved = abs(weight - published) >= self.policy.dead_band_percent
            boundary = rounded == 0 or published == 0 or weight == node.cap
            if not (moved or boundary):
                return
        node.published = rounded
        node.seq += 1
        self.changes_total += 1
        node.last = WeightChange(node=node.node, weight=rounded, previous=published,
                                 seq=node.seq, decided_at=now, state=node.state,
                                 pool=node.pool, reasons=list(node.reasons))
        changes.append(node.last)

    # ---- read side (API, metrics, drain, publishers) ------------------------------------------

    def current(self) -> dict[str, WeightChange]:
        """The last published change of every node that has one (what reconcile converges to)."""
        return {name: node.last for name, node in self.nodes.items() if node.last is not None}

    def weight_of(self, node_id: str) -> int | None:
        """A node's published weight (None: unknown node, or nothing published yet)."""
        node = self.nodes.get(node_id)
        return None if node is None else node.published

    def drain_done(self, node_id: str, now: float) -> bool | None:
        """Whether a draining node has shed its sessions: its effective sessions (sessions that
        moved traffic lately; its active ones when no protocol gives bytes) at or below
        ``drain_done_sessions``. None: no fresh count to tell."""
        node = self.nodes[node_id]
        count = node.effective if node.effective is not None else node.sessions
        if count is None or not node.load_fresh(now, self.policy.load_stale_after_seconds):
            return None
        return count <= self.policy.drain_done_sessions

    def view(self, node_id: str, now: float) -> dict[str, Any]:
        """One node's weight and its evidence (KeyError for an unknown node)."""
        node = self.nodes[node_id]
        fresh = node.load_fresh(now, self.policy.load_stale_after_seconds)
        return {
            "weight": node.published,
            "weight_seq": node.seq,
            "weight_target": None if node.weight is None else _r(node.target),
            "weight_internal": None if node.weight is None else _r(node.weight),
            "capacity": node.capacity,
            "load": {name: _r(value) for name, value in node.ewma.items()},
            "load_age_seconds": _r(now - node.load_at) if node.load_at > -math.inf else None,
            "load_fresh": fresh,
            "sessions": node.sessions,
            "effective_sessions": None if node.effective is None else _r(node.effective),
            "guard_scale": _r(self.guard_scale.get(node.pool, 1.0)),
            "weight_reasons": [msgspec.to_builtins(r) for r in node.reasons],
        }

    # ---- snapshot -----------------------------------------------------------------------------

    def to_builtins(self) -> dict[str, Any]:
        """Everything a restart needs to continue exactly (msgpack/JSON-able)."""
        return {
            "policy": msgspec.to_builtins(self.policy),
            "registry": [[n.node, n.pool, n.capacity] for n in self.nodes.values()],
            "last_step": self.last_step if self.last_step > -math.inf else None,
            "guard_scale": dict(self.guard_scale),
            "changes_total": self.changes_total,
            "guard_steps_total": self.guard_steps_total,
            "nodes": [[node.node, *(_plain(getattr(node, f)) for f in _NODE_FIELDS),
                       msgspec.to_builtins(node.last) if node.last is not None else None,
                       [msgspec.to_builtins(r) for r in node.reasons],
                       [msgspec.to_builtins(r) for r in node.load_reasons]]
                      for node in self.nodes.values()],
        }

    @classmethod
    def restore(cls, data: dict[str, Any]) -> WeightEngine:
        """The engine :meth:`to_builtins` saved, with the policy and nodes it had then (apply
        a newer config with :meth:`reconfigure` after replaying what followed the save)."""
        policy = msgspec.convert(data["policy"], WeightPolicy)
        engine = cls(policy, [WeightNode(*row) for row in data["registry"]])
        engine.last_step = -math.inf if data["last_step"] is None else float(data["last_step"])
        engine.guard_scale = {p: float(s) for p, s in data["guard_scale"].items()
                              if p in engine.pools}
        engine.changes_total = int(data["changes_total"])
        engine.guard_steps_total = int(data["guard_steps_total"])
        for row in data["nodes"]:
            node = engine.nodes.get(row[0])
            if node is None:
                continue
            values = dict(zip(_NODE_FIELDS, row[1:-3], strict=True))
            node.state = VerdictState(values["state"])
            node.ewma = dict(values["ewma"])
            node.load_at = -math.inf if values["load_at"] is None else float(values["load_at"])
            node.sessions = values["sessions"]
            node.effective = values["effective"]
            node.steps = {int(k): int(v) for k, v in values["steps"].items()}
            node.load_target = float(values["load_target"])
            node.weight = values["weight"]
            node.target = float(values["target"])
            node.cap = float(values["cap"])
            node.limit = float(values["limit"])
            node.published = values["published"]
            node.seq = int(values["seq"])
            node.slow_start_at = values["slow_start_at"]
            node.last = None if row[-3] is None else msgspec.convert(row[-3], WeightChange)
            node.reasons = [msgspec.convert(r, WeightReason) for r in row[-2]]
            node.load_reasons = [msgspec.convert(r, WeightReason) for r in row[-1]]
        return engine


def _r(value: float) -> float:
    return round(value, _ROUND)


def _plain(value: Any) -> Any:
    if isinstance(value, VerdictState):
        return value.value
    if isinstance(value, float) and value == -math.inf:
        return None
    if isinstance(value, dict):
        return dict(value)
    return value


def _copy_state(src: NodeWeight, dst: NodeWeight) -> None:
    for name in _NODE_FIELDS:
        value = getattr(src, name)
        setattr(dst, name, dict(value) if isinstance(value, dict) else value)
    dst.reasons = list(src.reasons)
    dst.load_reasons = list(src.load_reasons)
    dst.last = src.last


def _step_level(table: SignalSteps, value: float, current: int, hysteresis: float) -> int:
    """The deepest step ``value`` reached (-1: none). A step already held is kept until the
    value falls ``hysteresis`` (a share of the step's ``at``) below it."""
    level = -1
    for index, step in enumerate(table.steps):
        bound = step.at * (1.0 - hysteresis) if index <= current else step.at
        if value >= bound:
            level = index
    return level


def _interpolated(table: SignalSteps, value: float) -> tuple[float, float]:
    """A proportional table at ``value``: (the ``at`` of the step reached, the cut linearly
    between it and the next step); no cut below the first step, the last one's past the last."""
    steps = table.steps
    if value < steps[0].at:
        return steps[0].at, 0.0
    for low, high in itertools.pairwise(steps):
        if value < high.at:
            return low.at, low.cut + (high.cut - low.cut) * (value - low.at) / (high.at - low.at)
    return steps[-1].at, steps[-1].cut


def _guard_scale(demand: list[tuple[float, float, float]], share: float) -> float:
    """The factor (>= 1) by which load-cut weights must grow so that the pool keeps ``share`` of
    its capacity: sum(capacity * min(cap, f * load)) >= share * sum(capacity * cap).

    Water-filling: raise f until the next node reaches its cap, in order of cap / load."""
    wanted = share * sum(c * cap for c, cap, _ in demand)
    have = sum(c * min(cap, load) for c, cap, load in demand)
    if have >= wanted or have <= 0:
        return 1.0
    # nodes sorted by the factor at which they hit their cap
    order = sorted(demand, key=lambda d: d[1] / d[2])
    capped = 0.0  # capacity-weighted sum of the nodes already at their cap
    rising = sum(c * load for c, _, load in order)  # slope: capacity-weighted loads still rising
    for c, cap, load in order:
        limit = cap / load
        if capped + rising * limit >= wanted:
            break
        capped += c * cap
        rising -= c * load
    if rising <= 0:
        return max(cap / load for _, cap, load in order)
    return max(1.0, (wanted - capped) / rising)
