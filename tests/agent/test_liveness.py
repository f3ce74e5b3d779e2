"""A silent node, agent side (issue 16's detection time): fastinter spaces the *starts* of a
transitioning check, so timeouts follow each other at once; a functional check that runs past
its usual time makes the node's L4 check due now (the liveness probe), within bounds."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from probes.agent.metrics import AgentCollector, ProbeStats
from probes.agent.plan import PlannedCheck
from probes.agent.scheduler import (
    MIN_ADAPTIVE_TIMEOUT,
    RTO_MIN_SAMPLES,
    AgentScheduler,
    ProbeRun,
    ScheduleCore,
)
from probes.checks.base import CheckResult
from probes.config import TierPolicy
from probes.model import Reason, Tier

from .fakes import planned

pytestmark = pytest.mark.agent

TIER = TierPolicy(interval=2.0, timeout=1.0, fast_interval=0.25, rise=2, fall=3, jitter=0.0)
L4 = "node-1/tcp"
HANDSHAKE = "node-1/fake.handshake"


def core() -> ScheduleCore:
    c = ScheduleCore({"l4": TIER, "functional": TIER}, rng=random.Random(1))
    c.load([planned("node-1", Tier.L4), planned("node-1", Tier.FUNCTIONAL),
            planned("node-2", Tier.L4)])
    return c


def settle_up(c: ScheduleCore, t: float = 0.0) -> None:
    """Every check run once and passed (10 ms each): settled up, with RTT samples."""
    for i in range(RTO_MIN_SAMPLES):
        for key in c.states:
            c.states[key].running = True
            c.states[key].last_start = t + i
            c.complete(key, True, t + i + 0.01, 0.01)


def start(c: ScheduleCore, key: str, t: float) -> None:
    assert c.request(key, t) == "honoured"  # due now
    assert [d.key for d in c.pop_due(t)] == [key]


def test_timeouts_on_a_transition_follow_each_other_at_once() -> None:
    c = core()
    settle_up(c)
    first = t = 10.0
    start(c, L4, t)
    whys = []
    while c.states[L4].settled:  # L4 timeouts of 0.25 s each until fall (3) settles it down
        t += MIN_ADAPTIVE_TIMEOUT
        c.complete(L4, False, t)
        if c.states[L4].settled:
            assert c.states[L4].due == pytest.approx(t)  # took >= fast_interval: next one now
            whys += [d.why for d in c.pop_due(t) if d.key == L4]
    assert whys == ["fast", "fast"]
    assert t - first == pytest.approx(3 * MIN_ADAPTIVE_TIMEOUT)  # 0.75 s, not 1.25 s


def test_a_quick_failure_still_waits_fast_interval_from_its_start() -> None:
    c = core()
    settle_up(c)
    start(c, L4, 10.0)
    c.complete(L4, False, 10.01)  # refused at once
    assert c.states[L4].due == pytest.approx(10.25)


def test_suspect_after_is_the_checks_own_rto_within_bounds() -> None:
    c = core()
    assert c.suspect_after(L4) is None  # only functional checks are watched
    assert c.suspect_after(HANDSHAKE) == MIN_ADAPTIVE_TIMEOUT  # no samples yet: the floor
    settle_up(c)
    assert c.suspect_after(HANDSHAKE) == MIN_ADAPTIVE_TIMEOUT  # 10 ms handshakes: the floor
    for i in range(20):  # a slow server: ~300 ms handshakes
        c.complete(HANDSHAKE, True, 100.0 + i, 0.3 + 0.02 * (i % 2))
    st_ = c.states[HANDSHAKE]
    assert c.suspect_after(HANDSHAKE) == pytest.approx(st_.srtt + 4 * st_.rttvar)
    for i in range(20):
        c.complete(HANDSHAKE, True, 200.0 + i, 5.0)
    assert c.suspect_after(HANDSHAKE) == TIER.timeout / 2  # never beyond half its timeout


@given(st.lists(st.floats(min_value=0.0, max_value=10.0), max_size=30))
def test_suspect_after_always_within_bounds(durations: list[float]) -> None:
    c = core()
    for i, d in enumerate(durations):
        c.complete(HANDSHAKE, True, float(i), d)
        after = c.suspect_after(HANDSHAKE)
        assert after is not None and MIN_ADAPTIVE_TIMEOUT <= after <= TIER.timeout / 2


def test_a_long_running_handshake_makes_its_nodes_l4_check_due() -> None:
    c = core()
    settle_up(c)
    start(c, HANDSHAKE, 10.0)
    assert c.liveness(HANDSHAKE, 10.25) == [L4]  # node-1's only: node-2 is not asked
    [due] = c.pop_due(10.25)
    assert (due.key, due.why) == (L4, "liveness")
    assert c.liveness(HANDSHAKE, 10.3) == []  # it is running
    c.complete(L4, True, 10.26, 0.01)
    assert c.liveness(HANDSHAKE, 10.4) == []  # it started within fast_interval: fresh enough


def test_no_liveness_probe_when_nothing_is_to_be_learnt() -> None:
    c = core()
    settle_up(c)
    assert c.liveness(HANDSHAKE, 10.0) == []  # the handshake is not running (it finished)
    start(c, HANDSHAKE, 10.0)
    c.states[L4].settled = False  # the node's L4 check is known down: nothing to add
    assert c.liveness(HANDSHAKE, 10.25) == []
    c.states[L4].settled, c.states[L4].streak = True, 1  # on a transition: fast re-probes
    assert c.liveness(HANDSHAKE, 10.25) == []
    c.states[L4].streak = 0
    fresh = core()  # never settled (a fresh agent): no opinion to check
    start(fresh, HANDSHAKE, 0.0)
    assert fresh.liveness(HANDSHAKE, 0.25) == []


async def test_the_shell_probes_liveness_and_counts_it() -> None:
    """Real timers: node-1 goes silent; its handshake hangs until its timeout, and the node's L4
    check starts a quarter of a second into it, not at its next slot seconds later."""
    runs: list[ProbeRun] = []
    silent = False
    loop = asyncio.get_running_loop()
    started_silent: dict[str, list[float]] = {}  # starts once the node is silent

    async def runner(check: PlannedCheck, timeout: float) -> CheckResult:
        if silent:
            started_silent.setdefault(check.key, []).append(loop.time())
            await asyncio.sleep(timeout)
            return CheckResult(False, Reason.TIMEOUT, timeout)
        await asyncio.sleep(0.005)
        return CheckResult(True, Reason.OK, 0.005)

    slow_rounds = TierPolicy(interval=30.0, timeout=1.0, fast_interval=0.25, jitter=0.0)
    # the handshake's timeout 3 s: the L4 start comes ~0.25 s into its hang, and a loaded test
    # machine may stall the loop for most of a second without taking that lead past it
    slow_handshake = TierPolicy(interval=30.0, timeout=3.0, fast_interval=0.25, jitter=0.0)
    c = ScheduleCore({"l4": slow_rounds, "functional": slow_handshake}, rng=random.Random(1))
    c.load([planned("node-1", Tier.L4), planned("node-1", Tier.FUNCTIONAL)])
    sched = AgentScheduler(c, runs.append, runner=runner, max_start_lag=10.0,
                           use_apscheduler=False)
    await sched.start()  # the first rounds: both checks run at once and settle up
    try:
        async with asyncio.timeout(10):
            while not (c.states[L4].settled and c.states[HANDSHAKE].settled):
                await asyncio.sleep(0.01)
        await asyncio.sleep(slow_rounds.fast_interval)  # the L4 result is no longer fresh
        silent = True
        assert sched.request(HANDSHAKE) == "honoured"
        async with asyncio.timeout(10):
            while not any(r.why == "liveness" for r in runs):
                await asyncio.sleep(0.01)
    finally:
        await sched.stop()
    [live] = [r for r in runs if r.why == "liveness"]
    lead = started_silent[L4][0] - started_silent[HANDSHAKE][0]
    assert MIN_ADAPTIVE_TIMEOUT <= lead < slow_handshake.timeout  # before the handshake timed out
    assert not live.result.ok and sched.stats.liveness_total == 1
    registry = CollectorRegistry()
    registry.register(AgentCollector("va", ProbeStats(), lambda: sched.stats))
    text = generate_latest(registry).decode()
    assert 'tunnelwatch_scheduler_liveness_probes_total{vantage="va"} 1.0' in text
