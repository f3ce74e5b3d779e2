"""The reporter against the real mesh ingest (probes.mesh.server): signatures, schema, replay."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from probes.agent.metrics import ReporterStats
from probes.agent.reporter import Reporter
from probes.mesh.config import load_mesh_config
from probes.mesh.server import INGEST_KEY, SERVICE_KEY, build_app
from probes.model import Observation, Reason, signing

from .helpers import free_port, until

pytestmark = [pytest.mark.agent, pytest.mark.mesh]


def _mesh_config(folder: Path, port: int) -> Path:
    signing.write_key_file(folder / "va.key", signing.generate_key() + "\n")
    (folder / "mesh.yaml").write_text(
        f"listen: 127.0.0.1:{port}\n"
        "database: mesh.db\n"
        "agents:\n  - {name: va, key_file: va.key}\n"
        "nodes:\n  - {id: n0, pool: p0, pop: pop0, region: eu}\n")
    return folder / "mesh.yaml"


async def _start_mesh(folder: Path, port: int) -> tuple[web.Application, web.AppRunner]:
    app = build_app(load_mesh_config(_mesh_config(folder, port)), CollectorRegistry())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return app, runner


async def test_real_mesh_accepts_every_batch_once(tmp_path: Path) -> None:
    port = free_port()
    app, runner = await _start_mesh(tmp_path, port)
    stats = ReporterStats()
    reporter = Reporter(agent="va", endpoints=[f"http://127.0.0.1:{port}"], key_id="va",
                        key=signing.load_key(tmp_path / "va.key"),
                        spool_path=tmp_path / "agent" / "spool.sqlite",
                        spool_max_bytes=10_000_000, batch_max=40, flush_interval=0.1,
                        stats=stats)
    await reporter.start()

    def observation(seq: int) -> Observation:
        return Observation(node="n0", check="tcp:443", vantage="va", seq=seq,
                           wall_time=1_764_000_000.0 + seq, ok=seq % 7 != 0,
                           reason=Reason.OK if seq % 7 else Reason.REFUSED,
                           duration_seconds=0.002, kind="tcp", phases={"connect": 0.002})

    try:
        for _ in range(200):
            reporter.submit(observation)
        await until(lambda: stats.sent_total.get("0", 0) >= 200, 90, "200 accepted")
        ingest = app[INGEST_KEY]
        assert ingest.stats.observations_total == 200
        assert not any(ingest.stats.rejects.values()), ingest.stats.rejects
        assert app[SERVICE_KEY].agent_seq["va"] >= 4  # 200 / 40 batches, batch_seq from 0
        assert stats.batches_total.get(("0", "error"), 0) == 0
    finally:
        await reporter.close(drain_timeout=1)
        await runner.cleanup()


async def test_a_refused_batch_is_kept_and_sent_again_in_a_newer_epoch(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The mesh holds a newer epoch of this agent than the agent's own (its clock was behind
    when it made a new state directory, or a second instance ran under its name): the batch is
    refused, not delivered. The agent keeps it, says why, counts it, and sends it again in an
    epoch above the mesh's; it is taken then, once."""
    port = free_port()
    app, runner = await _start_mesh(tmp_path, port)
    key = signing.load_key(tmp_path / "va.key")

    def reporter(folder: str, stats: ReporterStats, skew: float) -> Reporter:
        return Reporter(agent="va", endpoints=[f"http://127.0.0.1:{port}"], key_id="va", key=key,
                        spool_path=tmp_path / folder / "spool.sqlite",
                        spool_max_bytes=10_000_000, batch_max=40, flush_interval=0.1,
                        stats=stats, wall=lambda: time.time() + skew)

    def observation(seq: int) -> Observation:
        return Observation(node="n0", check="tcp:443", vantage="va", seq=seq,
                           wall_time=1_764_000_000.0 + seq, ok=True, reason=Reason.OK,
                           duration_seconds=0.002, kind="tcp")

    ahead_stats, behind_stats = ReporterStats(), ReporterStats()
    ahead = reporter("ahead", ahead_stats, 0.0)
    behind = reporter("behind", behind_stats, -100.0)  # within the timestamp window
    ingest = app[INGEST_KEY]
    try:
        await ahead.start()
        ahead.submit(observation)
        await until(lambda: ahead_stats.sent_total.get("0", 0) == 1, 90, "the newer epoch")
        await ahead.close(drain_timeout=0)
        await behind.start()
        for _ in range(10):
            behind.submit(observation)
        # the spool drops a batch just after its reply is counted: wait for both
        await until(lambda: behind_stats.sent_total.get("0", 0) == 10
                    and behind_stats.spool_depth == 0, 30, "all ten, later, spool empty")
        assert behind_stats.batches_total[("0", "refused")] == 1
        assert behind_stats.batches_total.get(("0", "duplicate"), 0) == 0
        assert ingest.stats.rejects["replay"] == 1
        assert ingest.stats.observations_total == 11  # each taken once
        assert any(r.levelname == "WARNING" and "refused batch" in r.getMessage()
                   and "holds epoch" in r.getMessage() for r in caplog.records)
        service = app[SERVICE_KEY]
        assert service.agent_epoch["va"] > 0
    finally:
        await behind.close(drain_timeout=1)
        await runner.cleanup()
