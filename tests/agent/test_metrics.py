"""The collector over agent state, read through an injected CollectorRegistry."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.agent.metrics import AgentCollector, ProbeStats, ReporterStats, new_registry
from probes.agent.scheduler import ProbeRun, SchedulerStats
from probes.checks.base import CheckResult
from probes.model import Quality, Reason, Tier

from .fakes import planned

pytestmark = pytest.mark.agent


def _run(node: str, ok: bool, reason: Reason, seconds: float, **kw: object) -> ProbeRun:
    result = CheckResult(ok, reason, seconds, **kw)  # type: ignore[arg-type]
    return ProbeRun(planned(node, Tier.L4), result, 0.0, 1.0, 1.002, "round")


def test_counters_histogram_gauges_and_labels() -> None:
    stats = ProbeStats()
    stats.plan([planned("n1", Tier.L4), planned("n2", Tier.L4)])
    stats.record(_run("n1", True, Reason.OK, 0.12, phases={"connect": 0.12},
                      quality=Quality(sent=5, received=4, loss_ratio=0.2, rtt_p50_seconds=0.03)))
    stats.record(_run("n1", False, Reason.REFUSED, 0.001))
    stats.record(_run("n1", False, Reason.OVERLOADED, 0.0))  # not run: not an attempt
    stats.record(_run("n2", True, Reason.OK, 0.2, facts={"node_active_peers": 12}))
    reporter = ReporterStats(spool_depth=7, dropped_total=3, endpoints=1)
    registry = new_registry(AgentCollector("v1", stats, SchedulerStats, reporter))
    get = registry.get_sample_value
    n1 = {"node": "n1", "pool": "pool-a", "pop": "pop-1", "region": "eu", "check": "tcp",
          "vantage": "v1"}
    assert get("tunnelwatch_probe_attempts_total", n1) == 2
    assert get("tunnelwatch_probe_throughput_bytes_per_second", n1) is None
    assert get("tunnelwatch_probe_failures_total", {**n1, "reason": "refused"}) == 1
    assert get("tunnelwatch_probe_success", n1) == 0
    assert get("tunnelwatch_probe_loss_ratio", n1) == pytest.approx(0.2)
    assert get("tunnelwatch_probe_phase_duration_seconds", {**n1, "phase": "connect"}) == 0.12
    assert get("tunnelwatch_node_active_peers", {**n1, "node": "n2"}) == 12
    hist = {k: v for k, v in n1.items() if k != "node"}
    # 0.12 and 0.001 are <= 0.15 (the SLO edge); 0.2 is not
    assert get("tunnelwatch_probe_duration_seconds_bucket", {**hist, "le": "0.15"}) == 2
    assert get("tunnelwatch_probe_duration_seconds_count", hist) == 3
    assert get("tunnelwatch_scheduler_lag_seconds_count", {"vantage": "v1"}) == 4
    assert get("tunnelwatch_spool_depth_observations", {"vantage": "v1"}) == 7
    assert get("tunnelwatch_spool_dropped_observations_total", {"vantage": "v1"}) == 3
    for metric in registry.collect():
        for sample in metric.samples:
            assert not any(v.startswith("10.") or "/" in v for v in sample.labels.values())
    # a throughput burst's figures
    stats.record(_run("n1", False, Reason.THROUGHPUT_LOW, 1.5, quality=Quality(
        sent=100, received=98, loss_ratio=0.02, throughput_bytes_per_second=25_000.0,
        queueing_delay_seconds=0.04)))
    assert get("tunnelwatch_probe_throughput_bytes_per_second", n1) == 25_000.0
    assert get("tunnelwatch_probe_queueing_delay_seconds", n1) == 0.04
    assert get("tunnelwatch_probe_failures_total", {**n1, "reason": "throughput-below-bound"}) == 1


def test_fast_exposition_is_byte_identical_to_generate_latest() -> None:
    from prometheus_client import generate_latest

    from probes.agent.metrics import render_text
    from probes.agent.plan import PlannedCheck

    odd = PlannedCheck(node="n3", pool='po"ol\\x', pop="pop\n2", region="eu", check="udp:53",
                       kind=planned("n3", Tier.L4).kind, params=None, tier=Tier.L4)
    stats = ProbeStats()
    stats.plan([planned("n1", Tier.L4), odd])
    stats.record(_run("n1", False, Reason.TIMEOUT, 7.0, phases={"connect": 1e-7}))
    stats.record(ProbeRun(odd, CheckResult(True, Reason.OK, 0.5, quality=Quality(
        sent=3, received=3, rtt_p50_seconds=1234567.0, throughput_bytes_per_second=125000.0,
        queueing_delay_seconds=0.0125)), 0.0, 1.0, 1.0, "round"))
    stats.record(ProbeRun(planned("n1", Tier.L4), CheckResult(
        True, Reason.OK, 0.01, facts={"node_active_peers": 3, "node_load": 0.5}),
        0.0, 1.0, 1.0, "round"))
    stats.plan([planned("n1", Tier.L4), odd, planned("n1", Tier.TELEMETRY)])
    stats.record(ProbeRun(planned("n1", Tier.TELEMETRY), CheckResult(
        True, Reason.OK, 0.2, facts={"node_active_peers": 4, "node_reconnects_total": 2}),
        0.0, 1.0, 1.0, "round"))
    stats.record(ProbeRun(planned("n1", Tier.TELEMETRY), CheckResult(
        False, Reason.TIMEOUT, 0.2), 0.0, 1.0, 1.0, "round"))
    collector = AgentCollector("v1", stats, SchedulerStats,
                               ReporterStats(endpoints=2, last_success={"1": 5.0},
                                             batches_total={("0", "ok"): 4}))
    registry = new_registry(collector)
    expected = generate_latest(registry)
    for _ in range(2):  # the second time from the label caches
        assert render_text(registry) == expected
        assert collector.render() == expected


def test_certificate_expiry_fact_becomes_the_gauge_the_alert_reads() -> None:
    """openvpn.tls and tcp+TLS report node_certificate_expiry_timestamp_seconds as a fact; the
    CertificateExpiry alert reads the gauge the agent makes of it."""
    stats = ProbeStats()
    stats.record(_run("n1", True, Reason.OK, 0.01, facts={
        "node_certificate_expiry_timestamp_seconds": 1.9e9, "cert_subject": "CN=x"}))
    registry = new_registry(AgentCollector("v1", stats, SchedulerStats, None))
    labels = {"node": "n1", "pool": "pool-a", "pop": "pop-1", "region": "eu", "check": "tcp",
              "vantage": "v1"}
    assert registry.get_sample_value("tunnelwatch_node_certificate_expiry_timestamp_seconds",
                                     labels) == 1.9e9


def _telemetry(ok: bool, reason: Reason = Reason.OK, **facts: float) -> ProbeRun:
    result = CheckResult(ok, reason, 0.3, facts=dict(facts))
    return ProbeRun(planned("n1", Tier.TELEMETRY), result, 0.0, 1.0, 1.0, "round")


def test_telemetry_reads_are_not_probes_and_their_facts_follow_the_last_read() -> None:
    """A telemetry read counts in tunnelwatch_telemetry_* (never in the probe SLIs); its gauges
    go away when a read fails (an old peer count is not today's), its counters stay."""
    stats = ProbeStats()
    stats.plan([planned("n1", Tier.L4), planned("n1", Tier.TELEMETRY)])
    stats.record(_telemetry(True, node_active_peers=7, node_reconnects_total=3))
    registry = new_registry(AgentCollector("v1", stats, SchedulerStats, None))
    get = registry.get_sample_value
    labels = {"node": "n1", "pool": "pool-a", "pop": "pop-1", "region": "eu",
              "check": "telemetry.fake", "vantage": "v1"}
    assert get("tunnelwatch_telemetry_reads_total", labels) == 1
    assert get("tunnelwatch_probe_attempts_total", labels) is None
    assert get("tunnelwatch_probe_success", labels) is None
    assert get("tunnelwatch_probe_duration_seconds_count",
               {k: v for k, v in labels.items() if k != "node"}) is None
    assert get("tunnelwatch_node_active_peers", labels) == 7
    assert get("tunnelwatch_node_reconnects_total", labels) == 3
    stats.record(_telemetry(False, Reason.TIMEOUT))
    assert get("tunnelwatch_telemetry_read_failures_total", {**labels, "reason": "timeout"}) == 1
    assert get("tunnelwatch_node_active_peers", labels) is None
    assert get("tunnelwatch_node_reconnects_total", labels) == 3
    kinds = {m.name: m.type for m in registry.collect()}
    assert kinds["tunnelwatch_node_reconnects"] == "counter"


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.floats(), st.integers(min_value=-2**60, max_value=2**60),
                 st.sampled_from([0, 0.0, -0.0, 999_999.9, 1e6, -1e6, 1e-7, 1e16, 123456.75])))
