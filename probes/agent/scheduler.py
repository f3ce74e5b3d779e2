"""When each check runs: tiers, spread, jitter, fast re-probe, cascade, limits, admission.

Two layers:

* :class:`ScheduleCore` is the policy, with time passed in (``now``) and no asyncio: which check
  is due when, what a result does to the schedule. The fake-clock test drives it directly.
* :class:`AgentScheduler` is the asyncio shell. APScheduler (3.x ``AsyncIOScheduler``) runs one
  job per *tier*: every tier interval it opens a round, which places each check of that tier at
  its own slot inside the coming interval. The precise start of each check is a single
  ``loop.call_at`` timer on the core's earliest due time. One APScheduler job per *check* was
  measured and does not keep up at 2,000 probes/s here (see docs/agent.md and
  tests/bench/test_agent_bench.py), so APScheduler batches and the core dispatches.

Policy (HAProxy's health-check semantics, named after its keywords):

* **spread**: each check has a fixed phase in [0, 1) of its tier interval (evenly spread over
  the tier's checks at load, each node's checks interleaved with the other nodes' so that they
  are spread over the interval too; a stable hash for checks added by a reload), plus a random
  ``jitter`` share of the interval, so probes never start in bursts.
* **fastinter**: while an outcome differs from the settled state the check re-runs every
  ``fast_interval`` until ``rise`` successes / ``fall`` failures in a row settle it; then it
  goes back to its slot in the normal rounds. The first outcome of a check settles at once
  (Envoy's rule): fast re-probing a whole fresh fleet would double the agent's start-up load.
* **fastinter spaces starts**: the next probe of a transitioning check starts ``fast_interval``
  after the last one *started*, or at once when that one took longer (a timeout): the wait for
  a silent node's answer already was the pause, so three timeouts of the 0.25 s ICMP check take
  0.75 s, not 1.25 s.
* **cascade**: an L4 failure makes every functional check of that node due now (once per
  ``fast_interval``), so "port closed" is confirmed or refuted at the protocol level at once.
* **liveness probe** (the cascade upwards): a functional check still unanswered after its own
  usual time (the RTO of its successful runs, RFC 6298, clamped to [``min_timeout``, half its
  timeout]) makes the node's L4 check due now, if that check is settled up and did not start
  within its ``fast_interval``. A handshake with a silent node only fails at its timeout (1 s in
  the benchmark); the ICMP probe fails 0.25 s later and is reported, and the mesh asks the other
  vantages at once. Costs one L4 probe per handshake that runs long (loss, a slow server).
* **adaptive timeout** (L4 tier): a single-exchange check waits ``srtt + 4 * rttvar`` of its own
  successful round trips (TCP's RTO, RFC 6298), clamped to [``min_timeout``, the tier's
  timeout]: a silent node fails in ~0.25 s instead of the flat timeout, a slow path gets a
  proportionally longer wait. Failures give no sample (Karn); until ``RTO_MIN_SAMPLES``
  successes the tier's timeout is used. Multi-exchange checks (handshakes with their own
  retransmits) keep the tier's timeout: cutting it would turn lost packets into failures.
* **re-probe on request** (corroboration on demand): when another vantage saw a check of a node
  fail, the mesh asks this agent (in the reply to a batch) to re-probe it now. The check is
  made due now unless it is running or already due; a slot already queued later in the round
  is pulled forward (no extra probe). A token bucket (``max_reprobe_rate`` per second, burst
  twice that) bounds what requests can add, whatever the mesh asks.
* **budget**: a check planned with a ``min_interval`` (a throughput burst's share of its
  node's hourly budget) never starts sooner than that after its last start: rounds skip it
  until then, fast re-probes and cascades wait for it, and the mesh's re-probe requests are
  ``limited``.
* a check never overlaps itself; a global, and a per-node semaphore bound concurrency.
* **admission control**: the planned start rate (sum of 1/interval) is capped at
  ``max_probe_rate``; checks beyond it are refused at load. At run time a check that cannot start
  within ``max_start_lag`` of its slot is not run but reported as ``overloaded``: a late probe
  would measure the agent, not the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, NamedTuple

from probes.agent.gate import Gate
from probes.agent.plan import PlannedCheck
from probes.checks.base import CheckResult, Started, execute, start_run
from probes.config import TierPolicy
from probes.model import Reason, Tier

log = logging.getLogger(__name__)

DEFAULT_TIERS: dict[str, TierPolicy] = {
    "l4": TierPolicy(interval=2.0, timeout=1.0, fast_interval=0.5),
    "functional": TierPolicy(interval=15.0, timeout=5.0, fast_interval=2.0),
    "session": TierPolicy(interval=60.0, timeout=10.0, fast_interval=10.0),
    "telemetry": TierPolicy(interval=30.0, timeout=10.0),  # no fast re-probe: not health
    "load": TierPolicy(interval=1.0, timeout=0.8),  # weights follow load within seconds
    "policy": TierPolicy(interval=3600.0, timeout=60.0, jitter=0.2),  # crypto policy scans
}
ROUND_PART = 256  # checks placed per loop callback when a round opens
# one timer wake-up starts every check due within this much after it: the loop's timers have a
# millisecond's grain anyway (libuv), and a start up to this early is inside the start error
# the schedule promises, while one wake-up per probe was a fixed cost per probe
START_AHEAD = 0.001
# adaptive timeout floor: Linux's minimum TCP RTO is 200 ms; a little above it leaves room for
# an agent event loop that is busy for a moment when the answer arrives
MIN_ADAPTIVE_TIMEOUT = 0.25
RTO_MIN_SAMPLES = 3  # successes before the measured RTT replaces the configured timeout
RTO_K = 4.0  # RFC 6298: RTO = SRTT + K * RTTVAR
RTO_ALPHA = 1 / 8
RTO_BETA = 1 / 4
_LAST_SLOT = 0.999  # a jittered slot stays inside its round, so it is never skipped by the next
DEFAULT_MAX_REPROBE_RATE = 10.0  # re-probes on request per second (burst: twice that)
# what became of a re-probe request (the metric's closed label set)
REPROBE_RESULTS = ("honoured", "busy", "unknown", "limited", "disabled")


@dataclass(slots=True)
class CheckState:
    check: PlannedCheck
    policy: TierPolicy
    phase: float  # slot in the tier interval, 0..1
    due: float | None = None
    why: str = ""  # "round", "fast", "cascade", "reprobe" or "liveness": why it is due
    gen: int = 0  # the sequence number of its live heap entry: any other entry of it is stale
    running: bool = False
    settled: bool | None = None  # None until the first outcome
    last_ok: bool | None = None
    streak: int = 0  # consecutive outcomes (all equal) that differ from ``settled``
    failing: bool = False  # settled down, or on a run of failures (see Completion.failing)
    last_start: float | None = None
    srtt: float = 0.0  # smoothed duration of successful runs (the adaptive timeout, liveness)
    rttvar: float = 0.0
    rtt_samples: int = 0

    @property
    def transitioning(self) -> bool:
        return self.streak > 0

    def sample_rtt(self, rtt: float) -> None:
        """RFC 6298 section 2: the first sample sets SRTT, later ones are smoothed in."""
        if self.rtt_samples == 0:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = (1 - RTO_BETA) * self.rttvar + RTO_BETA * abs(self.srtt - rtt)
            self.srtt = (1 - RTO_ALPHA) * self.srtt + RTO_ALPHA * rtt
        self.rtt_samples += 1


# Due, Completion and ProbeRun are made for every probe: named tuples, which are made several
# times faster than frozen dataclasses (those set each field through object.__setattr__)


class Due(NamedTuple):
    key: str
    check: PlannedCheck
    due: float
    why: str
    state: CheckState  # the shell's start asks its timeout of it, without a lookup by key


class Completion(NamedTuple):
    settled_changed: bool  # this result settled a new state (rise/fall reached)
    settled: bool | None
    cascaded: tuple[str, ...]  # keys made due now by this result
    first: bool = False  # the check's first outcome: it settled at once (not a change)
    # settled down, or failing now on its way there (a run of failures began): what the path
    # tracer takes as "this check fails"; ``failing_changed``: it was not so before, or the
    # other way round (the tracer hears of changes only: nothing on the hot path)
    failing: bool = False
    failing_changed: bool = False


# a NamedTuple's own constructor is a Python function over ``tuple.__new__``: the per-probe
# ones (a Due, a ProbeRun) are made with ``tuple.__new__`` itself, ~1,100 instructions less each
# (callgrind); only where every field is given, in order
_tuple_new = tuple.__new__

# what :meth:`ScheduleCore.complete` returns for a success of a check settled up that was not
# failing: what the general rule gives then (no change, nothing cascaded), made once
STEADY_UP = Completion(False, True, ())


@dataclass(frozen=True, slots=True)
class LoadReport:
    added: int
    kept: int
    removed: int
    refused: tuple[str, ...]
    planned_rate: float  # probe starts per second admitted


def _interleave_nodes(checks: list[PlannedCheck]) -> list[PlannedCheck]:
    """Slot order that spreads each node's checks over the interval: every node's first check,
    then every node's second, ... A node with c checks in a tier is then probed every
    ``interval / c`` by one of them, not in one burst per interval, so the first evidence of a
    fault (a silent node fails all its checks) comes within ``interval / c``, not ``interval``."""
    by_node: dict[str, list[PlannedCheck]] = {}
    for c in checks:
        by_node.setdefault(c.node, []).append(c)
    out: list[PlannedCheck] = []
    for i in range(max((len(v) for v in by_node.values()), default=0)):
        out.extend(v[i] for v in by_node.values() if i < len(v))
    return out


def _hash_phase(key: str) -> float:
    return zlib.crc32(key.encode()) / 2**32


class ScheduleCore:
    """The scheduling policy. Time is a float in seconds passed in; nothing here sleeps."""

    def __init__(self, tiers: dict[str, TierPolicy] | None = None, *,
                 max_rate: float = float("inf"), rng: random.Random | None = None,
                 adaptive_tiers: frozenset[Tier] = frozenset({Tier.L4}),
                 min_timeout: float = MIN_ADAPTIVE_TIMEOUT,
                 max_reprobe_rate: float = DEFAULT_MAX_REPROBE_RATE) -> None:
        self.tiers = dict(DEFAULT_TIERS) | (tiers or {})
        self.max_rate = max_rate
        self.max_reprobe_rate = max_reprobe_rate
        self._reprobe_tokens = 2 * max_reprobe_rate
        self._reprobe_at = -float("inf")
        self.adaptive_tiers = adaptive_tiers
        self.min_timeout = min_timeout
        self.rng = rng or random.Random()
        self.states: dict[str, CheckState] = {}
        self.refused: tuple[str, ...] = ()
        self.planned_rate = 0.0
        # (due, sequence number, state): the state itself, not its key, so that popping and
        # peeking need no lookup; the sequence numbers are unique, so a tie on the due time is
        # broken first queued, first popped and two states are never compared
        self._heap: list[tuple[float, int, CheckState]] = []
        self._seq = 0
        self._by_node: dict[str, list[str]] = {}
        self._tier_order: dict[Tier, list[CheckState]] = {}  # each tier's checks in slot order

    # ---------------------------------------------------------------- configuration

    def policy(self, tier: Tier) -> TierPolicy:
        return self.tiers[tier.value]

    def load(self, checks: list[PlannedCheck],
             tiers: dict[str, TierPolicy] | None = None) -> LoadReport:
        """(Re)load the plan. Existing checks keep their phase, due time and rise/fall state."""
        if tiers is not None:
            self.tiers = dict(DEFAULT_TIERS) | tiers
        admitted: list[PlannedCheck] = []
        refused: list[str] = []
        rate = 0.0
        for c in checks:
            cost = 1.0 / max(self.policy(c.tier).interval, c.min_interval)
            if rate + cost > self.max_rate:
                refused.append(c.key)
                continue
            rate += cost
            admitted.append(c)
        first_load = not self.states
        old = self.states
        self.states = {}
        per_tier: dict[Tier, list[PlannedCheck]] = {}
        for c in admitted:
            per_tier.setdefault(c.tier, []).append(c)
        for tier, members in per_tier.items():
            per_tier[tier] = _interleave_nodes(members)
        kept = 0
        for tier, members in per_tier.items():
            policy = self.policy(tier)
            for i, c in enumerate(members):
                prev = old.get(c.key)
                if prev is not None:
                    prev.check, prev.policy = c, policy
                    self.states[c.key] = prev
                    kept += 1
                    continue
                phase = i / len(members) if first_load else _hash_phase(c.key)
                self.states[c.key] = CheckState(c, policy, phase)
        for key, st in old.items():
            if key not in self.states:
                st.gen = -1  # drops its heap entry
        self._by_node = {}
        self._tier_order = {}
        for key, st in self.states.items():
            self._by_node.setdefault(st.check.node, []).append(key)
            self._tier_order.setdefault(st.check.tier, []).append(st)
        for ordered in self._tier_order.values():  # slot order: a round opens earliest first
            ordered.sort(key=lambda st: st.phase)
        self.refused = tuple(refused)
        self.planned_rate = rate
        return LoadReport(added=len(self.states) - kept, kept=kept,
                          removed=sum(1 for k in old if k not in self.states),
                          refused=self.refused, planned_rate=rate)

    def nodes(self) -> Iterable[str]:
        """The nodes that have a planned check."""
        return self._by_node.keys()

    def tiers_in_use(self) -> set[Tier]:
        return {st.check.tier for st in self.states.values()}

    # ---------------------------------------------------------------- time

    @staticmethod
    def _earliest(st: CheckState) -> float:
        """When the check may start again (its min_interval after its last start)."""
        if st.last_start is None or not st.check.min_interval:
            return -float("inf")
        return st.last_start + st.check.min_interval

    def _queue(self, st: CheckState, due: float, why: str) -> None:
        due = max(due, self._earliest(st))
        self._seq += 1
        st.gen = self._seq
        st.due, st.why = due, why
        heapq.heappush(self._heap, (due, self._seq, st))

    def open_round(self, tier: Tier, now: float) -> int:
        """Place every idle check of ``tier`` at its slot in [now, now + interval)."""
        self.open_round_part(tier, now, 0, len(self._tier_order.get(tier, ())))
        return sum(1 for st in self.states.values()
                   if st.check.tier is tier and st.why == "round" and st.due is not None)

    def open_round_part(self, tier: Tier, round_start: float, first: int, count: int) -> int:
        """Open the round for checks ``first .. first+count`` of the tier in slot order.

        Returns the index to continue from, or -1 when the round is fully open. The shell opens
        big rounds in parts between other loop work: opening 4,000 checks at once stalled the
        loop ~5 ms right when the earliest slots were due (most of the p99 start error).
        """
        policy = self.policy(tier)
        order = self._tier_order.get(tier, [])
        # the jitter is drawn as ``rng.uniform(low, high)`` draws it (``low + (high - low) *
        # random()``), inline: the same slots from the same seed, without a call per check
        low, high = -policy.jitter / 2, policy.jitter / 2
        width, draw, interval = high - low, self.rng.random, policy.interval
        for st in order[first:first + count]:
            if st.running or st.due is not None:
                continue  # busy, or already queued (fast re-probe, cascade)
            slot = st.phase + (low + width * draw())
            # reflected at the round's edges, not clamped: a clamp put every check whose jitter
            # crossed an edge at the same instant, a burst of ~jitter/4 of the tier at each end
            # of every round (most of the p99 start error at 2,000 starts/s)
            if slot < 0.0:
                slot = -slot
            elif slot > _LAST_SLOT:
                slot = 2 * _LAST_SLOT - slot
            if not 0.0 <= slot <= _LAST_SLOT:  # jitter beyond a whole round: clamped after all
                slot = min(max(slot, 0.0), _LAST_SLOT)
            due = round_start + slot * interval
            if due < self._earliest(st):
                continue  # its budget allows no run in this round
            self._queue(st, due, "round")
        nxt = first + count
        return nxt if nxt < len(order) else -1

    def next_due(self) -> float | None:
        heap = self._heap
        while heap:
            due, seq, st = heap[0]
            if st.gen == seq:
                return due
            heapq.heappop(heap)  # stale: re-queued since, popped, or its check removed
        return None

    def pop_due(self, now: float, ahead: float = 0.0) -> list[Due]:
        """Every check due at ``now`` (or within ``ahead`` after it), marked running."""
        out: list[Due] = []
        until = now + ahead
        heap, pop = self._heap, heapq.heappop
        while heap and heap[0][0] <= until:
            due, seq, st = pop(heap)
            if st.gen != seq:
                continue
            st.due, st.running, st.last_start = None, True, now
            check = st.check
            out.append(_tuple_new(Due, (check.key, check, due, st.why, st)))
        return out

    def request(self, key: str, now: float) -> str:
        """The mesh asks for a re-probe of ``key`` now (another vantage saw it fail). Returns
        what became of it: ``honoured``, ``busy`` (running, or already due by now),
        ``unknown`` (no such check here) or ``limited`` (the re-probe budget is spent)."""
        st = self.states.get(key)
        if st is None:
            return "unknown"
        if st.running or (st.due is not None and st.due <= now):
            return "busy"
        if not self.max_reprobe_rate > 0 or now < self._earliest(st):
            return "limited"
        burst = 2 * self.max_reprobe_rate
        self._reprobe_tokens = min(burst, self._reprobe_tokens
                                   + (now - self._reprobe_at) * self.max_reprobe_rate)
        self._reprobe_at = now
        if self._reprobe_tokens < 1:
            return "limited"
        self._reprobe_tokens -= 1
        self._queue(st, now, "reprobe")
        return "honoured"

    def release(self, key: str) -> None:
        """The check finished without an outcome (refused as overloaded, or cancelled)."""
        st = self.states.get(key)
        if st is not None:
            st.running = False

    def timeout_for(self, key: str) -> float:
        """How long the next run of ``key`` may take: the adaptive RTO or the tier's timeout."""
        return self.timeout_of(self.states[key])

    def timeout_of(self, st: CheckState) -> float:
        """:meth:`timeout_for` of a check's state (as :class:`Due` carries it)."""
        configured = st.policy.timeout
        if st.check.tier not in self.adaptive_tiers or st.rtt_samples < RTO_MIN_SAMPLES:
            return configured
        rto = st.srtt + RTO_K * st.rttvar
        return min(max(rto, self.min_timeout), configured)

    def complete(self, key: str, ok: bool, now: float,
                 duration: float | None = None) -> Completion:
        """Record an outcome: rise/fall, fast re-probe, cascade, and (on success) the round
        trip ``duration`` for the adaptive timeout."""
        st = self.states.get(key)
        if st is None:  # removed by a reload while it ran
            return Completion(False, None, ())
        st.running = False
        if ok and duration is not None:
            st.sample_rtt(max(duration, 0.0))  # Karn: a failure (timeout) is no sample
        if ok and st.settled is True and not st.streak and not st.failing:
            # a success of a check settled up (nearly every outcome): nothing changes but its
            # round trip, and nothing is queued (the shell need not re-arm its timer)
            st.last_ok = True
            return STEADY_UP
        changed = False
        first = st.settled is None
        if first:
            # the first outcome settles at once (Envoy: "one success suffices at startup"):
            # fast re-probing every check of a fresh agent would double its start-up load
            st.settled, st.streak = ok, 0  # a first state, not a change: not logged
        elif ok == st.settled:
            st.streak = 0
        else:
            st.streak = st.streak + 1 if st.last_ok == ok else 1
            if st.streak >= (st.policy.rise if ok else st.policy.fall):
                changed = st.settled != ok
                st.settled, st.streak = ok, 0
        st.last_ok = ok
        if st.transitioning and st.policy.fast_interval is not None:
            # fastinter spaces starts: a probe that itself took that long (it timed out) is
            # followed at once, as the wait for the answer already was the pause
            started = now if st.last_start is None else st.last_start
            self._queue(st, max(now, started + st.policy.fast_interval), "fast")
        cascaded: list[str] = []
        if not ok and st.check.tier is Tier.L4:
            cascaded = self._cascade(st.check.node, now)
        failing = st.settled is False or (st.streak > 0 and not ok)
        flipped = failing != st.failing
        st.failing = failing
        return Completion(changed, st.settled, tuple(cascaded), first, failing, flipped)

    def suspect_after(self, key: str) -> float | None:
        """How long a run of functional check ``key`` may go unanswered before the node's L4
        check is probed (:meth:`liveness`): the RTO of its successful runs (RFC 6298; until
        ``RTO_MIN_SAMPLES`` of them, ``min_timeout``) clamped to [``min_timeout``, half its
        timeout]. None for the other tiers."""
        st = self.states.get(key)
        return None if st is None else self.suspect_after_of(st)

    def suspect_after_of(self, st: CheckState) -> float | None:
        """:meth:`suspect_after` of a check's state (as :class:`Due` carries it)."""
        if st.check.tier is not Tier.FUNCTIONAL:
            return None
        rto = st.srtt + RTO_K * st.rttvar if st.rtt_samples >= RTO_MIN_SAMPLES else 0.0
        return min(max(rto, self.min_timeout), st.policy.timeout / 2)

    def liveness(self, key: str, now: float) -> list[str]:
        """Functional check ``key`` is still running past :meth:`suspect_after`: make its node's
        L4 checks due now, so a silent node fails the cheap, fast L4 check instead of being known
        only at the handshake's timeout. Only an L4 check settled up, not on a transition (fast
        re-probes are already on it) and not started within its ``fast_interval``: nothing is
        added for a node known down, or one whose L4 check just answered. Returns the keys."""
        st = self.states.get(key)
        if st is None or not st.running:
            return []
        out = []
        for l4_key in self._by_node.get(st.check.node, ()):
            l4 = self.states[l4_key]
            if (l4.check.tier is not Tier.L4 or l4.running or l4.settled is not True
                    or l4.transitioning or (l4.due is not None and l4.due <= now)):
                continue
            recent = l4.policy.fast_interval or l4.policy.interval
            if l4.last_start is not None and now - l4.last_start < recent:
                continue
            self._queue(l4, now, "liveness")
            out.append(l4_key)
        return out

    def _cascade(self, node: str, now: float) -> list[str]:
        out = []
        for key in self._by_node.get(node, ()):
            f = self.states[key]
            if f.check.tier is not Tier.FUNCTIONAL or f.running:
                continue
            recent = f.policy.fast_interval or f.policy.interval
            if f.last_start is not None and now - f.last_start < recent:
                continue  # just ran: do not hammer a failing node
            if f.due is not None and f.due <= now:
                continue
            self._queue(f, now, "cascade")
            out.append(key)
        return out


