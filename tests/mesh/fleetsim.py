"""A simulated fleet: generated nodes and vantages, faults, loss, the agent's real schedule policy
and the real decision engine, in simulated time.

Each vantage runs the agent's :class:`~probes.agent.scheduler.ScheduleCore` (tiers, slots,
fastinter, cascade, liveness probes, re-probe requests, the L4 tier's adaptive timeout) over its
own copy of the plan, with a random phase per (node, vantage) so vantages learn about a fault at
different moments. A probe's outcome comes from the fault model at its start; its result is
reported with the next batch (every ``report_every`` seconds per vantage), and the mesh applies
each batch when it arrives, as the live mesh does. The mesh ticks every ``tick_every``; with a
re-probe planner, the reply to a batch carries the re-probe requests for that vantage, which its
schedule honours at once.

Fault kinds (per node):

* ``answered`` — the VPN daemons are down, the host is up: functional checks fail at once with
  ``icmp-unreachable`` (a definitive answer), ICMP passes;
* ``silent`` — the host is gone: every check times out after the tier's timeout; an ICMP probe
  in flight when the host went away passes with half its echoes lost (a quality breach, seen in
  the lab: for a moment its vantage says DEGRADED).

Bad vantages: ``partitioned`` (cut off the fleet: every probe times out), ``lying`` (reports
every check failed at once, ``refused``), ``path-cut`` (times out on the nodes in ``nodes``).

``loss`` is packet loss on every path, each way. A probe is a few request/response exchanges
(``EXCHANGES``), each tried up to ``ATTEMPTS`` times within the timeout as the real checks do
(ICMP resends, handshake retransmissions): it fails, with a timeout, only when every attempt of
one exchange was lost. At 5 % loss that fails 0.1-0.3 % of probes, as the detection benchmark
measured with real checks at 5 % loss.

Everything is deterministic for a given seed.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from probes.agent.plan import PlannedCheck
from probes.agent.scheduler import ScheduleCore
from probes.checks.registry import kind as get_kind
from probes.config import TierPolicy
from probes.mesh.decision import DecisionEngine, NodeInfo
from probes.mesh.policy import DecisionPolicy
from probes.model import (
    Observation,
    ObservationBatch,
    Quality,
    Reason,
    Tier,
    Verdict,
    VerdictState,
)

# (check name, kind) like the lab stack's agents: ICMP plus one handshake per protocol
CHECKS: tuple[tuple[str, str], ...] = (
    ("icmp", "icmp"),
    ("wireguard.handshake", "wireguard.handshake"),
    ("openvpn.tls", "openvpn.tls"),
    ("ikev2.auth", "ikev2.auth"),
)
TIER = TierPolicy(interval=2.0, timeout=1.0, fast_interval=0.25, rise=2, fall=3)
ANSWER_SECONDS = 0.01  # an answer (pass or unreachable) comes back this fast
STRADDLE = Quality(sent=4, received=2, loss_ratio=0.5)
EXCHANGES = {"icmp": 1, "wireguard.handshake": 1, "openvpn.tls": 3, "ikev2.auth": 2}
ATTEMPTS = 3
NET_SECONDS = 0.005  # agent <-> mesh, each way


@dataclass(frozen=True)
class Fault:
    nodes: frozenset[str]
    start: float
    end: float = math.inf
    kind: str = "answered"  # "answered" | "silent"

    def hits(self, node: str, t: float) -> bool:
        return node in self.nodes and self.start <= t < self.end


@dataclass(frozen=True)
class BadVantage:
    vantage: str
    kind: str  # "partitioned" | "lying" | "path-cut"
    start: float = 0.0
    nodes: frozenset[str] = frozenset()  # path-cut: the nodes it cannot reach


class Planner(Protocol):
    """What the simulation needs of a re-probe planner (probes.mesh.reprobe.ReprobePlanner)."""

    def plan(self, engine: DecisionEngine, now: float) -> None: ...

    def take(self, agent: str, now: float) -> list[tuple[str, str]]: ...


@dataclass
class SimRun:
    verdicts: list[Verdict] = field(default_factory=list)
    batches: list[tuple[float, ObservationBatch]] = field(default_factory=list)  # (applied at, b)
    ticks: list[float] = field(default_factory=list)
    probes: int = 0  # probes started, every vantage
    reprobes_honoured: int = 0
    reprobes_dropped: int = 0
    impaired: list[tuple[float, str, bool]] = field(default_factory=list)  # (at, vantage, flag)
    faults: tuple[Fault, ...] = ()
    bad: BadVantage | None = None
    guard_violations: list[str] = field(default_factory=list)
    engine: DecisionEngine | None = None  # as the run left it
    # verdicts the bad vantage tipped (the honest vantages alone would not have given them then),
    # as (decided_at, node, new state, description)
    decisive_bad: list[tuple[float, str, VerdictState, str]] = field(default_factory=list)
    until: float = 0.0

    def failing(self, node: str, t: float) -> bool:
        return any(f.hits(node, t) for f in self.faults)

    def changes(self, node: str) -> list[Verdict]:
        return [v for v in self.verdicts if v.node == node]


@dataclass
class _Vantage:
    name: str
    core: ScheduleCore
    offset: float  # where its tier rounds start
    wake_at: float = math.inf  # the one "due" event this vantage has queued
    pending: list[Observation] = field(default_factory=list)
    seq: int = 0
    batch_seq: int = 0


class FleetSim:
    def __init__(
        self,
        *,
        nodes: Sequence[NodeInfo],
        vantages: Sequence[str],
        policy: DecisionPolicy,
        seed: int,
        faults: Iterable[Fault] = (),
        bad: BadVantage | None = None,
        loss: float = 0.0,
        planner: Planner | None = None,
        checks: Sequence[tuple[str, str]] = CHECKS,
        tier: TierPolicy = TIER,
        report_every: float = 0.1,
        tick_every: float = 0.5,
    ) -> None:
        self.nodes = list(nodes)
        self.policy = policy
        self.rng = random.Random(seed)
        self.faults = tuple(faults)
        self.bad = bad
        self.loss = loss
        self.planner = planner
        self.tier = tier
        self.report_every = report_every
        self.tick_every = tick_every
        self.engine = DecisionEngine(policy, self.nodes)
        tiers = {"l4": tier, "functional": tier}
        self.vantages: dict[str, _Vantage] = {}
        for name in vantages:
            core = ScheduleCore(tiers, rng=random.Random(self.rng.random()))
            plan = [
                PlannedCheck(n.node, n.pool, n.pop, n.region, check, get_kind(kind), None,
                             get_kind(kind).tier)
                for n in self.nodes
                for check, kind in checks
            ]
            core.load(plan)
            for st in core.states.values():  # a random phase per (node, vantage, check)
                st.phase = self.rng.random()
            self.vantages[name] = _Vantage(name, core, self.rng.uniform(0, tier.interval))
        self.kinds = dict(checks)
        exchange_lost = (1 - (1 - loss) ** 2) ** ATTEMPTS  # request or answer, every attempt
        self._lost = {name: 1 - (1 - exchange_lost) ** EXCHANGES.get(kind, 1)
                      for name, kind in checks}
        self._heap: list[tuple[float, int, str, Any]] = []
        self._n = 0
        self.run_result = SimRun(faults=self.faults, bad=bad, engine=self.engine)

    # ---------------------------------------------------------------- the fault model

    def outcome(self, vantage: str, node: str, check: str, t: float
                ) -> tuple[bool, Reason, float, Quality | None]:
        """(ok, reason, duration, quality) of a probe started at ``t``; a timeout lasts what
        the vantage's schedule gives the check (the L4 tier's adaptive timeout included)."""
        timeout = self.vantages[vantage].core.timeout_for(f"{node}/{check}")
        tier = get_kind(self.kinds[check]).tier
        bad = self.bad
        if bad is not None and bad.vantage == vantage and t >= bad.start:
            if bad.kind == "partitioned" or (bad.kind == "path-cut" and node in bad.nodes):
                return False, Reason.TIMEOUT, timeout, None
            if bad.kind == "lying":
                return False, Reason.REFUSED, ANSWER_SECONDS, None
        for f in self.faults:
            if f.hits(node, t):
                if f.kind == "silent":
                    return False, Reason.TIMEOUT, timeout, None
                if tier is not Tier.L4:
                    return False, Reason.ICMP_UNREACHABLE, ANSWER_SECONDS, None
            elif (f.kind == "silent" and tier is Tier.L4 and node in f.nodes
                  and t < f.start < t + timeout):
                return True, Reason.OK, timeout, STRADDLE  # in flight when the host went
        if self.loss and self.rng.random() < self._lost[check]:
            return False, Reason.TIMEOUT, timeout, None
        return True, Reason.OK, ANSWER_SECONDS, None

    # ---------------------------------------------------------------- running

    def _at(self, t: float, kind: str, payload: Any = None) -> None:
        self._n += 1
        heapq.heappush(self._heap, (t, self._n, kind, payload))

    def run(self, until: float,
            on_verdicts: Callable[[FleetSim, list[Verdict], float], None] | None = None,
            checkpoints: Iterable[tuple[float, Callable[[FleetSim, float], None]]] = ()
            ) -> SimRun:
        """Run to ``until``; ``checkpoints`` are called at their times with the engine as it is
        then (after everything due at that instant)."""
        out = self.run_result
        out.until = until
        interval = self.tier.interval
        for at, fn in checkpoints:
            self._at(at, "check", fn)
        for v in self.vantages.values():
            self._at(v.offset, "round", v.name)
            self._at(self.rng.uniform(0, self.report_every), "flush", v.name)
        self._at(self.tick_every, "tick")
        while self._heap:
            t, _, kind, payload = heapq.heappop(self._heap)
            if t > until:
                break
            if kind == "round":
                v = self.vantages[payload]
                for tier in sorted(v.core.tiers_in_use()):  # a set: its order follows the hash seed
                    v.core.open_round(tier, t)
                self._at(t + interval, "round", payload)
                self._wake(v, t)
            elif kind == "liveness":
                v = self.vantages[payload[0]]
                v.core.liveness(payload[1], t)
                self._wake(v, t)
            elif kind == "due":
                v = self.vantages[payload]
                if t == v.wake_at:  # else superseded by an earlier wake
                    v.wake_at = math.inf
                    self._start_due(v, t)
            elif kind == "done":
                self._done(t, *payload)
            elif kind == "flush":
                self._flush(self.vantages[payload], t)
                self._at(t + self.report_every, "flush", payload)
            elif kind == "arrive":
                self._arrive(t, payload, on_verdicts)
            elif kind == "reply":
                self._reply(t, *payload)
            elif kind == "check":
                payload(self, t)
            elif kind == "tick":
                out.ticks.append(t)
                changes = self.engine.tick(t)
                self._record(changes, t, on_verdicts)
                self._at(t + self.tick_every, "tick")
        return out

    def _wake(self, v: _Vantage, t: float) -> None:
        nxt = v.core.next_due()
        if nxt is not None and max(nxt, t) < v.wake_at:
            v.wake_at = max(nxt, t)
            self._at(v.wake_at, "due", v.name)

    def _start_due(self, v: _Vantage, t: float) -> None:
        for due in v.core.pop_due(t):
            check = due.check
            ok, reason, duration, quality = self.outcome(v.name, check.node, check.check, t)
            self.run_result.probes += 1
            suspect = v.core.suspect_after(due.key)  # the agent's liveness probe
            if suspect is not None and duration > suspect:
                self._at(t + suspect, "liveness", (v.name, due.key))
            self._at(t + duration, "done", (v.name, due.key, check.node, check.check, t, ok,
                                            reason, duration, quality))
        self._wake(v, t)

    def _done(self, t: float, vantage: str, key: str, node: str, check: str, started: float,
              ok: bool, reason: Reason, duration: float, quality: Quality | None) -> None:
        v = self.vantages[vantage]
        v.core.complete(key, ok, t, duration)
        v.seq += 1
        v.pending.append(Observation(node=node, check=check, vantage=vantage, seq=v.seq,
                                     wall_time=started, ok=ok, reason=reason,
                                     duration_seconds=duration, kind=self.kinds[check],
                                     tier=get_kind(self.kinds[check]).tier, quality=quality))
        self._wake(v, t)

    def _flush(self, v: _Vantage, t: float) -> None:
        if not v.pending:
            return
        v.batch_seq += 1
        batch = ObservationBatch(version=1, agent=v.name, batch_seq=v.batch_seq, sent_at=t,
                                 observations=v.pending)
        v.pending = []
        self._at(t + NET_SECONDS, "arrive", batch)

    def _arrive(self, t: float, batch: ObservationBatch,
                on_verdicts: Callable[[FleetSim, list[Verdict], float], None] | None) -> None:
        self.run_result.batches.append((t, batch))
        changes = self.engine.observe(batch.observations, t)
        self._record(changes, t, on_verdicts)
        if self.planner is not None:
            self.planner.plan(self.engine, t)
            asks = self.planner.take(batch.agent, t)
            if asks:
                self._at(t + NET_SECONDS, "reply", (batch.agent, asks))

    def _reply(self, t: float, vantage: str, asks: list[tuple[str, str]]) -> None:
        v = self.vantages[vantage]
        for node, check in asks:
            if v.core.request(f"{node}/{check}", t) == "honoured":
                self.run_result.reprobes_honoured += 1
            else:
                self.run_result.reprobes_dropped += 1
        self._wake(v, t)

    def _record(self, changes: list[Verdict], t: float,
                on_verdicts: Callable[[FleetSim, list[Verdict], float], None] | None) -> None:
        out = self.run_result
        for name, vantage in self.engine.vantages.items():
            last = next((f for at, n, f in reversed(out.impaired) if n == name), False)
            if vantage.impaired != last:
                out.impaired.append((t, name, vantage.impaired))
        if not changes:
            return
        out.verdicts.extend(changes)
        self._check_guard(t)
        self._check_bad_vantage(changes)
        if on_verdicts is not None:
            on_verdicts(self, changes, t)

    def _check_guard(self, t: float) -> None:
        share = self.policy.pool_guard.max_down_share
        for pool in self.engine.pools.values():
            down = sum(n.probe_state == VerdictState.DOWN for n in pool.nodes)
            if down > pool.allowed_down(share):
                self.run_result.guard_violations.append(f"{t:.2f}: pool {pool.name} {down} DOWN")

    def _check_bad_vantage(self, changes: list[Verdict]) -> None:
        """A verdict the bad vantage decided: the honest vantages' opinions alone (the same
        majority rule) would not have given it."""
        bad = self.bad
        if bad is None:
            return
        for verdict in changes:
            if verdict.state not in (VerdictState.UP, VerdictState.DOWN):
                continue
            if verdict.previous == VerdictState.UNKNOWN:
                continue
            node = self.engine.nodes[verdict.node]
            honest = [nv for name, nv in node.nvs.items() if name != bad.vantage
                      and verdict.decided_at - nv.seen <= self.policy.stale_after_seconds
                      and not nv.vantage.impaired and nv.opinion != 0]
            down = sum(nv.opinion == 3 for nv in honest)
            would_be_down = down * 2 > len(honest)
            if len(honest) < self.policy.quorum.min_voters:
                continue  # honest vantages alone would have held it: no change either way
            if (verdict.state == VerdictState.DOWN) != would_be_down:
                self.run_result.decisive_bad.append((
                    verdict.decided_at, verdict.node, verdict.state,
                    f"{verdict.decided_at:.2f} {verdict.node} {verdict.previous}->"
                    f"{verdict.state} votes {verdict.votes}"))


def generated_fleet(pools: Sequence[int]) -> list[NodeInfo]:
    """Nodes in pools of the given sizes: p0 has pools[0] nodes named p0n0.., and so on."""
    return [NodeInfo(f"p{p}n{i}", f"p{p}", pop=f"pop{i % 3}", region="sim")
            for p, size in enumerate(pools) for i in range(size)]


def pool_nodes(nodes: Sequence[NodeInfo], pool: str) -> list[str]:
    return [n.node for n in nodes if n.pool == pool]
