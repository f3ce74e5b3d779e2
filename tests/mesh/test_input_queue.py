"""Small batches pass heavy ones (issue #17): inputs were applied in arrival order behind one
lock, so a low-rate agent beside heavy ingest waited for every 2,000-observation batch queued
ahead of it (p99 201.6 ms against 6.6 ms idle). The queue's order is checked with a fake clock,
then on the real mesh app with a commit held as a stalled disk would hold it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from probes.mesh import ingest, inputqueue
from probes.mesh.inputqueue import InputQueue
from probes.mesh.store import EntryKind
from probes.mesh.store_sqlite import SQLiteStore
from probes.model import decode_batch
from tests.mesh.apptest import Mesh, mesh_app

pytestmark = pytest.mark.mesh


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _until(condition: Any, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60  # generous: the states come; a busy machine is only slower
    while not condition():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.005)


async def _run_in_turns(queue: InputQueue, clock: Clock,
                        arrivals: list[tuple[float, str, int]]) -> list[str]:
    """Hold the turn, let ``arrivals`` (time, source, size) queue up, release: the order in
    which they got their turn (named source:index)."""
    order: list[str] = []
    held = asyncio.Event()

    async def first() -> None:
        async with queue.turn("first", 0):
            held.set()
            await release.wait()

    async def one(name: str, source: str, size: int) -> None:
        async with queue.turn(source, size):
            order.append(name)
            await asyncio.sleep(0)

    release = asyncio.Event()
    tasks = [asyncio.create_task(first())]
    await held.wait()
    for i, (at, source, size) in enumerate(arrivals):
        clock.now = at
        tasks.append(asyncio.create_task(one(f"{source}:{i}", source, size)))
        await asyncio.sleep(0)  # it is waiting now
    assert queue.waiting == len(arrivals)
    release.set()
    await asyncio.gather(*tasks)
    return order


async def test_a_small_batch_passes_heavy_ones_that_arrived_just_before() -> None:
    clock = Clock()
    queue = InputQueue(clock)
    order = await _run_in_turns(queue, clock, [
        (100.000, "h1", 2000), (100.001, "h2", 2000), (100.002, "light", 20)])
    assert order == ["light:2", "h1:0", "h2:1"]
    assert queue.passed_total == 1


async def test_a_heavy_batch_is_passed_only_within_its_allowance() -> None:
    clock = Clock()
    queue = InputQueue(clock)
    allowance = 2000 * inputqueue.ALLOWANCE_SECONDS_PER_OBSERVATION
    order = await _run_in_turns(queue, clock, [
        (100.0, "h1", 2000),
        (100.0 + allowance / 2, "early", 1),  # within h1's allowance: goes first
        (100.0 + allowance * 2, "late", 1),  # after h1's deadline: never ahead of it
    ])
    assert order == ["early:1", "h1:0", "late:2"]


async def test_one_sources_inputs_never_pass_each_other() -> None:
    clock = Clock()
    queue = InputQueue(clock)
    order = await _run_in_turns(queue, clock, [
        (100.000, "a", 2000), (100.001, "a", 1), (100.002, "b", 1), (100.003, "a", 1)])
    # a's small batches wait for a's heavy one (its batch_seq order); b passes them all
    assert order == ["b:2", "a:0", "a:1", "a:3"]


async def test_a_waiter_that_gives_up_does_not_take_the_turn_with_it() -> None:
    queue = InputQueue()
    release = asyncio.Event()
    got: list[str] = []

    async def holder() -> None:
        async with queue.turn("x", 1):
            await release.wait()

    async def waiter(name: str) -> None:
        async with queue.turn(name, 1):
            got.append(name)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    quitter = asyncio.create_task(waiter("quitter"))
    stayer = asyncio.create_task(waiter("stayer"))
    await _until(lambda: queue.waiting == 2, "both wait")
    quitter.cancel()
    release.set()
    await asyncio.gather(first, stayer)
    assert got == ["stayer"]
    async with queue.turn():  # free again: taken at once
        pass


# ---- on the mesh ------------------------------------------------------------------------------


def _hold_batch_commits(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[str]]:
    """Batch commits wait (as on a stalled disk) until the event is set; the agents whose
    batches began committing, in order."""
    disk = threading.Event()
    committed: list[str] = []
    original = SQLiteStore.commit

    def held_commit(self: SQLiteStore, entry: Any, *args: Any, **kwargs: Any) -> int:
        if entry.kind == EntryKind.BATCH:
            committed.append(decode_batch(entry.payload).agent)
            disk.wait(20)
        return original(self, entry, *args, **kwargs)

    monkeypatch.setattr(SQLiteStore, "commit", held_commit)
    return disk, committed


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async with mesh_app(tmp_path, agents=("h1", "h2", "h3", "light")) as m:
        yield m


async def test_the_mesh_applies_a_light_agents_batch_before_queued_heavy_ones(
        mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    # timing out of the way: any batch with fewer observations is "much smaller"
    monkeypatch.setattr(inputqueue, "ALLOWANCE_SECONDS_PER_OBSERVATION", 60.0)
    disk, committed = _hold_batch_commits(monkeypatch)
    heavy = {f"n{i % 4}": i % 2 == 0 for i in range(4)}
    posts = [asyncio.create_task(mesh.post("h1", mesh.body("h1", 1, heavy)))]
    await _until(lambda: committed == ["h1"], "h1's commit never started")
    for agent in ("h2", "h3"):
        posts.append(asyncio.create_task(mesh.post(agent, mesh.body(agent, 1, heavy))))
    await _until(lambda: mesh.service._inputs.waiting == 2, "the heavy batches never queued")
    posts.append(asyncio.create_task(mesh.post("light", mesh.body("light", 1, {"n0": True}))))
    await _until(lambda: mesh.service._inputs.waiting == 3, "the light batch never queued")
    disk.set()
    answers = await asyncio.gather(*posts)
    assert [status for status, _ in answers] == [200] * 4
    assert committed == ["h1", "light", "h2", "h3"]  # arrival order was h1, h2, h3, light
    # the journal holds them in the order applied: a restart replays that order
    journal = [decode_batch(e.payload).agent for e in mesh.service.store.recover().entries
               if e.kind == EntryKind.BATCH]
    assert journal == committed


async def test_a_waiting_batch_is_decoded_in_its_turn_not_before_it(
        mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding a 2,000-observation body takes milliseconds on the event loop: done on arrival,
    a light batch queued behind the decodes of every heavy body ahead of it, whatever the
    deadline order of their applies. Decoded in the turn, the light batch's is done first."""
    monkeypatch.setattr(inputqueue, "ALLOWANCE_SECONDS_PER_OBSERVATION", 60.0)
    disk, committed = _hold_batch_commits(monkeypatch)
    decoded: list[str] = []

    def spied_decode(body: bytes) -> Any:
        batch = decode_batch(body)
        decoded.append(batch.agent)
        return batch

    monkeypatch.setattr(ingest, "decode_batch", spied_decode)
    heavy = {f"n{i % 4}": i % 2 == 0 for i in range(4)}
    posts = [asyncio.create_task(mesh.post("h1", mesh.body("h1", 1, heavy)))]
    await _until(lambda: committed == ["h1"], "h1's commit never started")
    posts.append(asyncio.create_task(mesh.post("h2", mesh.body("h2", 1, heavy))))
    await _until(lambda: mesh.service._inputs.waiting == 1, "h2 never queued")
    assert decoded == ["h1"]  # h2's body waits undecoded
    posts.append(asyncio.create_task(mesh.post("light", mesh.body("light", 1, {"n0": True}))))
    await _until(lambda: mesh.service._inputs.waiting == 2, "the light batch never queued")
    assert decoded == ["h1"]
    disk.set()
    answers = await asyncio.gather(*posts)
    assert [status for status, _ in answers] == [200] * 3
    assert decoded == committed == ["h1", "light", "h2"]
