"""The throughput checks' byte budget: planned as a ``min_interval`` from the node's hourly
budget, and honoured by the scheduler over simulated hours whatever asks for more (the session
tier's rounds, fast re-probes of a failing check, the mesh's re-probe requests)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest

from probes.agent.plan import PlannedCheck, plan_target
from probes.agent.scheduler import ScheduleCore
from probes.checks.throughput import bytes_per_run
from probes.config import Target, ThroughputCheck, TierPolicy
from tests.agent.test_scheduler_core import simulate
from tests.userpath.test_config_plan import _problems, _target

TIERS = {
    "l4": TierPolicy(interval=2.0, timeout=1.0, fast_interval=0.5, rise=2, fall=3),
    "functional": TierPolicy(interval=15.0, timeout=5.0, fast_interval=2.0, rise=2, fall=3),
    "session": TierPolicy(interval=60.0, timeout=10.0, fast_interval=10.0, rise=2, fall=3),
}
BUDGET = 3_000_000.0
THROUGHPUT: dict[str, Any] = {"reflector": "203.0.113.7:7447", "rate": 2_000_000,
                              "duration": 1.0, "budget_bytes_per_hour": BUDGET}


def _planned(tmp_path: Path) -> tuple[Target, list[PlannedCheck]]:
    target = _target(user_path={"throughput": THROUGHPUT})
    assert _problems(target) == {}
    return target, plan_target(target, tmp_path, tmp_path)


def test_the_plan_spreads_the_node_budget_over_its_tunnels(tmp_path: Path) -> None:
    _, planned = _planned(tmp_path)
    bursts = [c for c in planned if c.check.endswith(".throughput")]
    assert [c.check for c in bursts] == ["wireguard.throughput", "openvpn.throughput"]
    check = msgspec.convert(THROUGHPUT, ThroughputCheck)
    per_run = bytes_per_run(check)
    assert per_run == 5 * 68 + 208 * 1200  # idle requests + 2 Mbit/s for 1 s in 1200 B packets
    assert all(c.min_interval == pytest.approx(3600 * 2 * per_run / BUDGET) for c in bursts)
    assert all(c.min_interval == 0 for c in planned if c not in bursts)


@pytest.mark.parametrize("hours", [1, 4])
def test_the_budget_holds_over_simulated_hours_whatever_asks(tmp_path: Path,
                                                             hours: int) -> None:
    _, planned = _planned(tmp_path)
    core = ScheduleCore(TIERS, rng=random.Random(3), max_reprobe_rate=10.0)
    core.load(planned)
    bursts = {c.key: c for c in planned if c.check.endswith(".throughput")}
    answers: list[str] = []

    def outcome(key: str, t: float) -> bool:
        # the bursts always fail (DEGRADED wants fast re-probes), and the mesh asks for a
        # re-probe of each every 5 s
        if int(t) % 5 == 0:
            answers.extend(core.request(k, t) for k in bursts)
        return key not in bursts

    starts = simulate(core, hours * 3600.0 - 1e-6, outcome)
    per_run = bytes_per_run(msgspec.convert(THROUGHPUT, ThroughputCheck))
    sent = sum(per_run for s in starts if s.key in bursts)
    assert sent <= hours * BUDGET + len(bursts) * per_run, (sent, hours * BUDGET)
    assert sent >= 0.9 * hours * BUDGET  # the budget is used, not starved
    for key, check in bursts.items():
        times = [s.t for s in starts if s.key == key]
        assert min(b - a for a, b in itertools.pairwise(times)) >= check.min_interval - 1e-6
    assert "limited" in answers  # the mesh's requests inside the budget's gap are refused
    others = [s for s in starts if s.key.endswith("wireguard.session")]
    assert len(others) >= hours * 55  # the other session checks keep their 60 s rounds


def test_a_budget_one_round_of_bursts_cannot_fit_is_a_config_problem() -> None:
    problems = _problems(_target(user_path={"throughput": {**THROUGHPUT,
                                                           "budget_bytes_per_hour": 100_000}}))
    assert "exceeds it" in problems["t.user_path.throughput.budget_bytes_per_hour"]
    problems = _problems(_target(user_path={"throughput": {**THROUGHPUT, "packet_size": 40,
                                                           "min_rate": 3_000_000}}))
    assert "68..1500" in problems["t.user_path.throughput.packet_size"]
    assert "at most rate" in problems["t.user_path.throughput.min_rate"]
