"""When the agent traces (probes/agent/tracer.py): triggers, limits, priorities, which flow."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from probes.agent.plan import plan
from probes.agent.tracer import TracePlanner, TraceTarget, trace_targets
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
