"""When the agent traces (probes/agent/tracer.py): triggers, limits, priorities, which flow."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import pytest

from probes.agent.metrics import AgentCollector, ProbeStats, TracerStats, new_registry
from probes.agent.plan import PlannedCheck, plan
from probes.agent.scheduler import SchedulerStats
from probes.agent.tracer import TracePlanner, Tracer, TraceTarget, trace_targets
from probes.config import AgentConfig, TracingConfig, parse_yaml
from probes.model import TraceProtocol, TraceTrigger

pytestmark = pytest.mark.paths


def targets(*nodes: str) -> dict[str, TraceTarget]:
    return {n: TraceTarget(n, f"10.0.0.{i + 1}", TraceProtocol.UDP, 51820)
            for i, n in enumerate(nodes)}


def planner(nodes: int = 3, **policy: Any) -> TracePlanner:
    base = {"baseline_interval": 600.0, "failing_interval": 120.0, "min_interval": 30.0,
            "max_per_minute": 60.0, "concurrency": 2}
    base.update(policy)
    p = TracePlanner(TracingConfig(**base), 0.0)
    p.load(targets(*[f"n{i}" for i in range(nodes)]), 0.0)
    return p


def started(p: TracePlanner, now: float) -> list[tuple[str, TraceTrigger, bool]]:
    jobs = p.take(now)
    for job in jobs:
        p.finished(job.target.node, now)
    return [(j.target.node, j.trigger, j.failing) for j in jobs]


def test_an_opinion_change_is_traced_at_once() -> None:
    p = planner(baseline_interval=0.0)
    assert p.check_failing("n1", "wg", True, 5.0)  # the node's first failing check
    assert started(p, 5.0) == [("n1", TraceTrigger.CHANGE, True)]
    assert not p.check_failing("n1", "mtu", True, 6.0)  # still failing: no new opinion
    assert p.check_failing("n1", "wg", False, 7.0) is False  # mtu still down
    assert p.check_failing("n1", "mtu", False, 8.0)  # every check up again: a change
    assert started(p, 8.0) == []  # within min_interval of the last trace: it waits ...
    due = p.next_due(8.0)
    assert due == pytest.approx(35.0)
    assert started(p, 35.0) == [("n1", TraceTrigger.CHANGE, False)]  # ... then runs


def test_changes_wait_for_the_bucket_and_concurrency() -> None:
    p = planner(nodes=10, max_per_minute=6.0, concurrency=2)  # a burst of one
    for i in range(4):
        p.check_failing(f"n{i}", "wg", True, 1.0)
    first = p.take(1.0)
    assert [j.target.node for j in first] == ["n0"]
    assert p.take(1.0) == []  # the bucket is empty
    assert p.next_due(1.0) == pytest.approx(11.0)  # one token per 10 s
    p.finished("n0", 2.0)
    assert [j.target.node for j in p.take(11.0)] == ["n1"]
    assert p.take(21.0)  # n2: one more token; two in flight now
    p.max_per_minute = 600.0  # (a policy reload would do this)
    p.policy = TracingConfig(max_per_minute=600.0, concurrency=2, min_interval=30.0)
    assert p.take(31.0) == []  # two in flight: the concurrency limit
    assert p.next_due(31.0) is None  # until one ends (which wakes the shell), not every ms


def test_baselines_are_spread_over_the_interval_and_restart_after_any_trace() -> None:
    p = planner(nodes=50, max_per_minute=10_000.0, concurrency=100)
    times = []
    now = 0.0
    while now <= 600.0:
        for node, trigger, _ in started(p, now):
            assert trigger is TraceTrigger.BASELINE
            times.append((now, node))
        now += 1.0
    assert len({n for _, n in times}) == 50  # every node once in the first interval
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(times)]
    assert max(gaps) <= 13  # evenly spread: one every 12 s, not in bursts
    # a change trace restarts the node's baseline clock
    p2 = planner(nodes=1, baseline_interval=100.0)
    p2.check_failing("n0", "wg", True, 1.0)
    started(p2, 1.0)
    p2.check_failing("n0", "wg", False, 50.0)
    assert started(p2, 50.0) == [("n0", TraceTrigger.CHANGE, False)]
    assert started(p2, 120.0) == []  # the old baseline due time no longer counts
    assert started(p2, 150.0) == [("n0", TraceTrigger.BASELINE, False)]


def test_a_failing_node_is_traced_again_while_it_fails() -> None:
    p = planner(nodes=1, baseline_interval=0.0)
    p.check_failing("n0", "wg", True, 0.0)
    assert started(p, 0.0) == [("n0", TraceTrigger.CHANGE, True)]
    assert started(p, 119.0) == []
    assert started(p, 120.0) == [("n0", TraceTrigger.FAILING, True)]
    p.check_failing("n0", "wg", False, 130.0)
    assert started(p, 130.0) == []  # min_interval after the last trace
    assert started(p, 150.0) == [("n0", TraceTrigger.CHANGE, False)]
    assert started(p, 1000.0) == []  # healthy, baseline off: nothing


def test_changes_go_before_baselines() -> None:
    p = planner(nodes=3, baseline_interval=1.0, concurrency=1, max_per_minute=6000.0)
    p.check_failing("n2", "wg", True, 5.0)
    assert started(p, 5.0)[0][:2] == ("n2", TraceTrigger.CHANGE)


def test_a_reload_keeps_the_nodes_that_stay() -> None:
    p = planner(nodes=2)
    p.check_failing("n0", "wg", True, 1.0)
    p.load(targets("n0", "n9"), 2.0)
    assert set(p.nodes) == {"n0", "n9"} and p.nodes["n0"].failing
    assert started(p, 2.0) == [("n0", TraceTrigger.CHANGE, True)]


def test_the_node_is_traced_with_its_own_protocol_and_port(tmp_path: Path) -> None:
    key = tmp_path / "wg.key"
    key.write_text("0" * 44)
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    text = f"""
agent: {{vantage: va}}
targets:
  - id: wg
    pool: p
    pop: x
    region: r
    address: 192.0.2.1
    l4: {{icmp: true}}
    wireguard: {{server_public_key: "{'A' * 43}=", private_key_file: {key}, port: 51821}}
  - id: ovpn-tcp
    pool: p
    pop: x
    region: r
    address: 192.0.2.2
    l4: {{icmp: true, tcp_ports: [22]}}
    openvpn: {{proto: tcp, port: 443, ca_file: {ca}, tls_crypt_file: {ca}}}
  - id: icmp-only
    pool: p
    pop: x
    region: r
    address: 192.0.2.3
    l4: {{icmp: true}}
