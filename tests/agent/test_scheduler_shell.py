"""The asyncio shell: APScheduler tier rounds, dispatch, limits, cascade, graceful stop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from probes.agent.plan import PlannedCheck
from probes.agent.scheduler import AgentScheduler, ProbeRun, ScheduleCore
from probes.checks.base import CheckResult
from probes.config import TierPolicy
from probes.model import Reason, Tier

from .fakes import fleet

pytestmark = pytest.mark.agent

FAST_TIERS = {
    "l4": TierPolicy(interval=0.2, timeout=0.1, fast_interval=0.05, jitter=0.1),
    "functional": TierPolicy(interval=1.0, timeout=0.5, fast_interval=0.1),
    "session": TierPolicy(interval=5.0, timeout=1.0, fast_interval=1.0),
}


async def _until(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("use_apscheduler", [True, False])
async def test_shell_runs_rounds_cascades_and_limits(use_apscheduler: bool) -> None:
    runs: list[ProbeRun] = []
    running = {"now": 0, "max": 0, "node-2": 0, "node-2-max": 0}
    node2_l4_runs: list[int] = []

    async def runner(check: PlannedCheck, timeout: float) -> CheckResult:
        running["now"] += 1
        running["max"] = max(running["max"], running["now"])
        if check.node == "node-2":
            running["node-2"] += 1
            running["node-2-max"] = max(running["node-2-max"], running["node-2"])
        await asyncio.sleep(0.002)
        running["now"] -= 1
        if check.node == "node-2":
            running["node-2"] -= 1
        if check.node == "node-2" and check.tier is Tier.L4:
            node2_l4_runs.append(1)
        # node-2's port closes after two good runs: a transition, so fast re-probes and cascade
        failed = check.node == "node-2" and check.tier is Tier.L4 and len(node2_l4_runs) > 2
        return CheckResult(not failed, Reason.REFUSED if failed else Reason.OK, 0.002)

    core = ScheduleCore(FAST_TIERS)
    core.load(fleet(6))
    sched = AgentScheduler(core, runs.append, runner=runner, max_concurrency=3,
                           per_node_concurrency=1, max_start_lag=10.0,
                           use_apscheduler=use_apscheduler)
    await sched.start()
    try:
        def enough() -> bool:
            per_node = [sum(1 for r in runs if r.check.node == f"node-{i}" and
                            r.check.tier is Tier.L4) for i in range(6)]
            return min(per_node) >= 4 and any(r.why == "cascade" for r in runs)

        await _until(enough)
    finally:
        await sched.stop()
    assert running["max"] <= 3 and running["node-2-max"] <= 1
    cascades = [r for r in runs if r.why == "cascade"]
    assert {r.check.node for r in cascades} == {"node-2"}
    assert all(r.check.tier is Tier.FUNCTIONAL for r in cascades)
    assert any(r.why == "fast" for r in runs if r.check.node == "node-2")
    assert sched.in_flight == 0


async def test_stop_lets_in_flight_checks_finish() -> None:
    runs: list[ProbeRun] = []
    started = asyncio.Event()

    async def slow(check: PlannedCheck, timeout: float) -> CheckResult:
        started.set()
        await asyncio.sleep(0.3)
        return CheckResult(True, Reason.OK, 0.3)

    core = ScheduleCore(FAST_TIERS)
    core.load(fleet(1, (Tier.L4,)))
    sched = AgentScheduler(core, runs.append, runner=slow, max_start_lag=10.0,
                           use_apscheduler=False)
    await sched.start()
    await asyncio.wait_for(started.wait(), 10)
    await sched.stop(timeout=5)
    assert len(runs) == 1 and runs[0].result.ok


async def test_late_start_is_refused_as_overloaded() -> None:
    runs: list[ProbeRun] = []

    async def runner(check: PlannedCheck, timeout: float) -> CheckResult:
        return CheckResult(True, Reason.OK, 0.0)

    fake_now = [100.0]
    core = ScheduleCore(FAST_TIERS)
    core.load(fleet(2, (Tier.L4,)))
    sched = AgentScheduler(core, runs.append, runner=runner, max_start_lag=0.05,
                           clock=lambda: fake_now[0], use_apscheduler=False)
    core.open_round(Tier.L4, 0.0)  # due long ago: the loop "fell behind" by ~100 s
    sched._loop = asyncio.get_running_loop()
    sched._fire()
    await _until(lambda: len(runs) == 2)
    assert all(r.result.reason is Reason.OVERLOADED for r in runs)
    assert sched.stats.overloaded_total == 2
    assert not any(st.running for st in core.states.values())
    await sched.stop()
