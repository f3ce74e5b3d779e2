"""The reporter against the real mesh ingest (probes.mesh.server): signatures, schema, replay."""

from __future__ import annotations

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


async def test_real_mesh_accepts_every_batch_once(tmp_path: Path) -> None:
    port = free_port()
    cfg = load_mesh_config(_mesh_config(tmp_path, port))
    app = build_app(cfg, CollectorRegistry())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
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
        await until(lambda: stats.sent_total.get("0", 0) >= 200, 30, "200 accepted")
        ingest = app[INGEST_KEY]
        assert ingest.stats.observations_total == 200
        assert not any(ingest.stats.rejects.values()), ingest.stats.rejects
        assert app[SERVICE_KEY].agent_seq["va"] >= 4  # 200 / 40 batches, batch_seq from 0
        assert stats.batches_total.get(("0", "error"), 0) == 0
    finally:
        await reporter.close(drain_timeout=1)
        await runner.cleanup()
