"""One session per identity at a time (probes.checks.tunnel.in_turn): a second check with the
same identity waits for the first, an overlong wait is the agent's ``overloaded`` (never the
node's failure), and the turn is given back when a check is cancelled (execute's hard bound)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from probes.checks.base import CheckResult, Fact, Stopwatch
from probes.checks.tunnel import in_turn, run_probe
from probes.model import Reason


def _holding(events: list[str], name: str,
             hold: float) -> Callable[[float], Awaitable[CheckResult]]:
    async def run(left: float) -> CheckResult:
        events.append(f"{name} start {left:.1f}")
        await asyncio.sleep(hold)
        events.append(f"{name} end")
        return CheckResult(True, Reason.OK, hold)
    return run


def test_a_second_check_with_the_same_identity_waits_for_the_first() -> None:
    events: list[str] = []

    async def main() -> tuple[CheckResult, CheckResult, CheckResult]:
        first = asyncio.create_task(in_turn(("wg", "a"), 4.0, _holding(events, "a1", 0.3)))
        await asyncio.sleep(0)
        other = asyncio.create_task(in_turn(("wg", "b"), 4.0, _holding(events, "b", 0.05)))
        second = await in_turn(("wg", "a"), 4.0, _holding(events, "a2", 0.0))
        return await first, second, await other

    first, second, other = asyncio.run(main())
    starts = [e.split()[0] for e in events if " start" in e]
    assert starts == ["a1", "b", "a2"]  # another identity does not wait
    assert events.index("a1 end") < next(i for i, e in enumerate(events) if e.startswith("a2"))
    assert second.ok and second.phases["queue"] >= 0.25
    assert second.duration_seconds >= 0.25
    assert "queue" not in first.phases and "queue" not in other.phases


def test_waiting_beyond_half_the_timeout_is_overloaded() -> None:
    async def main() -> CheckResult:
        holder = asyncio.create_task(in_turn("x", 10.0, _holding([], "h", 0.6)))
        await asyncio.sleep(0)
        result = await in_turn("x", 0.4, _holding([], "late", 0.0))
        await holder
        return result

    result = asyncio.run(main())
    assert not result.ok and result.reason is Reason.OVERLOADED
    assert 0.15 <= result.phases["queue"] < 1.0
    assert "same identity" in result.detail


def test_a_cancelled_check_gives_its_turn_back() -> None:
    async def main() -> float:
        stuck = asyncio.create_task(in_turn("y", 10.0, _holding([], "stuck", 60.0)))
        await asyncio.sleep(0.01)
        stuck.cancel()
        started = time.monotonic()
        result = await in_turn("y", 2.0, _holding([], "next", 0.0))
        assert result.ok
        return time.monotonic() - started

    assert asyncio.run(main()) < 0.9


def test_a_cancelled_run_still_finishes() -> None:
    """run_probe: a run cut by the check's hard bound still gives back what it holds (the IKEv2
    half-open slot: never released, three such runs would leave the responder 'overloaded')."""
    class Run:
        def __init__(self) -> None:
            self.watch = Stopwatch()
            self.facts: dict[str, Fact] = {}
            self.finished = 0

        async def finish(self) -> None:
            self.finished += 1

    run = Run()

    async def forever() -> CheckResult:
        await asyncio.sleep(60)
        return CheckResult(True, Reason.OK, 60.0)

    async def main() -> None:
        task = asyncio.create_task(run_probe(run, forever))
        await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert run.finished == 1
