"""The agent's loops wait with :func:`probes.aio.wait_at_most`: a cancel always ends them.
``asyncio.wait_for`` on Python 3.11 swallows a cancel that comes in the same loop iteration as
the event it waits for (the reporter's ``close()`` commits, which wakes its senders, and
cancels them at once): the sender ran on, and ``close()`` waited for it for ever."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable

import pytest

from probes.aio import wait_at_most

pytestmark = pytest.mark.agent


async def _wait_for(event: asyncio.Event, seconds: float) -> None:
    """What the reporter and the tracer did before."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


async def _survives_its_cancel(wait: Callable[[asyncio.Event, float], Awaitable[None]]) -> bool:
    """A loop like the reporter's sender: woken and cancelled in the same iteration."""
    event = asyncio.Event()

    async def loop() -> None:
        while True:
            await wait(event, 30.0)
            event.clear()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)  # it waits
    event.set()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=1.0)
    if not done:
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    return not done


async def test_a_cancel_ends_the_loop_even_as_its_event_is_set() -> None:
    assert not await _survives_its_cancel(wait_at_most)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the race is in 3.11's wait_for")
async def test_the_race_is_real_with_wait_for() -> None:
    assert await _survives_its_cancel(_wait_for)  # the reproduction: the loop ran on


async def test_it_returns_when_the_event_is_set_or_the_time_is_up() -> None:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    start = loop.time()
    await wait_at_most(event, 0.05)
    assert loop.time() - start >= 0.05
    loop.call_later(0.01, event.set)
    start = loop.time()
    await wait_at_most(event, 30)
    assert event.is_set() and loop.time() - start < 30



# The same race where a check waits its turn (checks.tunnel.in_turn's lock) or a half-open slot
# (the IKEv2 limiter's semaphore): a check cancelled as the holder let go ran all the same.

class Queued(ABC):
    """A fresh holder and a check queued behind it; ``started_after_cancel``: the check began
    although its task had been cancelled before."""

    def __init__(self) -> None:
        self.cancelled = False
        self.started_after_cancel = False

    def started(self) -> None:
        self.started_after_cancel |= self.cancelled

    @abstractmethod
    async def hold(self) -> None:
        """Takes the lock or slot the check will wait for."""

    @abstractmethod
    def let_go(self) -> None:
        """Hands the lock or slot on."""

    @abstractmethod
    async def queued(self) -> object:
        """The check: waits its turn, then calls ``started``."""


async def _runs_despite_its_cancel(make: Callable[[int], Queued]) -> list[int]:
    """For each number of loop iterations between the holder letting go and the cancel, with a
    fresh lock or semaphore each time: the iterations where the cancelled check still began."""
    bad = []
    for spins in range(8):
        q = make(spins)
        await q.hold()
        task = asyncio.create_task(q.queued())
        await asyncio.sleep(0.01)  # it waits
        q.let_go()
        for _ in range(spins):
            await asyncio.sleep(0)
        task.cancel()
        q.cancelled = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if q.started_after_cancel:
            bad.append(spins)
    return bad


async def test_a_check_cancelled_while_waiting_its_turn_does_not_run() -> None:
    from probes.checks.base import CheckResult
    from probes.checks.tunnel import in_turn
    from probes.model import Reason

    class Turn(Queued):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.identity, self.release = ("test", n), asyncio.Event()

        async def hold(self) -> None:
            async def holder(left: float) -> CheckResult:
                await self.release.wait()
                return CheckResult(True, Reason.OK, 0.0)
            self.holder = asyncio.create_task(in_turn(self.identity, 30.0, holder))
            await asyncio.sleep(0.01)  # it has the turn

        def let_go(self) -> None:
            self.release.set()

        async def queued(self) -> object:
            async def check(left: float) -> CheckResult:
                self.started()
                return CheckResult(True, Reason.OK, 0.0)
            return await in_turn(self.identity, 30.0, check)

    assert await _runs_despite_its_cancel(Turn) == []


async def test_a_probe_cancelled_while_waiting_a_half_open_slot_sends_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from probes.checks import ikev2

    class Slot(Queued):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.port = 40000 + n  # a fresh limiter: one per responder
            self.limiter = ikev2.half_open_limiter("192.0.2.1", self.port)

        async def hold(self) -> None:
            for _ in range(ikev2.MAX_HALF_OPEN):
                await self.limiter.acquire()

        def let_go(self) -> None:
            self.limiter.release()

        async def queued(self) -> object:
            async def no_socket(host: str, port: int, **kw: object) -> None:
                self.started()
                raise OSError("the test opens no socket")
            monkeypatch.setattr(ikev2.UdpEndpoint, "open", no_socket)
            return await ikev2.run_level(ikev2.Ikev2Params(host="192.0.2.1", port=self.port),
                                         30.0, "init")

    assert await _runs_despite_its_cancel(Slot) == []
