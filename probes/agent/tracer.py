"""When the agent traces the path to a node, and the asyncio shell that does it.

Triggers (docs/paths.md):

* **change**: this agent's opinion of the node changed: one of its checks began failing (the
  first failure of a run that may settle it down; its first outcome counts when it is a
  failure), or the last failing one passes again. Routes move, so a trace taken later could show
  a path that no longer fails: the trace is queued at once and runs as soon as the limits allow,
  usually finishing before the check has failed often enough to settle down, so it reaches the
  mesh with (or before) the verdict it explains. A failing trace is dropped when the node no
  longer fails by the time it finishes and none of its checks settled down meanwhile (a lone
  failure, not a change);
* **failing**: while the agent sees the node failing, every ``failing_interval``, to follow the
  path through an incident (and to see it heal);
* **baseline**: every ``baseline_interval``, each node at its own phase of it, so there is a
  passing trace to compare a failing one with, and route changes show up.

Limits, so that tracing never takes the probes' place: ``concurrency`` traces at once; a
token bucket of ``max_per_minute``; per node, change traces at least ``min_interval`` apart (a
change during the wait is traced when it ends, so the final state gets its trace); pacing per
trace (``packets_per_second``). Changes go before re-traces, re-traces before baselines.
Baselines wanting more than the bucket gives (nodes / ``baseline_interval`` above
``max_per_minute`` / 60) are logged at every load and shown in :class:`TracerStats` with how
late the most overdue waiting trace is: otherwise baselines just come later, silently.

Each trace uses the node's own protocol and port (its first VPN check, else an L4 check, else
ICMP), Paris-style flows with source ports fixed per node (so consecutive traces of a node
compare), ``flows`` of them when the opinion changed (to find a load-balanced branch that loses
the port) and ``baseline_flows`` otherwise, plus large DF probes on the first flow.

:class:`TracePlanner` is the policy with time passed in (no asyncio); :class:`Tracer` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import logging
import socket
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from probes.agent.metrics import TracerStats
from probes.agent.plan import PlannedCheck
from probes.aio import wait_at_most
from probes.checks.traceroute import TraceUnavailable, trace
from probes.config import TracingConfig
from probes.model import LOCAL_TIERS, NODE_READ_TIERS, PathTrace, TraceProtocol, TraceTrigger
from probes.protocols.traceroute import TraceSpec

log = logging.getLogger(__name__)

SPORT_BASE = 61000  # above Linux's ephemeral range (32768-60999): no socket of ours uses them
SPORT_SPAN = 4000
_VPN = ("wireguard.", "openvpn.", "ikev2.", "quic.")
_PRIORITY = {TraceTrigger.CHANGE: 0, TraceTrigger.FAILING: 1, TraceTrigger.BASELINE: 2}


@dataclass(frozen=True, slots=True)
class TraceTarget:
    """What a node is traced with: its address, protocol and port, and its flows' ports."""

    node: str
    host: str
    protocol: TraceProtocol
    port: int

    @property
    def sport(self) -> int:
        """The first flow's source port, the same in every trace of the node."""
        return SPORT_BASE + zlib.crc32(self.node.encode()) % SPORT_SPAN


def _hash_phase(name: str) -> float:
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _flow_of(check: PlannedCheck) -> tuple[int, TraceProtocol, int] | None:
    """(preference, protocol, port) of a check's traffic; lower preference wins."""
    if check.tier in NODE_READ_TIERS:
        return None  # telemetry and load reads go to the node's own SSH, not its service
    params = check.params
    port = getattr(params, "port", None)
    kind = check.kind.name
    if kind in ("icmp", "mtu.icmp") or port is None:
        return 2, TraceProtocol.ICMP, 0
    tcp = kind == "tcp" or getattr(params, "proto", "udp") == "tcp"
    protocol = TraceProtocol.TCP if tcp else TraceProtocol.UDP
    return (0 if kind.startswith(_VPN) else 1), protocol, int(port)


def trace_targets(checks: Iterable[PlannedCheck]) -> dict[str, TraceTarget]:
    """Per node, the flow of its most telling check (its first VPN check, else L4, else ICMP)."""
    best: dict[str, tuple[int, TraceTarget]] = {}
    for check in checks:
        flow = _flow_of(check)
        host = getattr(check.params, "host", None)
        if flow is None or not isinstance(host, str):
            continue
        rank, protocol, port = flow
        if check.node not in best or rank < best[check.node][0]:
            best[check.node] = (rank, TraceTarget(check.node, host, protocol, port))
    return {node: target for node, (_rank, target) in best.items()}