"""
    cfg, _ = parse_yaml(text, AgentConfig)
    found = trace_targets(plan(cfg, tmp_path))
    assert {n: (t.protocol, t.port) for n, t in found.items()} == {
        "wg": (TraceProtocol.UDP, 51821), "ovpn-tcp": (TraceProtocol.TCP, 443),
        "icmp-only": (TraceProtocol.ICMP, 0)}
    assert 61000 <= found["wg"].sport < 65000
    assert found["wg"].sport == TraceTarget("wg", "x", TraceProtocol.UDP, 1).sport  # per node


def test_a_check_is_failing_from_its_first_failure_until_it_passes_again(tmp_path: Path) -> None:
    """The scheduler tells the tracer when a check begins failing (not only when it settles),
    so the trace starts while the check is still failing its way down."""
    from probes.agent.scheduler import ScheduleCore

    cfg, _ = parse_yaml("agent: {vantage: va}\ntargets:\n  - {id: n, pool: p, pop: x, region: r,"
                        " address: 192.0.2.1, l4: {icmp: true}}\n", AgentConfig)
    (check,) = plan(cfg, tmp_path)
    core = ScheduleCore()
    core.load([check])
    key = check.key
    first = core.complete(key, True, 0.0)
    assert (first.failing, first.failing_changed) == (False, False)
    began = core.complete(key, False, 1.0)
    assert (began.failing, began.failing_changed, began.settled_changed) == (True, True, False)
    lone = core.complete(key, True, 2.0)  # a lone failure: passing again, never settled down
    assert (lone.failing, lone.failing_changed) == (False, True)
    outcomes = [core.complete(key, False, t) for t in (3.0, 4.0, 5.0)]
    assert [c.failing for c in outcomes] == [True, True, True]
    assert outcomes[-1].settled_changed and outcomes[-1].settled is False
    assert [c.failing_changed for c in outcomes] == [True, False, False]


def test_a_failing_trace_is_kept_only_when_the_failure_was_real() -> None:
    from probes.agent.tracer import Tracer

    got: list[Any] = []
    tracer = Tracer("va", TracingConfig(), got.append, clock=lambda: 10.0)
    tracer.planner.load(targets("n0"), 0.0)
    check = type("C", (), {"node": "n0", "check": "wg", "tier": None})()
    tracer.failing(check, True, False)  # type: ignore[arg-type]
    assert tracer.confirmed("n0", since=5.0)
    tracer.failing(check, False, False)  # type: ignore[arg-type]
    assert not tracer.confirmed("n0", since=5.0)  # a lone failure: the trace is dropped
    tracer.failing(check, True, True)  # type: ignore[arg-type]
    tracer.failing(check, False, False)  # type: ignore[arg-type]
    assert tracer.confirmed("n0", since=5.0)  # it settled down meanwhile: a real change


def backlog_after_take(p: TracePlanner, now: float) -> float:
    """Start (and end at once) what the planner allows at ``now``; the backlog left."""
    started(p, now)
    due = p.oldest_due(now)
    return 0.0 if due is None else max(0.0, now - due)


def test_baselines_above_the_budget_show_as_a_growing_backlog() -> None:
    # 40 nodes every 60 s want 0.67 baselines a second; 20 a minute allow 0.33
    p = planner(nodes=40, baseline_interval=60.0, max_per_minute=20.0, concurrency=100)
    assert p.baseline_demand == pytest.approx(40 / 60) and p.budget == pytest.approx(1 / 3)
    backlog = {now: backlog_after_take(p, float(now)) for now in range(0, 241)}
    assert backlog[30] < backlog[60] < backlog[90] < backlog[120]
    assert backlog[120] > 30.0
    # the clock restarts at every trace: the lateness settles where each node's baseline comes
    # every nodes / budget (120 s) instead of every baseline_interval (60 s)
    assert max(backlog[t] for t in range(180, 241)) == pytest.approx(120.0 - 60.0, abs=6.0)


def test_baselines_within_the_budget_leave_no_backlog() -> None:
    p = planner(nodes=30, baseline_interval=60.0, max_per_minute=60.0, concurrency=100)
    assert p.baseline_demand < p.budget
    assert all(backlog_after_take(p, float(now)) == 0.0 for now in range(0, 241))


def test_the_backlog_is_not_made_of_entries_take_would_drop() -> None:
    p = planner(nodes=2, baseline_interval=60.0, max_per_minute=6.0, concurrency=1)
    p.check_failing("n1", "wg", True, 1.0)
    assert started(p, 1.0) == [("n1", TraceTrigger.CHANGE, True)]  # restarts n1's baseline
    assert p.oldest_due(1.0) == 0.0  # n0's baseline, due at 0, waits for the bucket
    assert started(p, 11.0) == [("n0", TraceTrigger.BASELINE, False)]
    # n1's first baseline entry (due at 30) is stale; its failing re-trace falls due at 121
    assert p.oldest_due(40.0) == pytest.approx(61.0)  # n1's new baseline, not the stale one


def many_icmp_nodes(tmp_path: Path, nodes: int) -> list[PlannedCheck]:
    rows = "".join(f"  - {{id: n{i}, pool: p, pop: x, region: r, address: 192.0.2.{i + 1},"
                   f" l4: {{icmp: true}}}}\n" for i in range(nodes))
    cfg, _ = parse_yaml(f"agent: {{vantage: va}}\ntargets:\n{rows}", AgentConfig)
    return plan(cfg, tmp_path)


@pytest.mark.parametrize(("nodes", "warned"), [(40, True), (20, False)])
def test_the_tracer_warns_when_baselines_exceed_the_budget(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, nodes: int, warned: bool) -> None:
    policy = TracingConfig(baseline_interval=60.0, max_per_minute=30.0)  # 0.5 a second
    stats = TracerStats()
    tracer = Tracer("va", policy, lambda trace: None, stats=stats, clock=lambda: 100.0)
    with caplog.at_level(logging.WARNING, logger="probes.agent.tracer"):
        tracer.load(many_icmp_nodes(tmp_path, nodes))
    assert stats.baseline_demand_per_second == pytest.approx(nodes / 60.0)
    assert stats.budget_per_second == pytest.approx(0.5)
    assert ("paths.max_per_minute" in caplog.text) is warned
    if warned:
        assert "40 nodes" in caplog.text and "0.67" in caplog.text and "80 s" in caplog.text


def test_the_backlog_gauge_ages_with_the_clock() -> None:
    now = [0.0]
    stats = TracerStats(clock=lambda: now[0])
    collector = AgentCollector("va", ProbeStats(), SchedulerStats, tracer=stats)

    def gauge(name: str) -> float | None:
        return new_registry(collector).get_sample_value(name, {"vantage": "va"})

    assert gauge("tunnelwatch_path_trace_backlog_seconds") == 0.0
    stats.oldest_due, now[0] = 10.0, 5.0  # not due yet
    assert gauge("tunnelwatch_path_trace_backlog_seconds") == 0.0
    now[0] = 70.0
    assert gauge("tunnelwatch_path_trace_backlog_seconds") == 60.0
    stats.baseline_demand_per_second, stats.budget_per_second = 2.25, 1.0
    assert gauge("tunnelwatch_path_trace_baseline_demand_per_second") == 2.25
    assert gauge("tunnelwatch_path_trace_budget_per_second") == 1.0