def test_value_formatting_is_the_librarys(value: float) -> None:
    """The exposition's values are formatted by go_float, whose fast path (repr inside
    (-1e6, 1e6)) must give what prometheus_client's floatToGoString gives, for every value."""
    from prometheus_client.utils import floatToGoString

    from probes.promtext import go_float

    assert go_float(value) == floatToGoString(value)


def test_recording_through_slots_is_recording_by_labels() -> None:
    """record() finds a check's series and histogram through a slot kept per check; a reload
    that moves a node to another pool (a new check object under the same key), a run of the
    old object finishing after it, and one of a check the reload removed must land where the
    label lookup puts them: the exposition is the same as with every slot forgotten before each
    record."""
    from dataclasses import replace

    from probes.agent.metrics import render_text

    old = planned("n1", Tier.L4)
    moved = replace(old, pool="pool-b")
    other = planned("n2", Tier.L4)
    steps: list[tuple[str, object]] = [
        ("plan", [old, other]),
        ("run", _run("n1", True, Reason.OK, 0.01, phases={"connect": 0.01})),
        ("run", ProbeRun(other, CheckResult(False, Reason.REFUSED, 0.2), 0.0, 1.0, 1.0, "round")),
        ("plan", [moved, other]),
        ("run", ProbeRun(moved, CheckResult(True, Reason.OK, 0.3), 0.0, 1.0, 1.5, "round")),
        ("run", ProbeRun(old, CheckResult(False, Reason.TIMEOUT, 2.0), 0.0, 1.0, 0.9, "round")),
        ("run", ProbeRun(moved, CheckResult(False, Reason.OVERLOADED, 0.0), 0.0, 1.0, 1.0,
                         "round")),
        ("run", ProbeRun(moved, CheckResult(True, Reason.OK, 0.04), 0.0, 1.0, 1.0, "round")),
        ("plan", [moved]),  # n2 removed: its series goes; a run finishing after brings it back
        ("run", ProbeRun(other, CheckResult(True, Reason.OK, 0.05), 0.0, 1.0, 1.0, "round")),
    ]
    bodies = []
    for forget in (False, True):
        stats = ProbeStats()
        for what, arg in steps:
            if what == "plan":
                stats.plan(arg)  # type: ignore[arg-type]
            else:
                if forget:
                    stats._slots.clear()
                stats.record(arg)  # type: ignore[arg-type]
        bodies.append(render_text(new_registry(AgentCollector("v1", stats, SchedulerStats))))
    assert bodies[0] == bodies[1]
    assert b'tunnelwatch_probe_attempts_total{check="tcp",node="n1",pool="pool-b"' in bodies[0]
    assert b'tunnelwatch_probe_success{check="tcp",node="n2"' in bodies[0]