@dataclass(frozen=True, slots=True)
class TraceJob:
    target: TraceTarget
    trigger: TraceTrigger
    failing: bool


@dataclass(slots=True)
class _NodeState:
    target: TraceTarget
    phase: float  # share of the baseline interval: where this node's baselines fall
    failing: bool = False
    down_checks: set[str] = field(default_factory=set)
    last_trace: float | None = None  # start of the last trace
    settled_down_at: float = -1.0  # when one of its checks last settled down
    change_pending: bool = False
    running: bool = False
    gen: int = 0  # bumps invalidate this node's heap entries


class TracePlanner:
    """Which node to trace when. Time (``now``, monotonic seconds) is passed in."""

    def __init__(self, policy: TracingConfig, now: float) -> None:
        self.policy = policy
        self.nodes: dict[str, _NodeState] = {}
        self._changes: deque[str] = deque()
        self._heap: list[tuple[float, int, int, str]] = []  # (due, priority, gen, node)
        self._tokens = self._burst
        self._refill_at = now
        self._started = now
        self.in_flight = 0
        self.skipped_rate_limited = 0  # change traces that waited for the bucket or min_interval

    @property
    def _burst(self) -> float:
        return max(1.0, self.policy.max_per_minute / 6)

    def load(self, targets: dict[str, TraceTarget], now: float) -> None:
        """(Re)load the nodes; a node that stays keeps its state. At the first load the nodes'
        baselines are spread evenly over the interval; a node added later gets a phase from its
        name (a reload must not move everyone's)."""
        old = self.nodes
        first = not old
        self.nodes = {}
        for i, (name, target) in enumerate(targets.items()):
            st = old.get(name)
            if st is None:
                phase = i / len(targets) if first else _hash_phase(name)
                st = _NodeState(target, phase)
                self.nodes[name] = st
                self._schedule_baseline(st, now, first=True)
            else:
                st.target = target
                self.nodes[name] = st

    # ---- inputs -------------------------------------------------------------------------------

    def check_failing(self, node: str, check: str, failing: bool, now: float,
                      settled_down: bool = False) -> bool:
        """A check of ``node`` is failing now (settled down, or a run of failures began) or
        not. True when the node's opinion changed: a trace is asked for."""
        st = self.nodes.get(node)
        if st is None:
            return False
        if settled_down:
            st.settled_down_at = now
        if failing:
            st.down_checks.add(check)
        else:
            st.down_checks.discard(check)
        failing = bool(st.down_checks)
        if failing == st.failing:
            return False
        st.failing = failing
        if not st.change_pending:
            st.change_pending = True
            self._changes.append(node)
        if failing and self.policy.failing_interval > 0:
            self._push(st, now + self.policy.failing_interval, TraceTrigger.FAILING)
        return True

    def finished(self, node: str, now: float) -> None:
        st = self.nodes.get(node)
        self.in_flight -= 1
        if st is None:
            return
        st.running = False
        self._schedule_baseline(st, now)
        if st.failing and self.policy.failing_interval > 0:
            self._push(st, now + self.policy.failing_interval, TraceTrigger.FAILING)

    # ---- scheduling -----------------------------------------------------------------------------

    def _push(self, st: _NodeState, due: float, trigger: TraceTrigger) -> None:
        heapq.heappush(self._heap, (due, _PRIORITY[trigger], st.gen, st.target.node))

    def _schedule_baseline(self, st: _NodeState, now: float, first: bool = False) -> None:
        interval = self.policy.baseline_interval
        if interval <= 0:
            return
        st.gen += 1  # the baseline clock restarts at every trace
        due = now + st.phase * interval if first else now + interval
        self._push(st, due, TraceTrigger.BASELINE)

    def _refill(self, now: float) -> None:
        rate = self.policy.max_per_minute / 60.0
        self._tokens = min(self._burst, self._tokens + max(0.0, now - self._refill_at) * rate)
        self._refill_at = now

    def take(self, now: float) -> list[TraceJob]:
        """The traces to start now."""
        self._refill(now)
        jobs: list[TraceJob] = []
        deferred: list[str] = []
        while self._changes and self._room():
            node = self._changes.popleft()
            st = self.nodes.get(node)
            if st is None:
                continue
            if st.running or (st.last_trace is not None
                              and now - st.last_trace < self.policy.min_interval):
                deferred.append(node)
                continue
            st.change_pending = False
            jobs.append(self._start(st, TraceTrigger.CHANGE, now))
        if deferred:
            self.skipped_rate_limited += len(deferred)
            self._changes.extendleft(reversed(deferred))
        while self._heap and self._heap[0][0] <= now and self._room():
            live = self._live(heapq.heappop(self._heap), now)
            if live is not None:
                jobs.append(self._start(*live, now))
        return jobs

    def _live(self, entry: tuple[float, int, int, str],
              now: float) -> tuple[_NodeState, TraceTrigger] | None:
        """The node and trigger of a due heap entry, None when it is to be dropped (every such
        entry is superseded: a running node's end schedules its next traces afresh)."""
        _due, priority, gen, node = entry
        st = self.nodes.get(node)
        if st is None or st.running:
            return None
        trigger = TraceTrigger.FAILING if priority == 1 else TraceTrigger.BASELINE
        if trigger is TraceTrigger.BASELINE and gen != st.gen:
            return None  # a newer trace restarted this node's baseline clock
        if trigger is TraceTrigger.FAILING and (
                not st.failing or (st.last_trace is not None and
                                   now - st.last_trace < self.policy.failing_interval)):
            return None
        return st, trigger

    def oldest_due(self, now: float) -> float | None:
        """When the most overdue re-trace or baseline waiting in the heap fell due (None: the
        heap is empty), after dropping the due entries :meth:`take` would drop: amortised
        O(log n), each entry is dropped once. Past ``now`` it waits for the budget or a
        concurrency slot; its age is the tracing backlog."""
        while self._heap and self._heap[0][0] <= now and self._live(self._heap[0], now) is None:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    @property
    def baseline_demand(self) -> float:
        """Baseline traces per second the plan asks for: each node once a baseline_interval."""
        interval = self.policy.baseline_interval
        return len(self.nodes) / interval if interval > 0 else 0.0

    @property
    def budget(self) -> float:
        """Traces per second the token bucket allows, every trigger together."""
        return self.policy.max_per_minute / 60.0

    def _room(self) -> bool:
        return self.in_flight < self.policy.concurrency and self._tokens >= 1.0

    def _start(self, st: _NodeState, trigger: TraceTrigger, now: float) -> TraceJob:
        st.running = True
        st.last_trace = now
        self.in_flight += 1
        self._tokens -= 1.0
        return TraceJob(st.target, trigger, st.failing)

    def next_due(self, now: float) -> float | None:
        """When :meth:`take` may have something (None: nothing is waiting, or nothing can
        start before a trace in flight ends, which wakes the shell). Before, a due trace with
        every concurrency slot taken made the shell look again every millisecond until one
        ended: ~600 wake-ups a second of a 4,000-node agent's loop."""
        if self.in_flight >= self.policy.concurrency:
            return None
        times = []
        for node in self._changes:
            st = self.nodes.get(node)
            if st is not None:  # a running node's end wakes the shell anyway
                last = st.last_trace
                times.append(now if last is None else last + self.policy.min_interval)
        if self._heap:
            times.append(self._heap[0][0])
        if not times:
            return None
        due = min(times)
        if self._tokens < 1.0:
            due = max(due, now + (1.0 - self._tokens) * 60.0 / self.policy.max_per_minute)
        return due


