"""The scheduler's concurrency limit (probes/agent/gate.py) keeps a semaphore's semantics."""

from __future__ import annotations

import asyncio

from probes.agent.gate import Gate


async def test_slots_are_handed_to_waiters_in_order() -> None:
    gate = Gate(1)
    assert gate.try_enter() and not gate.try_enter()
    order: list[int] = []

    async def waiter(i: int) -> None:
        await gate.enter()
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert order == []
    for expected in ([0], [0, 1], [0, 1, 2]):
        gate.leave()
        await asyncio.sleep(0)
        assert order == expected
    await asyncio.gather(*tasks)
    gate.leave()
    assert gate.free == 1


async def test_no_slot_is_taken_past_a_waiter() -> None:
    gate = Gate(1)
    gate.try_enter()
    task = asyncio.create_task(gate.enter())
    await asyncio.sleep(0)
    gate.leave()  # handed to the waiter, not back to the pool
    assert not gate.try_enter()
    await task
    gate.leave()
    assert gate.try_enter()


async def test_a_cancelled_waiter_takes_no_slot() -> None:
    gate = Gate(1)
    gate.try_enter()
    task = asyncio.create_task(gate.enter())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    gate.leave()
    assert gate.free == 1 and gate.try_enter()


async def test_a_waiter_cancelled_after_being_handed_a_slot_passes_it_on() -> None:
    gate = Gate(1)
    gate.try_enter()
    first = asyncio.create_task(gate.enter())
    second = asyncio.create_task(gate.enter())
    await asyncio.sleep(0)
    gate.leave()  # the slot goes to ``first`` ...
    first.cancel()  # ... which is cancelled before it runs: ``second`` gets it
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 5)
    assert gate.free == 0
    gate.leave()
    assert gate.free == 1
