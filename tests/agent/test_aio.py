"""The agent's loops wait with :func:`probes.aio.wait_at_most`: a cancel always ends them.
``asyncio.wait_for`` on Python 3.11 swallows a cancel that comes in the same loop iteration as
the event it waits for (the reporter's ``close()`` commits, which wakes its senders, and
cancels them at once): the sender ran on, and ``close()`` waited for it for ever."""

from __future__ import annotations

import asyncio
import contextlib
import sys
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
