"""SIGKILL a real ``tunnelwatch mesh`` process mid-stream, restart it on the same database: the
verdict log is exactly what one uninterrupted engine would have produced — nothing missing,
nothing announced twice — and the engine state carried over (rise/fall counters included, or the
later verdicts would differ)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from probes.mesh.decision import DecisionEngine
from probes.mesh.policy import DampingPolicy, DecisionPolicy
from probes.model import ObservationBatch
from tests.mesh.helpers import fleet, obs, write_mesh_config
from tests.mesh.process import MeshProcess, free_port, post

pytestmark = pytest.mark.mesh

AGENTS = ("va", "vb", "vc")
NODES = 20
ROUNDS = 30
KILL_AFTER = 40  # acknowledged batches before the kill


def script() -> list[ObservationBatch]:
    """Deterministic rounds: every few rounds a different fifth of the fleet fails everywhere."""
    batches = []
    obs_seq = dict.fromkeys(AGENTS, 0)
    start = time.time()  # the mesh drops observations older than max_age_seconds
    for r in range(ROUNDS):
        for a, agent in enumerate(AGENTS):
            items = []
            for i in range(NODES):
                obs_seq[agent] += 1
                ok = (i + r // 4) % 5 != 0 or (r % 7 == 3 and a == 0)
                items.append(obs(f"n{i}", agent, ok, seq=obs_seq[agent], at=start + r))
            batches.append(
                ObservationBatch(
                    version=1, agent=agent, batch_seq=r + 1, sent_at=start + r, observations=items
                )
            )
    return batches


@pytest.fixture
def mesh_process(tmp_path: Path) -> Iterator[MeshProcess]:
    # snapshots every 7 entries, in forked children: some are in flight when the mesh is killed
    # (and vantages never go stale, however slow a loaded CI machine restarts the mesh)
    extra = (
        "snapshot_every: 7\n"
        "decision:\n  damping: {enabled: false}\n  stale_after_seconds: 3600\n"
        "  max_age_seconds: 0\n  min_dwell_seconds: 0\n"
    )
    config = write_mesh_config(tmp_path, NODES, AGENTS, port=free_port(), extra=extra)
    mesh = MeshProcess(config, int(config.read_text().split("listen: 127.0.0.1:")[1].split()[0]))
    try:
        yield mesh
    finally:
        mesh.kill()


def test_sigkill_mid_stream_then_restart(mesh_process: MeshProcess, tmp_path: Path) -> None:
    batches = script()
    mesh_process.start()
    pending: list[ObservationBatch] = []
    for n, batch in enumerate(batches):
        if n < KILL_AFTER:
            assert post(mesh_process, tmp_path, batch) == 200
        elif n == KILL_AFTER:
            # kill while this batch is in flight: it may or may not have been committed
            killer = threading.Timer(0.001, mesh_process.kill)
            killer.start()
            post(mesh_process, tmp_path, batch)
            killer.join()
            pending.append(batch)  # resent either way: the agent cannot know
        else:
            pending.append(batch)
    assert mesh_process.proc is not None and mesh_process.proc.returncode == -signal.SIGKILL

    mesh_process.start()
    log_before = mesh_process.get("/v1/verdicts?after=0&limit=100000")["log"]
    states = {n["node"]: (n["state"], n["seq"]) for n in mesh_process.get("/v1/verdicts")["nodes"]}
    last = {}
    for entry in log_before:
        last[entry["verdict"]["node"]] = (entry["verdict"]["state"], entry["verdict"]["seq"])
    assert {n: s for n, s in states.items() if s[1]} == last  # state intact, matches the log

    # the agents resend what was not acknowledged: already stored -> 409, else 200
    first = pending[0]
    assert post(mesh_process, tmp_path, first) in (200, 409)
    for batch in pending[1:]:
        assert post(mesh_process, tmp_path, batch) == 200
    log = mesh_process.get("/v1/verdicts?after=0&limit=100000")["log"]
    exe = Path(sys.executable).parent / "tunnelwatch"
    table = subprocess.run(
        [str(exe), "status", "--once", "--url", mesh_process.base],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    mesh_process.stop()  # SIGTERM: a clean shutdown snapshots everything
    assert mesh_process.proc is not None and mesh_process.proc.returncode == 0
    mesh_process.start()
    assert mesh_process.get("/healthz")["replayed_at_start"] == 0
    assert mesh_process.get("/v1/verdicts?after=0&limit=100000")["log"] == log
    mesh_process.stop()
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()
    assert rows[0].split()[:4] == ["node", "va", "vb", "vc"]
    assert len([r for r in rows if r[:1] == "n" and r[1:2].isdigit()]) == NODES

    # reference: one uninterrupted engine over the same batches
    policy = DecisionPolicy(
        damping=DampingPolicy(enabled=False), stale_after_seconds=3600, max_age_seconds=0,
        min_dwell_seconds=0,
    )
    engine = DecisionEngine(policy, fleet(NODES))
    expected = []
    for batch in batches:
        expected += engine.observe(batch.observations, 1.0)
    got = [
        (e["verdict"]["node"], e["verdict"]["seq"], e["verdict"]["previous"], e["verdict"]["state"])
        for e in log
    ]
    want = [(v.node, v.seq, v.previous.value, v.state.value) for v in expected]
    assert len(want) > 2 * NODES  # the script really moves verdicts around
    assert sorted(got) == sorted(want)  # none missing, none twice
    assert len({(n, s) for n, s, _, _ in got}) == len(got)
    # per node, the log is in order
    for node in {n for n, *_ in got}:
        assert [s for n, s, *_ in got if n == node] == sorted(s for n, s, *_ in got if n == node)
    assert [e["id"] for e in log] == sorted(e["id"] for e in log)
