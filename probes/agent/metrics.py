"""Agent metrics: plain counters updated per probe, exposed by a custom Collector.

Probes finish at thousands per second, so recording one is a few dict operations on plain
integers (:class:`ProbeStats`); the Prometheus families are built only when scraped
(:class:`AgentCollector`, registered on an injected ``CollectorRegistry``).

Labels are bounded by construction: ``node, pool, pop, region, check, vantage`` come from the
config, ``reason`` from the closed :class:`probes.model.Reason` enum, ``tier`` from
:class:`probes.checks.base.Tier`, ``endpoint`` is the mesh endpoint's index in the config.
Never an IP address, a key or error text. Every metric is documented in docs/metrics-agent.md.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from types import MappingProxyType
from typing import Any, cast

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from probes.agent.plan import PlannedCheck
from probes.agent.scheduler import ProbeRun, SchedulerStats
from probes.checks.base import CheckResult
from probes.model import NODE_READ_TIERS, Reason
from probes.promtext import escape_label_value, go_float

# .15 s is the latency SLO edge; client_python's defaults jump from .1 to .25
DURATION_BUCKETS = (.005, .01, .025, .05, .075, .1, .125, .15, .2, .3, .5, 1, 2.5, 5)
LAG_BUCKETS = (.0005, .001, .002, .005, .01, .025, .05, .1, .25, 1)
LINES_PER_PIECE = 32  # exposition lines in one piece of render_parts
CHECK_LABELS = ("node", "pool", "pop", "region", "check", "vantage")

# Facts that become labelled series. Their values are names from the checks' closed tables
# (strongSwan's algorithm tokens, IANA TLS names, the policy's item names), "unknown" otherwise:
# bounded by construction, like every other label here.
CRYPTO_FACT = "crypto."  # crypto.<parameter> = <name>: tunnelwatch_node_crypto_info
POLICY_FACT = "policy."  # policy.<item> = accepted | refused: tunnelwatch_policy_weak_accepted
ACCEPTED, REFUSED = "accepted", "refused"

LabelKey = tuple[str, str, str, str, str]  # node, pool, pop, region, check
HistKey = tuple[str, str, str, str]  # pool, pop, region, check: no node on histograms
HIST_LABELS = ("pool", "pop", "region", "check", "vantage")


def label_key(check: PlannedCheck) -> LabelKey:
    return (check.node, check.pool, check.pop, check.region, check.check)


class Histogram:
    """Bucket counts (not cumulative), sum and count: cheap to observe, built on scrape."""

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            running += count
            out.append((_fmt(bound), float(running)))
        running += self.counts[-1]
        out.append(("+Inf", float(running)))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


def _fmt(bound: float) -> str:
    return repr(float(bound))


# The one empty mapping every series holds until it has something of its own: a 10,000-target
# agent held 50,000 empty dicts (~3 MB) otherwise. Nothing writes into it: the write sites below
# put a dict of the series' own in its place first (or assign a new one). Read-only, so a write
# site that forgot would raise rather than give every series its entry.
_NOTHING = cast(dict[Any, Any], MappingProxyType({}))


def _nothing() -> dict[Any, Any]:
    return _NOTHING


@dataclass(slots=True)
class CheckSeries:
    attempts: int = 0
    failures: dict[str, int] = field(default_factory=_nothing)  # reason -> count
    success: float = math.nan  # last outcome, 1/0
    rtt_p50: float | None = None
    rtt_p99: float | None = None
    loss_ratio: float | None = None
    throughput: float | None = None  # bytes/s a throughput burst got to the far end
    queueing_delay: float | None = None  # its RTT under load minus the idle RTT
    phases: dict[str, float] = field(default_factory=_nothing)
    node_facts: dict[str, float] = field(default_factory=_nothing)
    crypto: dict[str, str] = field(default_factory=_nothing)  # ``crypto.*``: parameter -> name
    policy: dict[str, bool] = field(default_factory=_nothing)  # ``policy.*``: item -> accepted
    telemetry: bool = False  # a telemetry-tier check: counted apart from the probes' SLIs


@dataclass(slots=True)
class _RecordSlot:
    """What :meth:`ProbeStats.record` keeps per check: the check object it was made for, its
    series, and its duration histogram (None until the check's first timed result)."""

    check: PlannedCheck
    series: CheckSeries
    durations: Histogram | None


class ProbeStats:
    """Per-check counters, updated by the scheduler's sink for every finished probe."""

    def __init__(self) -> None:
        self.series: dict[LabelKey, CheckSeries] = {}
        # durations per (pool, pop, region, check): node stays on counters and gauges only, so
        # a 10,000-node agent exports thousands of histogram series, not 150,000
        self.durations: dict[HistKey, Histogram] = {}
        self.overloaded_total = 0
        self.lag = Histogram(LAG_BUCKETS)  # start lag of every probe, refused ones included
        # check.key -> its slot: what record() finds for a run without making and hashing its
        # label tuples. Filled as runs come, emptied by plan() (which may drop series); a run of
        # a check object from before a reload is not its slot's, and is looked up by its labels
        self._slots: dict[str, _RecordSlot] = {}

    def plan(self, checks: Iterable[PlannedCheck]) -> None:
        """Pre-create series for every planned check (attempts start at 0, not absent)."""
        wanted: set[LabelKey] = set()
        for c in checks:
            key = label_key(c)
            wanted.add(key)
            self.series.setdefault(key, CheckSeries(telemetry=c.tier in NODE_READ_TIERS))
        for key in [k for k in self.series if k not in wanted]:
            del self.series[key]
        hist_keys = {k[1:] for k in wanted}
        for hkey in [k for k in self.durations if k not in hist_keys]:
            del self.durations[hkey]
        self._slots.clear()

    def _slot(self, check: PlannedCheck) -> _RecordSlot:
        key = label_key(check)
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = CheckSeries()
        slot = self._slots[check.key] = _RecordSlot(check, s, self.durations.get(key[1:]))
        return slot

    def record(self, run: ProbeRun) -> None:
        check, result = run.check, run.result
        slot = self._slots.get(check.key)
        if slot is None or slot.check is not check:
            slot = self._slot(check)
        s = slot.series
        lag = run.started - run.scheduled
        self.lag.observe(lag if lag > 0.0 else 0.0)
        if result.reason is Reason.OVERLOADED:
            # the agent did not run it: not an attempt against the node
            self.overloaded_total += 1
            return
        s.attempts += 1
        if not result.ok:
            if s.failures is _NOTHING:
                s.failures = {}
            reason = result.reason.value
            s.failures[reason] = s.failures.get(reason, 0) + 1
        if check.tier in NODE_READ_TIERS:
            s.telemetry = True
            self._record_facts(s, result)
            return
        s.success = 1.0 if result.ok else 0.0
        hist = slot.durations
        if hist is None:
            hist = slot.durations = self.durations.setdefault(label_key(check)[1:],
                                                              Histogram(DURATION_BUCKETS))
        hist.observe(result.duration_seconds)
        if result.phases:
            s.phases = result.phases
        q = result.quality
        if q is not None:
            s.rtt_p50, s.rtt_p99 = q.rtt_p50_seconds, q.rtt_p99_seconds
            s.loss_ratio = q.loss_ratio if q.sent else None
            s.throughput, s.queueing_delay = (q.throughput_bytes_per_second,
                                              q.queueing_delay_seconds)
        if result.facts or not result.ok:  # else nothing to keep or withdraw: no call (L4)
            self._record_facts(s, result)

    @staticmethod
    def _record_facts(s: CheckSeries, result: CheckResult) -> None:
        """Numeric facts named ``node_*`` become node gauges (counters if named ``*_total``).
        A failed read withdraws the gauges — an old peer count is not today's — and keeps the
        counters, whose next value continues them."""
        if not result.ok and s.telemetry:
            for name in [n for n in s.node_facts if not n.endswith("_total")]:
                del s.node_facts[name]
        if not result.facts:
            return
        crypto: dict[str, str] = {}
        policy: dict[str, bool] = {}
        for name, value in result.facts.items():
            if name.startswith("node_") and isinstance(value, int | float) and not isinstance(
                    value, bool):
                if s.node_facts is _NOTHING:
                    s.node_facts = {}
                s.node_facts[name] = float(value)
            elif name.startswith(CRYPTO_FACT) and isinstance(value, str):
                crypto[name.removeprefix(CRYPTO_FACT)] = value
            elif name.startswith(POLICY_FACT) and value in (ACCEPTED, REFUSED):
                policy[name.removeprefix(POLICY_FACT)] = value == ACCEPTED
        # what a node negotiated and accepted: the last probe that learnt it says (a failed
        # probe learnt nothing new, and a node's policy does not vanish when it is down)
        if crypto:
            s.crypto = crypto
        if policy:
            s.policy = policy


@dataclass
class ReporterStats:
    """Filled by the reporter and its spool."""

    spool_depth: int = 0  # observations waiting on disk
    spool_bytes: int = 0
    spool_capacity_bytes: int = 0
    dropped_total: int = 0  # observations dropped because the spool was full
    sent_total: dict[str, int] = field(default_factory=dict)  # endpoint index -> observations
    batches_total: dict[tuple[str, str], int] = field(default_factory=dict)  # (endpoint, result)
    last_success: dict[str, float] = field(default_factory=dict)  # endpoint -> unix time
    endpoints: int = 0
    traces_sent_total: dict[str, int] = field(default_factory=dict)  # endpoint index -> traces
    traces_dropped_total: dict[str, int] = field(default_factory=dict)  # reason -> traces


@dataclass
class TracerStats:
    """Filled by the path tracer (probes/agent/tracer.py)."""

    traces_total: dict[tuple[str, str], int] = field(default_factory=dict)  # (trigger, outcome)
    packets_total: int = 0
    cpu_seconds_total: float = 0.0  # the tracing code's own CPU on the event loop
    in_flight: int = 0
    unavailable: str = ""  # why this host cannot trace, once it found out
    baseline_demand_per_second: float = 0.0  # nodes / baseline_interval, at the last plan
    budget_per_second: float = 0.0  # max_per_minute / 60, every trigger together
    oldest_due: float | None = None  # (clock) when the most overdue waiting trace fell due
    clock: Callable[[], float] = time.monotonic  # the tracer's

    def backlog_seconds(self) -> float:
        """How late the most overdue waiting re-trace or baseline is now (0: none is due)."""
        due = self.oldest_due
        return 0.0 if due is None else max(0.0, self.clock() - due)

    def count(self, trigger: str, outcome: str) -> None:
        key = (trigger, outcome)
        self.traces_total[key] = self.traces_total.get(key, 0) + 1


class AgentCollector(Collector):
    """Builds every ``tunnelwatch_*`` family from agent state at scrape time."""

    def __init__(self, vantage: str, probes: ProbeStats, scheduler: Callable[[], SchedulerStats],
                 reporter: ReporterStats | None = None,
                 scheduler_info: Callable[[], dict[str, float]] | None = None, *,
                 tracer: TracerStats | None = None) -> None:
        self.vantage = vantage
        self.probes = probes
        self.scheduler = scheduler
        self.reporter = reporter
        self.tracer = tracer
        self.scheduler_info = scheduler_info or dict
        self._frag_cache: dict[LabelKey, tuple[str, str, str]] = {}
        self._frag_shared: dict[str, str] = {}

    def describe(self) -> Iterator[Metric]:
        # names only: lets registration catch duplicates without calling collect()
        yield from self._families(empty=True)

    def collect(self) -> Iterator[Metric]:
        yield from self._families(empty=False)

    def _families(self, empty: bool) -> Iterator[Metric]:
        labels = list(CHECK_LABELS)
        attempts = CounterMetricFamily("tunnelwatch_probe_attempts",
                                       "Probes run against a node (refused ones excluded).",
                                       labels=labels)
        failures = CounterMetricFamily("tunnelwatch_probe_failures",
                                       "Failed probes by closed-enum reason.",
                                       labels=[*labels, "reason"])
        duration = HistogramMetricFamily("tunnelwatch_probe_duration_seconds",
                                         "Probe wall time (monotonic clock), per check across "
                                         "the nodes of a pool.", labels=list(HIST_LABELS))
        success = GaugeMetricFamily("tunnelwatch_probe_success",
                                    "Outcome of the last probe (1 ok, 0 failed).", labels=labels)
        phase = GaugeMetricFamily("tunnelwatch_probe_phase_duration_seconds",
                                  "Duration of each phase of the last probe.",
                                  labels=[*labels, "phase"])
        rtt50 = GaugeMetricFamily("tunnelwatch_probe_rtt_p50_seconds",
                                  "Median RTT of the last probe's exchanges (in-tunnel for "
                                  "session checks; kernel timestamps where available).",
                                  labels=labels)
        rtt99 = GaugeMetricFamily("tunnelwatch_probe_rtt_p99_seconds",
                                  "99th percentile RTT of the last probe's exchanges.",
                                  labels=labels)
        loss = GaugeMetricFamily("tunnelwatch_probe_loss_ratio",
                                 "Share of the last probe's exchanges that got no reply (0..1).",
                                 labels=labels)
        throughput = GaugeMetricFamily("tunnelwatch_probe_throughput_bytes_per_second",
                                       "Inner IP bytes per second the last throughput burst "
                                       "got to the reflector beyond the node.", labels=labels)
        queueing = GaugeMetricFamily("tunnelwatch_probe_queueing_delay_seconds",
                                     "The last throughput burst's median RTT minus the idle "
                                     "RTT before it.", labels=labels)
        reads = CounterMetricFamily("tunnelwatch_telemetry_reads",
                                    "Node telemetry reads (telemetry.* checks; not probes).",
                                    labels=labels)
        read_failures = CounterMetricFamily("tunnelwatch_telemetry_read_failures",
                                            "Failed node telemetry reads by closed-enum reason.",
                                            labels=[*labels, "reason"])
        facts: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        if not empty:
            # list() copies: the loop records probes between the pieces /metrics takes
            for key, s in list(self.probes.series.items()):
                values = [*key, self.vantage]
                counted, failed = (reads, read_failures) if s.telemetry else (attempts, failures)
                counted.add_metric(values, s.attempts)
                for reason, count in list(s.failures.items()):
                    failed.add_metric([*values, reason], count)
                if not math.isnan(s.success):
                    success.add_metric(values, s.success)
                for name, seconds in s.phases.items():
                    phase.add_metric([*values, name], seconds)
                if s.rtt_p50 is not None:
                    rtt50.add_metric(values, s.rtt_p50)
                if s.rtt_p99 is not None:
                    rtt99.add_metric(values, s.rtt_p99)
                if s.loss_ratio is not None:
                    loss.add_metric(values, s.loss_ratio)
                if s.throughput is not None:
                    throughput.add_metric(values, s.throughput)
                if s.queueing_delay is not None:
                    queueing.add_metric(values, s.queueing_delay)
                for name, value in list(s.node_facts.items()):
                    fam = facts.get(name)
                    if fam is None:
                        kind = (CounterMetricFamily if name.endswith("_total")
                                else GaugeMetricFamily)
                        fam = facts[name] = kind(f"tunnelwatch_{name}", _fact_doc(name),
                                                 labels=labels)
                    fam.add_metric(values, value)
            for hkey, hist in list(self.probes.durations.items()):
                duration.add_metric([*hkey, self.vantage], hist.cumulative(), hist.sum)
        yield from (attempts, failures, duration, success, phase, rtt50, rtt99, loss, throughput,
                    queueing, reads, read_failures)
        yield from facts.values()
        yield from self._crypto_families(empty)
        yield from self._scheduler_families(empty)
        if self.reporter is not None:
            yield from self._reporter_families(self.reporter, empty)
        if self.tracer is not None:
            yield from self._tracer_families(self.tracer, empty)

    # ---------------------------------------------------------------- fast exposition

    def render(self) -> bytes:
        """Everything :meth:`collect` exposes, as text, byte for byte what ``generate_latest``
        writes — but the per-check families are written straight from agent state with label
        text cached per series, instead of building ~40,000 sample objects for a 10,000-target
        agent on every scrape (3-5x less CPU, and no transient tens of MB)."""
        return "".join(self.render_parts()).encode("utf-8")

    def render_parts(self) -> Iterator[str]:
        """:meth:`render`'s text in small pieces (a line, a family header), made as they are
        asked for: /metrics takes them on the event loop between due probes (see
        probes/agent/http.py), since rendering 4,000 targets at once, even on another thread
        of the same core, held probe starts back by tens of ms (the start error's p99)."""
        heads = {m.name: m for m in self._families(empty=True)}
        every = [(self._fragments(key), s) for key, s in list(self.probes.series.items())]
        series = [(f, s) for f, s in every if not s.telemetry]
        telemetry = [(f, s) for f, s in every if s.telemetry]
        g = go_float

        def family(name: str, lines: Iterable[str]) -> Iterator[str]:
            yield _header(heads[name])[1]
            yield from _joined(lines)

        yield from family("tunnelwatch_probe_attempts", (
            f"tunnelwatch_probe_attempts_total{{{cn},{pp},{rv}}} {g(s.attempts)}\n"
            for (cn, pp, rv), s in series))
        yield from family("tunnelwatch_probe_failures", (
            f"tunnelwatch_probe_failures_total{{{cn},{pp},reason=\"{escape_label_value(r)}\","
            f"{rv}}} {g(n)}\n"
            for (cn, pp, rv), s in series for r, n in list(s.failures.items())))
        yield from family("tunnelwatch_probe_duration_seconds", self._duration_lines())
        yield from family("tunnelwatch_probe_success", (
            f"tunnelwatch_probe_success{{{cn},{pp},{rv}}} {g(s.success)}\n"
            for (cn, pp, rv), s in series if not math.isnan(s.success)))
        yield from family("tunnelwatch_probe_phase_duration_seconds", (
            f"tunnelwatch_probe_phase_duration_seconds{{{cn},phase=\"{escape_label_value(p)}\","
            f"{pp},{rv}}} {g(v)}\n"
            for (cn, pp, rv), s in series for p, v in list(s.phases.items())))
        for name, attr in (("tunnelwatch_probe_rtt_p50_seconds", "rtt_p50"),
                           ("tunnelwatch_probe_rtt_p99_seconds", "rtt_p99"),
                           ("tunnelwatch_probe_loss_ratio", "loss_ratio"),
                           ("tunnelwatch_probe_throughput_bytes_per_second", "throughput"),
                           ("tunnelwatch_probe_queueing_delay_seconds", "queueing_delay")):
            yield from family(name, (f"{name}{{{cn},{pp},{rv}}} {g(value)}\n"
                                     for (cn, pp, rv), s in series
                                     if (value := getattr(s, attr)) is not None))
        yield from family("tunnelwatch_telemetry_reads", (
            f"tunnelwatch_telemetry_reads_total{{{cn},{pp},{rv}}} {g(s.attempts)}\n"
            for (cn, pp, rv), s in telemetry))
        yield from family("tunnelwatch_telemetry_read_failures", (
            f"tunnelwatch_telemetry_read_failures_total{{{cn},{pp},"
            f"reason=\"{escape_label_value(r)}\",{rv}}} {g(n)}\n"
            for (cn, pp, rv), s in telemetry for r, n in list(s.failures.items())))
        facts: dict[str, list[str]] = {}
        for (cn, pp, rv), s in every:
            for name, value in list(s.node_facts.items()):
                facts.setdefault(name, []).append(
                    f"tunnelwatch_{name}{{{cn},{pp},{rv}}} {g(value)}\n")
        for name, lines in facts.items():
            kind = "counter" if name.endswith("_total") else "gauge"
            yield (f"# HELP tunnelwatch_{name} {_fact_doc(name)}\n"
                   f"# TYPE tunnelwatch_{name} {kind}\n")
            yield from _joined(lines)
        rest: list[Metric] = [*self._crypto_families(empty=False),
                              *self._scheduler_families(empty=False)]
        if self.reporter is not None:
            rest.extend(self._reporter_families(self.reporter, empty=False))
        if self.tracer is not None:
            rest.extend(self._tracer_families(self.tracer, empty=False))
        for metric in rest:
            out: list[str] = []
            format_family(metric, out)
            yield "".join(out)

    def _fragments(self, key: LabelKey) -> tuple[str, str, str]:
        """Label text of a series in three sorted runs (check,node | pool,pop | region,vantage)
        so ``phase`` and ``reason`` slot in where sorting puts them."""
        frags = self._frag_cache.get(key)
        if frags is None:
            if len(self._frag_cache) > 2 * len(self.probes.series) + 1000:
                self._frag_cache.clear()
                self._frag_shared.clear()
            e = escape_label_value
            node, pool, pop, region, check = key
            # the pool/pop and region/vantage runs are shared by many series: one string each
            shared = self._frag_shared
            pool_pop = f'pool="{e(pool)}",pop="{e(pop)}"'
            region_vantage = f'region="{e(region)}",vantage="{e(self.vantage)}"'
            frags = self._frag_cache[key] = (
                f'check="{e(check)}",node="{e(node)}"',
                shared.setdefault(pool_pop, pool_pop),
                shared.setdefault(region_vantage, region_vantage))
        return frags

    def _duration_lines(self) -> Iterator[str]:
        e, g = escape_label_value, go_float
        name = "tunnelwatch_probe_duration_seconds"
        for (pool, pop, region, check), hist in list(self.probes.durations.items()):
            head = f'check="{e(check)}"'
            rest = (f'pool="{e(pool)}",pop="{e(pop)}",region="{e(region)}",'
                    f'vantage="{e(self.vantage)}"')
            buckets = hist.cumulative()
            for le, count in buckets:
                yield f'{name}_bucket{{{head},le="{le}",{rest}}} {g(count)}\n'
            yield f"{name}_count{{{head},{rest}}} {g(buckets[-1][1])}\n"
            yield f"{name}_sum{{{head},{rest}}} {g(hist.sum)}\n"

    def _crypto_families(self, empty: bool) -> Iterator[Metric]:
        """What each node negotiated (functional probes) and which weak choices it accepted
        (policy scans): few series, built the ordinary way on both exposition paths."""
        labels = list(CHECK_LABELS)
        info = GaugeMetricFamily("tunnelwatch_node_crypto_info",
                                 "What the node negotiated with the last probe that got that far "
                                 "(value 1): one series per parameter.",
                                 labels=[*labels, "parameter", "value"])
        weak = GaugeMetricFamily("tunnelwatch_policy_weak_accepted",
                                 "Policy scan: 1 when the node accepted this deprecated choice "
                                 "offered alone, 0 when it refused it.",
                                 labels=[*labels, "item"])
        if not empty:
            for key, s in list(self.probes.series.items()):
                values = [*key, self.vantage]
                for parameter, name in list(s.crypto.items()):
                    info.add_metric([*values, parameter, name], 1.0)
                for item, accepted in list(s.policy.items()):
                    weak.add_metric([*values, item], 1.0 if accepted else 0.0)
        yield info
        yield weak

    def _scheduler_families(self, empty: bool) -> Iterator[Metric]:
        v = ["vantage"]
        lag = HistogramMetricFamily(
            "tunnelwatch_scheduler_lag_seconds",
            "How late each probe started relative to its scheduled slot.",
            labels=v)
        overloaded = CounterMetricFamily(
            "tunnelwatch_scheduler_overloaded",
            "Probes not run because they could not start within max_start_lag.", labels=v)
        started = CounterMetricFamily("tunnelwatch_scheduler_started",
                                      "Probes started by the scheduler.", labels=v)
        cascades = CounterMetricFamily("tunnelwatch_scheduler_cascades",
                                       "Functional checks triggered by an L4 failure.", labels=v)
        fast = CounterMetricFamily("tunnelwatch_scheduler_fast_reprobes",
                                   "Probes run at fast_interval during a state transition.",
                                   labels=v)
        reprobes = CounterMetricFamily("tunnelwatch_scheduler_reprobes",
                                       "Probes started because the mesh asked (another vantage "
                                       "saw the check fail).", labels=v)
        liveness = CounterMetricFamily("tunnelwatch_scheduler_liveness_probes",
                                       "L4 probes started because a functional check of the "
                                       "node went unanswered past its usual time.", labels=v)
        requests = CounterMetricFamily("tunnelwatch_scheduler_reprobe_requests",
                                       "Re-probe requests from the mesh by what became of them "
                                       "(honoured, busy, unknown, limited, disabled).",
                                       labels=[*v, "result"])
        in_flight = GaugeMetricFamily("tunnelwatch_scheduler_in_flight",
                                      "Probes running now.", labels=v)
        refused = GaugeMetricFamily("tunnelwatch_scheduler_refused_checks",
                                    "Configured checks refused by admission control "
                                    "(planned rate above max_probe_rate).", labels=v)
        rate = GaugeMetricFamily("tunnelwatch_scheduler_planned_probes_per_second",
                                 "Admitted probe start rate (sum of 1/interval).", labels=v)
        if not empty:
            stats = self.scheduler()
            info = self.scheduler_info()
            lag.add_metric([self.vantage], self.probes.lag.cumulative(), self.probes.lag.sum)
            overloaded.add_metric([self.vantage], stats.overloaded_total)
            started.add_metric([self.vantage], stats.started_total)
            cascades.add_metric([self.vantage], stats.cascades_total)
            fast.add_metric([self.vantage], stats.fast_reprobes_total)
            reprobes.add_metric([self.vantage], stats.reprobes_total)
            liveness.add_metric([self.vantage], stats.liveness_total)
            for result, count in stats.reprobe_requests.items():
                requests.add_metric([self.vantage, result], count)
            in_flight.add_metric([self.vantage], info.get("in_flight", 0.0))
            refused.add_metric([self.vantage], info.get("refused", 0.0))
            rate.add_metric([self.vantage], info.get("planned_rate", 0.0))
        yield from (lag, overloaded, started, cascades, fast, reprobes, liveness, requests,
                    in_flight, refused, rate)

    def _reporter_families(self, r: ReporterStats, empty: bool) -> Iterator[Metric]:
        v = ["vantage"]
        depth = GaugeMetricFamily("tunnelwatch_spool_depth_observations",
                                  "Observations in the on-disk spool not yet accepted by every "
                                  "mesh endpoint.", labels=v)
        size = GaugeMetricFamily("tunnelwatch_spool_bytes", "Bytes used by the spool.", labels=v)
        cap = GaugeMetricFamily("tunnelwatch_spool_capacity_bytes", "Spool size limit.",
                                labels=v)
        dropped = CounterMetricFamily("tunnelwatch_spool_dropped_observations",
                                      "Observations dropped because the spool was full.",
                                      labels=v)
        sent = CounterMetricFamily("tunnelwatch_report_observations",
                                   "Observations accepted by a mesh endpoint.",
                                   labels=[*v, "endpoint"])
        batches = CounterMetricFamily("tunnelwatch_report_batches",
                                      "Batch POSTs by endpoint and result: ok, duplicate "
                                      "(committed earlier), refused (a newer epoch of this agent "
                                      "at the mesh: kept and sent again), rejected (dropped), "
                                      "error.",
                                      labels=[*v, "endpoint", "result"])
        last = GaugeMetricFamily("tunnelwatch_report_last_success_timestamp_seconds",
                                 "Unix time of the last batch an endpoint accepted.",
                                 labels=[*v, "endpoint"])
        if not empty:
            vv = [self.vantage]
            depth.add_metric(vv, r.spool_depth)
            size.add_metric(vv, r.spool_bytes)
            cap.add_metric(vv, r.spool_capacity_bytes)
            dropped.add_metric(vv, r.dropped_total)
            for endpoint in (str(i) for i in range(r.endpoints)):
                sent.add_metric([*vv, endpoint], r.sent_total.get(endpoint, 0))
                if endpoint in r.last_success:
                    last.add_metric([*vv, endpoint], r.last_success[endpoint])
            for (endpoint, result), count in list(r.batches_total.items()):
                batches.add_metric([*vv, endpoint, result], count)
        yield from (depth, size, cap, dropped, sent, batches, last)
        traces_sent = CounterMetricFamily("tunnelwatch_report_traces",
                                          "Path traces accepted by a mesh endpoint.",
                                          labels=[*v, "endpoint"])
        traces_dropped = CounterMetricFamily(
            "tunnelwatch_report_traces_dropped",
            "Path traces not delivered: the queue was full, or a mesh refused them.",
            labels=[*v, "reason"])
        if not empty:
            vv = [self.vantage]
            for endpoint, count in list(r.traces_sent_total.items()):
                traces_sent.add_metric([*vv, endpoint], count)
            for reason, count in list(r.traces_dropped_total.items()):
                traces_dropped.add_metric([*vv, reason], count)
        yield from (traces_sent, traces_dropped)

    def _tracer_families(self, t: TracerStats, empty: bool) -> Iterator[Metric]:
        v = ["vantage"]
        traces = CounterMetricFamily("tunnelwatch_path_traces",
                                     "Path traces by trigger (change, failing, baseline) and "
                                     "outcome (ok, error, unavailable).",
                                     labels=[*v, "trigger", "outcome"])
        packets = CounterMetricFamily("tunnelwatch_path_trace_packets",
                                      "Probe packets the path traces sent.", labels=v)
        cpu = CounterMetricFamily("tunnelwatch_path_trace_cpu_seconds",
                                  "CPU the path tracing code took on the agent's event loop.",
                                  labels=v)
        in_flight = GaugeMetricFamily("tunnelwatch_path_traces_in_flight",
                                      "Path traces running now.", labels=v)
        available = GaugeMetricFamily("tunnelwatch_path_tracing_available",
                                      "0 once the agent found it cannot trace (no raw sockets).",
                                      labels=v)
        backlog = GaugeMetricFamily("tunnelwatch_path_trace_backlog_seconds",
                                    "How late the most overdue re-trace or baseline waiting for "
                                    "the budget or a concurrency slot is (0: none is due).",
                                    labels=v)
        demand = GaugeMetricFamily("tunnelwatch_path_trace_baseline_demand_per_second",
                                   "Baseline traces per second the plan asks for (nodes / "
                                   "baseline_interval).", labels=v)
        budget = GaugeMetricFamily("tunnelwatch_path_trace_budget_per_second",
                                   "Traces per second max_per_minute allows, every trigger "
                                   "together.", labels=v)
        if not empty:
            vv = [self.vantage]
            for (trigger, outcome), count in list(t.traces_total.items()):
                traces.add_metric([*vv, trigger, outcome], count)
            packets.add_metric(vv, t.packets_total)
            cpu.add_metric(vv, t.cpu_seconds_total)
            in_flight.add_metric(vv, t.in_flight)
            available.add_metric(vv, 0 if t.unavailable else 1)
            backlog.add_metric(vv, t.backlog_seconds())
            demand.add_metric(vv, t.baseline_demand_per_second)
            budget.add_metric(vv, t.budget_per_second)
        yield from (traces, packets, cpu, in_flight, available, backlog, demand, budget)


def _joined(lines: Iterable[str]) -> Iterator[str]:
    """``lines`` in pieces of ``LINES_PER_PIECE`` joined: a piece is a few tens of µs of
    rendering, short enough between two looks at due probes (probes/agent/http.py), and one
    piece per line cost each line a trip through three generators and the joining loop."""
    it = iter(lines)
    while piece := "".join(islice(it, LINES_PER_PIECE)):
        yield piece


def _fact_doc(name: str) -> str:
    return f"Node telemetry: {name}."


def new_registry(collector: AgentCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    return registry


# ------------------------------------------------------------------------------- exposition

_LABEL_CACHE: dict[tuple[tuple[str, str], ...], str] = {}
_LABEL_CACHE_MAX = 500_000


def _label_text(labels: dict[str, str]) -> str:
    key = tuple(labels.items())
    text = _LABEL_CACHE.get(key)
    if text is None:
        if len(_LABEL_CACHE) >= _LABEL_CACHE_MAX:
            _LABEL_CACHE.clear()
        inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in sorted(key))
        text = _LABEL_CACHE[key] = "{" + inner + "}" if inner else ""
    return text


def _header(metric: Metric) -> tuple[str, str]:
    """(exposed name, HELP/TYPE lines) as ``generate_latest`` writes them."""
    name, kind = metric.name, metric.type
    if kind == "counter":
        name += "_total"
    elif kind == "unknown":
        kind = "untyped"
    doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
    return doc, f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


def format_family(metric: Metric, out: list[str]) -> None:
    """Append one family in text format 0.0.4, as ``generate_latest`` would."""
    doc, header = _header(metric)
    out.append(header)
    extra: dict[str, list[str]] = {}
    for sample in metric.samples:
        line = f"{sample.name}{_label_text(sample.labels)} {go_float(sample.value)}\n"
        for suffix in ("_created", "_gsum", "_gcount"):
            if sample.name == metric.name + suffix:
                extra.setdefault(suffix, []).append(line)
                break
        else:
            out.append(line)
    for suffix, lines in sorted(extra.items()):
        out.append(f"# HELP {metric.name}{suffix} {doc}\n"
                   f"# TYPE {metric.name}{suffix} gauge\n")
        out.extend(lines)


def render_text(registry: CollectorRegistry) -> bytes:
    """Prometheus text format 0.0.4, byte for byte what ``generate_latest`` writes for these
    families (counter, gauge, histogram; legacy metric names; no timestamps), with label text
    cached across scrapes."""
    out: list[str] = []
    for metric in registry.collect():
        format_family(metric, out)
    return "".join(out).encode("utf-8")