# ------------------------------------------------------------------------------- the shell


class Tracer:
    """Runs a :class:`TracePlanner`: starts its traces, hands the results to ``submit``."""

    def __init__(self, vantage: str, policy: TracingConfig,
                 submit: Callable[[PathTrace], None], *, stats: TracerStats | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.vantage = vantage
        self.policy = policy
        self.submit = submit
        self.clock = clock
        self.wall = wall
        self.planner = TracePlanner(policy, clock())
        self.stats = stats or TracerStats()
        self.stats.clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    def load(self, checks: Iterable[PlannedCheck], policy: TracingConfig | None = None) -> None:
        """(Re)load the plan (and the policy, on a config reload)."""
        if policy is not None:
            self.policy = self.planner.policy = policy
        now = self.clock()
        self.planner.load(trace_targets(checks), now)
        self._plan_figures(now)
        self._wake.set()

    def _plan_figures(self, now: float) -> None:
        """Baseline demand against the budget, in the stats and, when the demand is larger, in
        a warning: the bucket then starts each node's baseline later and later until they come
        every nodes / budget seconds instead of every baseline_interval, and nothing else says
        so."""
        planner, policy = self.planner, self.policy
        demand, budget = planner.baseline_demand, planner.budget
        self.stats.baseline_demand_per_second = demand
        self.stats.budget_per_second = budget
        self.stats.oldest_due = planner.oldest_due(now)
        if demand > budget:
            nodes = len(planner.nodes)
            log.warning(
                "path tracing: %d nodes every paths.baseline_interval (%.0f s) want %.2f baseline "
                "traces per second but paths.max_per_minute (%g) allows %.2f for every trace: "
                "each node's baseline will come about every %.0f s, not every %.0f s; raise "
                "paths.max_per_minute above %.0f or paths.baseline_interval above %.0f s",
                nodes, policy.baseline_interval, demand, policy.max_per_minute, budget,
                nodes / budget, policy.baseline_interval, demand * 60.0, nodes / budget)

    def failing(self, check: PlannedCheck, failing: bool, settled_down: bool) -> None:
        """Called by the scheduler with every outcome (cheap: a set operation, no I/O)."""
        if check.tier in LOCAL_TIERS:
            return
        if self.planner.check_failing(check.node, check.check, failing, self.clock(),
                                      settled_down):
            self._wake.set()

    def confirmed(self, node: str, since: float) -> bool:
        """The node is failing now, or one of its checks settled down since ``since``."""
        st = self.planner.nodes.get(node)
        return st is not None and (st.failing or st.settled_down_at >= since)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="tracer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            now = self.clock()
            if not self.stats.unavailable:
                for job in self.planner.take(now):
                    task = asyncio.create_task(self._run(job), name=f"trace-{job.target.node}")
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
            if self.stats.unavailable:  # it takes nothing: it waits for a reload, not the due
                due = self.stats.oldest_due = None
            else:
                due, self.stats.oldest_due = (self.planner.next_due(now),
                                              self.planner.oldest_due(now))
            self._wake.clear()
            wait = 60.0 if due is None else max(0.0, due - self.clock())
            await wait_at_most(self._wake, max(wait, 0.001))

    async def _run(self, job: TraceJob) -> None:
        policy = self.policy
        target = job.target
        started_wall = self.wall()
        started = self.clock()
        self.stats.in_flight += 1
        outcome = "ok"
        try:
            address = await _resolve(target.host)
            flows = policy.flows if job.trigger is not TraceTrigger.BASELINE else (
                policy.baseline_flows)
            spec = TraceSpec(
                source="", target=address, protocol=target.protocol, port=target.port,
                flows=tuple(target.sport + i for i in range(max(1, flows))),
                big_size=policy.big_probe_size, max_ttl=policy.max_ttl,
                attempts=policy.attempts, probe_timeout=policy.probe_timeout,
                gap_limit=policy.gap_limit, packets_per_second=policy.packets_per_second)
            run = await trace(spec, deadline=policy.max_ttl * policy.probe_timeout
                              * policy.attempts + 5.0)
        except TraceUnavailable as exc:
            outcome = "unavailable"
            if not self.stats.unavailable:
                self.stats.unavailable = str(exc)
                log.warning("path tracing off: %s", exc)
            return
        except (OSError, ValueError) as exc:
            outcome = "error"
            log.info("trace node=%s failed: %s", target.node, exc)
            return
        finally:
            self.stats.in_flight -= 1
            self.stats.count(job.trigger.value, outcome)
            self.planner.finished(target.node, self.clock())
            self._wake.set()
        self.stats.packets_total += run.packets_sent
        self.stats.cpu_seconds_total += run.cpu_seconds
        if job.failing and not self.confirmed(target.node, started):
            self.stats.count(job.trigger.value, "transient")  # a lone failure, not a change
            return
        self.submit(PathTrace(
            node=target.node, vantage=self.vantage, wall_time=started_wall,
            trigger=job.trigger, failing=job.failing, target=address,
            protocol=target.protocol, port=target.port, flows=run.flows,
            duration_seconds=round(run.duration_seconds, 6)))


async def _resolve(host: str) -> str:
    """The node's IPv4 address (traces are IPv4 only)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, family=socket.AF_INET,
                                                         type=socket.SOCK_DGRAM)
    if not infos:
        raise ValueError(f"{host} has no IPv4 address")
    return str(infos[0][4][0])
