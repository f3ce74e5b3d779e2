"""SQLite work off the event loop (issue #17, item 8): journal pruning after a snapshot took up
to 200 ms and a commit up to 114 ms, on the event loop, so every request in flight waited (a
low-rate client saw p99 of 77-316 ms). Here a commit is held as a stalled disk would hold it:
the mesh must keep answering other requests meanwhile, and pruning goes in small steps."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from probes.mesh.snapshot import PRUNE_STEP
from probes.mesh.store import EntryKind, JournalEntry
from probes.mesh.store_sqlite import SQLiteStore
from tests.mesh.apptest import Mesh, mesh_app

pytestmark = pytest.mark.mesh


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async with mesh_app(tmp_path) as m:
        yield m


async def test_a_stalled_commit_does_not_stall_the_mesh(
        mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = threading.Event()  # the "disk": a commit waits for it
    stalled = threading.Event()
    gave_up = threading.Event()  # the safety valve opened: nobody could set ``disk``
    original = SQLiteStore.commit

    def slow_commit(self: SQLiteStore, *args: Any, **kwargs: Any) -> int:
        stalled.set()
        # on a mesh that commits on its event loop nothing else runs meanwhile, the test
        # included: after 20 s the valve lets the commit go on by itself
        if not disk.wait(20):
            gave_up.set()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SQLiteStore, "commit", slow_commit)
    batch = asyncio.create_task(mesh.post("va", mesh.body("va", 1, {"n0": True})))
    deadline = asyncio.get_running_loop().time() + 10
    while not stalled.is_set():
        assert asyncio.get_running_loop().time() < deadline, "the commit never started"
        await asyncio.sleep(0.01)
    # the commit is stuck on the disk; the mesh still answers
    for path in ("/healthz", "/metrics", "/v1/verdicts", "/v1/nodes/n0"):
        resp = await mesh.client.get(path)
        assert resp.status == 200, path
        await resp.read()
        assert not gave_up.is_set(), f"{path} was answered only once the commit was done"
    assert not batch.done()  # the batch waits for its commit: nothing is answered before it
    disk.set()
    status, reply = await batch
    assert (status, reply["accepted"]) == (200, True)


def test_a_snapshot_is_followed_by_pruning_in_small_steps(tmp_path: Path) -> None:
    from probes.mesh.snapshot import ForkSnapshotter

    store = SQLiteStore(tmp_path / "m.db")
    ids = [store.commit(JournalEntry(EntryKind.TICK, float(t)), []) for t in range(200)]
    store.save_snapshot(ids[-1], b"snap")
    snapshotter = ForkSnapshotter(store)
    snapshotter.covered(ids[-1])
    snapshotter.reap()  # one step, as after one commit or one tick
    assert store.journal_length() == 200 - PRUNE_STEP
    while snapshotter.busy:
        snapshotter.reap()
    assert store.journal_length() == 0
    store.close()


def test_a_prune_step_frees_at_most_a_few_megabytes(tmp_path: Path) -> None:
    """A journal row is a whole batch: 32 rows of 2,000-observation batches were 10 MB of pages
    freed in one step, after a commit and before its batch was answered. A step stops at
    PRUNE_STEP_BYTES of payload (one row at least, however large)."""
    from probes.mesh.store_sqlite import PRUNE_STEP_BYTES

    store = SQLiteStore(tmp_path / "m.db")
    big = b"x" * (PRUNE_STEP_BYTES // 3 + 1)
    ids = [store.commit(JournalEntry(EntryKind.BATCH, 1.0, big), []) for _ in range(7)]
    huge = store.commit(JournalEntry(EntryKind.BATCH, 1.0, b"y" * 2 * PRUNE_STEP_BYTES), [])
    assert store.prune_journal(huge, PRUNE_STEP) == 2  # a third would pass the step's bytes
    assert store.prune_journal(huge, PRUNE_STEP) == 2
    assert store.prune_journal(huge, PRUNE_STEP) == 2
    assert store.prune_journal(huge, PRUNE_STEP) == 1  # the last of the seven ...
    assert store.prune_journal(huge, PRUNE_STEP) == 1  # ... then the huge one, alone
    assert store.prune_journal(huge, PRUNE_STEP) == 0
    assert ids[-1] < huge and store.journal_length() == 0
    store.close()