# ------------------------------------------------------------------------------- asyncio shell


class ProbeRun(NamedTuple):
    """One finished (or refused) check, for metrics and the reporter."""

    check: PlannedCheck
    result: CheckResult
    wall_time: float  # wall clock at start, Unix seconds
    scheduled: float  # monotonic due time
    started: float  # monotonic actual start
    why: str

    @property
    def lag(self) -> float:
        return self.started - self.scheduled


Runner = Callable[[PlannedCheck, float], Awaitable[CheckResult]]
Sink = Callable[[ProbeRun], None]
# a check's outcome: failing (True) or not, and whether it just settled down
Failing = Callable[[PlannedCheck, bool, bool], None]


async def run_check(check: PlannedCheck, timeout: float) -> CheckResult:
    return await execute(check.kind, check.params, timeout)


@dataclass
class SchedulerStats:
    started_total: int = 0
    overloaded_total: int = 0
    cascades_total: int = 0
    fast_reprobes_total: int = 0
    reprobes_total: int = 0  # started because the mesh asked (corroboration on demand)
    liveness_total: int = 0  # L4 probes started because a functional check ran long
    reprobe_requests: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(REPROBE_RESULTS, 0))
    lag_last: float = 0.0
    lag_max_window: float = 0.0  # max since the last scrape (reset by the metrics collector)
    lag_samples: list[float] = field(default_factory=list)  # bounded ring for the benchmark
    keep_lag_samples: int = 0


