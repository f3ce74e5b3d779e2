"""A store that cannot commit never leaves the engine and the store apart (issue #17, item 1).

Seen before: on a full disk a failed commit tried to recover by first saving a snapshot, which
failed too, so the engine kept the uncommitted change: engine DOWN seq 2, store UP seq 1, every
later batch 200, and after a restart the next change came as seq 3 with ``previous: DOWN`` — seq 2
existed nowhere. Here the mesh's database lives on a real small filesystem that the test fills.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from probes.model import VerdictState
from tests.diskfull import fill, free, small_filesystem
from tests.mesh.apptest import Mesh, mesh_app

pytestmark = pytest.mark.mesh

AGENTS = ("va", "vb", "vc")


async def _round(mesh: Mesh, seqs: dict[str, int], ok: bool) -> list[int]:
    """Each agent reports n0; an agent resends its batch (same batch_seq) until it is taken,
    as the reporter does. The statuses, in order."""
    statuses = []
    for agent in AGENTS:
        status, _ = await mesh.post(agent, mesh.body(agent, seqs[agent], {"n0": ok}))
        statuses.append(status)
        if status in (200, 409):
            seqs[agent] += 1
    mesh.now += 1.0
    return statuses


def _engine_and_store(mesh: Mesh) -> tuple[tuple[VerdictState, int], tuple[VerdictState, int]]:
    node = mesh.service.engine.nodes["n0"]
    stored = mesh.service.store.node_verdicts()["n0"]
    return (node.state, node.seq), (stored.state, stored.seq)


async def _json(mesh: Mesh, path: str) -> tuple[int, Any]:
    resp = await mesh.client.get(path)
    return resp.status, await resp.json()


async def test_a_full_disk_never_leaves_engine_and_store_apart(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "disk", 4 * 1024 * 1024) as disk:
        extra = f"database: {disk / 'mesh.db'}\ntick_seconds: 0.2\n"
        seqs = dict.fromkeys(AGENTS, 1)
        async with mesh_app(tmp_path / "mesh", extra=extra) as mesh:
            assert await _round(mesh, seqs, True) == [200] * 3
            assert _engine_and_store(mesh) == ((VerdictState.UP, 1), (VerdictState.UP, 1))
            filler = fill(disk)
            for _ in range(4):  # enough failures to take n0 down, had they been applied
                assert set(await _round(mesh, seqs, False)) == {503}
                engine, store = _engine_and_store(mesh)
                assert engine == store == (VerdictState.UP, 1)
            status, health = await _json(mesh, "/healthz")
            assert status == 503 and health["ok"] is False and health["store"] == "failing"
            metrics = await (await mesh.client.get("/metrics")).text()
            assert "tunnelwatch_mesh_store_up 0.0" in metrics
            assert "tunnelwatch_mesh_store_commit_failures_total 1.0" in metrics
            free(filler)
            for _ in range(300):  # the ticker probes the store and comes back by itself
                if (await _json(mesh, "/healthz"))[0] == 200:
                    break
                await asyncio.sleep(0.1)
            assert (await _json(mesh, "/healthz"))[0] == 200
            for _ in range(3):
                assert await _round(mesh, seqs, False) == [200] * 3
            assert _engine_and_store(mesh) == ((VerdictState.DOWN, 2), (VerdictState.DOWN, 2))
            metrics = await (await mesh.client.get("/metrics")).text()
            assert "tunnelwatch_mesh_store_up 1.0" in metrics
        # a restart continues from seq 2: nothing missing, nothing re-announced
        async with mesh_app(tmp_path / "mesh", extra=extra) as again:
            again.now = mesh.now + 5.0  # past the minimum dwell of DOWN (min_dwell_seconds)
            for _ in range(2):
                assert await _round(again, seqs, True) == [200] * 3
            log = [s.verdict for s in again.service.store.verdicts(node="n0")]
            assert [(v.seq, v.previous.value, v.state.value) for v in log] == [
                (1, "UNKNOWN", "UP"), (2, "UP", "DOWN"), (3, "DOWN", "UP")]
