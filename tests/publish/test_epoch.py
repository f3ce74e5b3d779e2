"""A reset or restored mesh database must not make receivers ignore its verdicts (issue #17,
item 6). Verdicts carry the epoch of the store that logged them (a new one at every start of a
SQLite store, never lower than the last); receivers order by (epoch, seq).

Real pieces: the mesh app with its webhook publisher, the reference receiver, SQLite files that
the test deletes (a reset) or copies back (a restore from backup)."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from probes.mesh.publish.receiver import Receiver, build_receiver_app, load_receiver_config
from probes.model import VerdictState
from probes.model.signing import write_key_file
from tests.mesh.apptest import Mesh, mesh_app
from tests.publish.helpers import KEY

pytestmark = pytest.mark.publish

AGENTS = ("va", "vb", "vc")
DB_FILES = ("mesh.db", "mesh.db-wal", "mesh.db.snapshot", "mesh.db.snapshot-wal")


@asynccontextmanager
async def reference_receiver(folder: Path) -> AsyncIterator[tuple[Receiver, int]]:
    folder.mkdir()
    write_key_file(folder / "hook.key", KEY)
    (folder / "receiver.yaml").write_text(
        "listen: 127.0.0.1:1\nkeys:\n  - {key_id: k1, key_file: hook.key}\n"
        "state_file: state.json\n")
    cfg, base = load_receiver_config(folder / "receiver.yaml")
    app, receiver = build_receiver_app(cfg, base)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield receiver, site.port
    finally:
        await runner.cleanup()


def publisher(port: int) -> str:
    return (f"tick_seconds: 0.2\npublishers:\n  - {{type: webhook, name: hook, "
            f"url: 'http://127.0.0.1:{port}/v1/verdicts', key_id: k1, key_file: hook.key, "
            "retry: {initial_backoff: 0.05, max_backoff: 0.2, poll_interval: 0.02}}\n")


class Fleet:
    """Three agents reporting n0; each keeps its batch_seq across mesh restarts, as a real
    agent's spool does (a reset mesh has no record of them and takes any)."""

    def __init__(self) -> None:
        self.seq = dict.fromkeys(AGENTS, 1)

    async def rounds(self, mesh: Mesh, ok: bool, n: int) -> None:
        mesh.now += 5.0  # past the minimum dwell of the last change (decision.min_dwell_seconds)
        for _ in range(n):
            for agent in AGENTS:
                status, _ = await mesh.post(agent, mesh.body(agent, self.seq[agent], {"n0": ok}))
                assert status == 200
                self.seq[agent] += 1
            mesh.now += 1.0


async def settled(receiver: Receiver, state: VerdictState, seq: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        last = receiver.ledger.latest.get("n0")
        if last is not None and (last.state, last.seq) == (state, seq):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"receiver has {receiver.ledger.latest.get('n0')}, not {state} {seq}")


async def test_a_reset_database_is_followed_by_receivers(tmp_path: Path) -> None:
    async with reference_receiver(tmp_path / "receiver") as (receiver, port):
        folder = tmp_path / "mesh"
        (folder).mkdir()
        write_key_file(folder / "hook.key", KEY)
        fleet = Fleet()
        async with mesh_app(folder, extra=publisher(port)) as mesh:
            await fleet.rounds(mesh, True, 1)
            await fleet.rounds(mesh, False, 3)
            await fleet.rounds(mesh, True, 2)
            await settled(receiver, VerdictState.UP, 3)
            first = receiver.ledger.latest["n0"]
            now = mesh.now
        for name in DB_FILES:  # the database is lost and the mesh starts empty
            (folder / name).unlink(missing_ok=True)
        async with mesh_app(folder) as mesh:
            mesh.now = now
            await fleet.rounds(mesh, True, 1)  # seq 1 again, in a new epoch
            await fleet.rounds(mesh, False, 3)
            await settled(receiver, VerdictState.DOWN, 2)
        assert receiver.ledger.latest["n0"].epoch > first.epoch


async def test_a_restored_database_is_followed_by_receivers(tmp_path: Path) -> None:
    async with reference_receiver(tmp_path / "receiver") as (receiver, port):
        folder = tmp_path / "mesh"
        backup = tmp_path / "backup"
        folder.mkdir()
        backup.mkdir()
        write_key_file(folder / "hook.key", KEY)
        fleet = Fleet()
        async with mesh_app(folder, extra=publisher(port)) as mesh:
            await fleet.rounds(mesh, True, 1)
            await settled(receiver, VerdictState.UP, 1)
            for name in DB_FILES:  # yesterday's backup: n0 UP seq 1
                if (folder / name).exists():
                    shutil.copy(folder / name, backup / name)
            await fleet.rounds(mesh, False, 3)
            await fleet.rounds(mesh, True, 2)
            await settled(receiver, VerdictState.UP, 3)
            now = mesh.now
        for name in DB_FILES:
            (folder / name).unlink(missing_ok=True)
            if (backup / name).exists():
                shutil.copy(backup / name, folder / name)
        async with mesh_app(folder) as mesh:  # the restored mesh: UP seq 1, it goes DOWN: seq 2
            mesh.now = now
            await fleet.rounds(mesh, False, 3)
            await settled(receiver, VerdictState.DOWN, 2)