class AgentScheduler:
    """Runs a :class:`ScheduleCore` on the event loop with real sockets (or an injected runner)."""

    def __init__(self, core: ScheduleCore, sink: Sink, *, runner: Runner = run_check,
                 max_concurrency: int = 256, per_node_concurrency: int = 4,
                 max_start_lag: float = 0.05, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, use_apscheduler: bool = True) -> None:
        self.core = core
        self.sink = sink
        self.runner = runner
        self.max_start_lag = max_start_lag
        self.clock = clock
        self.wall = wall
        self.use_apscheduler = use_apscheduler
        self.stats = SchedulerStats()
        self.on_failing: Failing | None = None  # e.g. the path tracer's trigger
        self._global = Gate(max_concurrency)
        self._per_node_limit = per_node_concurrency
        self._per_node: dict[str, Gate] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # key -> a run started without a task of the scheduler's, and its node's gate
        self._started: dict[str, tuple[Started, Gate]] = {}
        self._drained: asyncio.Event | None = None  # set when the last of them ends (stop)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._aps: Any = None
        self._round_handles: dict[Tier, asyncio.TimerHandle] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    @property
    def in_flight(self) -> int:
        return len(self._tasks) + len(self._started)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.use_apscheduler:
            from apscheduler.schedulers.asyncio import AsyncIOScheduler  # noqa: PLC0415

            self._aps = AsyncIOScheduler(event_loop=self._loop)
            self._schedule_tier_jobs()
            self._aps.start()
        else:  # rounds driven by plain loop timers (tests of the shell, or APScheduler-less use)
            self._schedule_round_timers()

    def _schedule_tier_jobs(self) -> None:
        assert self._aps is not None
        for job in self._aps.get_jobs():
            job.remove()
        start = datetime.now().astimezone()
        for tier in sorted(self.core.tiers_in_use()):
            interval = self.core.policy(tier).interval
            self._aps.add_job(self._round_job, "interval", seconds=interval, args=[tier],
                              id=f"tier-{tier.value}", next_run_time=start, coalesce=True,
                              max_instances=1, misfire_grace_time=max(int(interval / 2), 1))

    async def _round_job(self, tier: Tier) -> None:
        self.open_round(tier)

    def _schedule_round_timers(self) -> None:
        for handle in self._round_handles.values():
            handle.cancel()
        self._round_handles = {}
        for tier in self.core.tiers_in_use():
            self._round_timer(tier)

    def _round_timer(self, tier: Tier) -> None:
        if self._stopping or self._loop is None:
            return
        self.open_round(tier)
        self._round_handles[tier] = self._loop.call_later(self.core.policy(tier).interval,
                                                          self._round_timer, tier)

    def open_round(self, tier: Tier) -> None:
        self._open_part(tier, self.clock(), 0)

    def _open_part(self, tier: Tier, round_start: float, first: int) -> None:
        if self._stopping or self._loop is None:
            return
        nxt = self.core.open_round_part(tier, round_start, first, ROUND_PART)
        self._arm()
        if nxt >= 0:  # let due probes start between parts
            self._loop.call_soon(self._open_part, tier, round_start, nxt)

    def reload(self, checks: list[PlannedCheck],
               tiers: dict[str, TierPolicy] | None = None) -> LoadReport:
        before = {t: self.core.policy(t).interval for t in self.core.tiers_in_use()}
        report = self.core.load(checks, tiers)
        # a gate per planned node now, not at its first probe: made with the plan, they are
        # frozen out of the garbage collector's sight with it (see probes/agent/runtime.py)
        for node in self.core.nodes():
            self._node_gate(node)
        after = {t: self.core.policy(t).interval for t in self.core.tiers_in_use()}
        if before != after and self._aps is not None:
            self._schedule_tier_jobs()
        elif before != after and self._loop is not None:
            self._schedule_round_timers()
        self._arm()
        return report

    async def stop(self, timeout: float = 15.0) -> None:
        """Start nothing new; let in-flight checks finish (up to ``timeout``)."""
        self._stopping = True
        if self._aps is not None:
            self._aps.shutdown(wait=False)
            self._aps = None
            await asyncio.sleep(0)  # let a round job that is being dispatched finish
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for handle in self._round_handles.values():
            handle.cancel()
        deadline = time.monotonic() + timeout
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        if self._started:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    await self._drained.wait()
        for key, (run, node_gate) in list(self._started.items()):  # cancelled: no report
            run.cancel()
            del self._started[key]
            self.core.release(key)
            node_gate.leave()
            self._global.leave()

    # ---------------------------------------------------------------- dispatch

    def request(self, key: str) -> str:
        """A re-probe the mesh asked for (see :meth:`ScheduleCore.request`); counted."""
        result = self.core.request(key, self.clock())
        self.stats.reprobe_requests[result] += 1
        if result == "honoured":
            self._arm()
        return result

    def _arm(self) -> None:
        if self._stopping or self._loop is None:
            return
        nxt = self.core.next_due()
        if nxt is None or (self._timer is not None and self._timer_at <= nxt):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = nxt
        self._timer = self._loop.call_at(self._loop.time() + (nxt - self.clock()), self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        now = self.clock()
        loop, start_now = self._loop, self._start_now
        assert loop is not None
        for due in self.core.pop_due(now, START_AHEAD):
            if start_now(due):
                continue
            task = loop.create_task(self._run(due))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._arm()

    def _start_now(self, due: Due) -> bool:
        """Start ``due`` from this callback, without a task, when its kind can start a run so
        (:data:`probes.checks.base.Starter`) and both limits have a free slot: what a task, a
        coroutine per layer and a deadline context cost per probe is most of an L4 probe's own
        CPU. False (nothing done) leaves it to :meth:`_run`, which waits for a slot."""
        check = due.check
        kind = check.kind
        if kind.start is None or self.runner is not run_check:
            return False
        # the node's gate is made with the plan (reload): _node_gate only for a check that
        # started before its plan was loaded
        gate, node_gate = self._global, self._per_node.get(check.node)
        if node_gate is None:
            node_gate = self._node_gate(check.node)
        if not gate.try_enter():
            return False
        if not node_gate.try_enter():
            gate.leave()
            return False
        started, wall = self.clock(), self.wall()
        if not self._admit(due, started, wall):
            node_gate.leave()
            gate.leave()
            return True
        core, st = self.core, due.state
        timeout = core.timeout_of(st)
        after = core.suspect_after_of(st)
        watch = None if after is None else self._watch(due.key, after)
        done = partial(self._started_done, due, started, wall, watch)
        run = start_run(kind, check.params, timeout, done)
        if run is None:  # these params need the coroutine: run it in a task of its own
            assert self._loop is not None
            task = self._loop.create_task(self.runner(check, timeout))
            task.add_done_callback(lambda t: None if t.cancelled() else done(t.result()))
            run = task
        self._started[due.key] = (run, node_gate)
        return True

    def _started_done(self, due: Due, started: float, wall: float,
                      watch: asyncio.TimerHandle | None, result: CheckResult) -> None:
        if watch is not None:
            watch.cancel()
        entry = self._started.pop(due.key, None)
        if entry is None:  # cancelled by stop(): its slots are back, it reports nothing
            return
        entry[1].leave()
        self._global.leave()
        if self._drained is not None and not self._started:
            self._drained.set()
        self._complete(due, started, wall, result)

    def _watch(self, key: str, after: float) -> asyncio.TimerHandle | None:
        """A timer for a functional check that runs past its usual time (liveness probe):
        ``after`` is :meth:`ScheduleCore.suspect_after_of`, asked by the caller first, so that
        the L4 checks (most starts, never watched) pay no call for it."""
        if self._loop is None:
            return None
        return self._loop.call_later(after, self._suspect, key)

    def _suspect(self, key: str) -> None:
        if self._stopping:
            return
        made_due = self.core.liveness(key, self.clock())
        if made_due:
            log.debug("liveness: %s unanswered -> %s", key, ",".join(made_due))
            self._arm()

    def _node_gate(self, node: str) -> Gate:
        gate = self._per_node.get(node)
        if gate is None:
            gate = self._per_node[node] = Gate(self._per_node_limit)
        return gate

    async def _run(self, due: Due) -> None:
        check = due.check
        gate, node_gate = self._global, self._node_gate(check.node)
        try:
            if not gate.try_enter():
                await gate.enter()
            try:
                if not node_gate.try_enter():
                    await node_gate.enter()
                try:
                    started = self.clock()
                    wall = self.wall()
                    if not self._admit(due, started, wall):
                        return
                    timeout = self.core.timeout_of(due.state)
                    after = self.core.suspect_after_of(due.state)
                    watch = None if after is None else self._watch(due.key, after)
                    try:
                        result = await self.runner(check, timeout)
                    finally:
                        if watch is not None:
                            watch.cancel()
                finally:
                    node_gate.leave()
            finally:
                gate.leave()
        except asyncio.CancelledError:
            self.core.release(due.key)
            raise
        self._complete(due, started, wall, result)

    def _admit(self, due: Due, started: float, wall: float) -> bool:
        """Count a start; False when it is too late to run (refused as overloaded)."""
        lag = started - due.due
        stats = self.stats
        stats.lag_last = lag
        stats.lag_max_window = max(stats.lag_max_window, lag)
        if stats.keep_lag_samples and len(stats.lag_samples) < stats.keep_lag_samples:
            stats.lag_samples.append(lag)
        if lag > self.max_start_lag:
            self._refuse_late(due, started, wall, lag)
            return False
        stats.started_total += 1
        if due.why != "round":
            stats.fast_reprobes_total += due.why == "fast"
            stats.reprobes_total += due.why == "reprobe"
            stats.liveness_total += due.why == "liveness"
        return True

    def _complete(self, due: Due, started: float, wall: float, result: CheckResult) -> None:
        """What a finished run does: the schedule's response to it, then metrics and report."""
        completion = self.core.complete(due.key, result.ok, self.clock(),
                                        result.duration_seconds)
        if completion is not STEADY_UP:  # a change, or something queued: the rest of the rules
            self._respond(due, result, completion)
        self._deliver(_tuple_new(ProbeRun, (due.check, result, wall, due.due, started, due.why)))

    def _respond(self, due: Due, result: CheckResult, completion: Completion) -> None:
        """Log a cascade or a settled change, tell the failing hook, re-arm for what was
        queued."""
        check = due.check
        if completion.cascaded:
            self.stats.cascades_total += len(completion.cascaded)
            log.info("cascade node=%s check=%s reason=%s -> %s", check.node, check.check,
                     result.reason.value, ",".join(completion.cascaded))
        if completion.settled_changed:
            log.info("settled node=%s check=%s state=%s reason=%s", check.node, check.check,
                     "up" if completion.settled else "down", result.reason.value)
        if self.on_failing is not None and (completion.failing_changed
                                            or completion.settled_changed):
            try:
                down = completion.settled is False and (completion.settled_changed
                                                        or completion.first)
                self.on_failing(check, completion.failing, down)
            except Exception:  # tracing trouble must not stop the schedule
                log.exception("failing hook failed for node=%s check=%s", check.node,
                              check.check)
        self._arm()

    def _deliver(self, run: ProbeRun) -> None:
        try:
            self.sink(run)
        except Exception:  # metrics or reporting trouble must not stop the schedule
            log.exception("result sink failed for node=%s check=%s", run.check.node,
                          run.check.check)

    def _refuse_late(self, due: Due, started: float, wall: float, lag: float) -> None:
        self.core.release(due.key)
        self.stats.overloaded_total += 1
        if self.stats.overloaded_total == 1 or self.stats.overloaded_total % 1000 == 0:
            log.warning("overloaded: node=%s check=%s started %.1f ms late (limit %.1f ms); "
                        "refused %d probes so far", due.check.node, due.check.check,
                        lag * 1000, self.max_start_lag * 1000, self.stats.overloaded_total)
        result = CheckResult(False, Reason.OVERLOADED, 0.0,
                             detail=f"start {lag * 1000:.1f} ms late")
        self._deliver(ProbeRun(due.check, result, wall, due.due, started, due.why))
