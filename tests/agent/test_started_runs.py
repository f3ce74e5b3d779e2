"""The scheduler starts L4 runs without a task of its own (``CheckKind.start``) when both
limits have a slot: the results are the checks', a stop cancels what is still running without a
report, a start that raises is a probe-error, and params that need the coroutine (TLS) run it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

from probes.agent.plan import PlannedCheck
from probes.agent.scheduler import AgentScheduler, ProbeRun, ScheduleCore
from probes.checks import l4
from probes.checks.base import CheckKind, CheckResult, Done, Started
from probes.config import TierPolicy
from probes.model import Reason, Tier

pytestmark = pytest.mark.agent

# four checks' slots are 0.1 s apart; a stop comes before any runs twice
TIERS = {"l4": TierPolicy(interval=0.4, timeout=1.0, fast_interval=30.0, jitter=0.0)}


def check(node: str, kind: CheckKind[Any], params: Any) -> PlannedCheck:
    return PlannedCheck(node=node, pool="p", pop="pop", region="eu", check=kind.name, kind=kind,
                        params=params, tier=Tier.L4)


async def until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)
    assert cond(), what


def scheduler(checks: list[PlannedCheck], runs: list[ProbeRun]) -> AgentScheduler:
    core = ScheduleCore(TIERS, adaptive_tiers=frozenset())
    sched = AgentScheduler(core, runs.append, max_start_lag=30.0, use_apscheduler=False)
    sched.reload(checks)
    return sched


async def test_l4_runs_without_a_task_report_the_checks_results() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.setblocking(False)
    loop = asyncio.get_running_loop()
    loop.add_reader(echo.fileno(), lambda: echo.sendto(*echo.recvfrom(64)))
    runs: list[ProbeRun] = []
    sched = scheduler([
        check("open", l4.TCP, l4.TcpParams(host="127.0.0.1", port=listener.getsockname()[1])),
        check("closed", l4.TCP, l4.TcpParams(host="127.0.0.1", port=closed_port)),
        check("echo", l4.UDP, l4.UdpParams(host="127.0.0.1", port=echo.getsockname()[1],
                                           send=b"ping", expect_prefix=b"ping")),
        check("tls", l4.TCP, l4.TcpParams(host="127.0.0.1", port=closed_port, tls=True)),
    ], runs)
    try:
        await sched.start()
        await until(lambda: len({r.check.node for r in runs}) == 4, "every check ran")
    finally:
        await sched.stop()
        loop.remove_reader(echo.fileno())
        echo.close()
        listener.close()
    got = {r.check.node: r.result for r in reversed(runs)}  # each check's first result
    assert (got["open"].ok, got["open"].reason, list(got["open"].phases)) == (
        True, Reason.OK, ["connect"])
    assert got["closed"].reason is Reason.REFUSED and got["closed"].detail
    assert got["echo"].ok and got["echo"].quality is not None and "rtt" in got["echo"].phases
    assert got["tls"].reason is Reason.REFUSED  # TLS needs the coroutine: run in a task
    assert sched.in_flight == 0
    assert sched._global.free == 256


async def test_stop_cancels_started_runs_without_a_report() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    runs: list[ProbeRun] = []
    sched = scheduler([check("silent", l4.UDP, l4.UdpParams(
        host="127.0.0.1", port=silent.getsockname()[1], send=b"x"))], runs)
    try:
        await sched.start()
        await until(lambda: sched.in_flight == 1, "the run started")
        assert not sched._tasks  # started without a task of the scheduler's
        await sched.stop(timeout=0.05)
    finally:
        silent.close()
    assert runs == [] and sched.in_flight == 0
    assert sched._global.free == 256 and sched._per_node["silent"].free == 4
    assert not sched.core.states["silent/udp"].running
    await asyncio.sleep(1.2)  # past the run's own timeout: it was cancelled, nothing comes
    assert runs == []


async def test_a_start_that_raises_is_a_probe_error() -> None:
    def start(params: object, timeout: float, done: Done) -> Started | None:
        raise RuntimeError("bug in a probe")

    async def run(params: object, timeout: float) -> CheckResult:
        raise AssertionError("not called: the kind starts its runs")

    kind = CheckKind("tcp", Tier.L4, object, run, start=start)
    runs: list[ProbeRun] = []
    sched = scheduler([check("n", kind, None)], runs)
    try:
        await sched.start()
        await until(lambda: len(runs) >= 1, "the crash reported")
    finally:
        await sched.stop()
    assert runs[0].result.reason is Reason.PROBE_ERROR
    assert "RuntimeError: bug in a probe" in runs[0].result.detail
    assert sched.in_flight == 0 and sched._global.free == 256
