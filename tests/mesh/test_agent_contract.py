"""The agent's real reporter (probes/agent/reporter.py) against the real mesh app: the signing,
headers, batch format and sequence numbers of both sides agree."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from probes.agent.reporter import Reporter
from probes.mesh.config import load_mesh_config
from probes.mesh.server import INGEST_KEY, SERVICE_KEY, build_app
from probes.model import Observation, Reason, signing
from tests.mesh.helpers import write_mesh_config

pytestmark = pytest.mark.mesh
AGENTS = ("va", "vb", "vc")


async def test_agent_reporter_feeds_the_mesh(tmp_path: Path) -> None:
    cfg = load_mesh_config(write_mesh_config(tmp_path / "mesh", 3, AGENTS))
    app = build_app(cfg, CollectorRegistry())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    reporters = [
        Reporter(
            agent=agent,
            endpoints=[f"http://127.0.0.1:{server.port}"],
            key_id=agent,
            key=signing.load_key(tmp_path / "mesh" / f"{agent}.key"),
            spool_path=tmp_path / f"{agent}.spool",
            spool_max_bytes=1 << 20,
            flush_interval=0.05,
        )
        for agent in AGENTS
    ]
    try:
        for r in reporters:
            await r.start()
        for round_ in range(4):
            for r in reporters:
                for i in range(3):
                    ok = not (i == 2 and round_ >= 1)  # n2 fails everywhere from round 1

                    def build(seq: int, r: Reporter = r, i: int = i, ok: bool = ok) -> Observation:
                        return Observation(
                            node=f"n{i}",
                            check="wg",
                            vantage=r.agent,
                            seq=seq,
                            wall_time=time.time(),
                            ok=ok,
                            reason=Reason.OK if ok else Reason.TIMEOUT,
                            duration_seconds=0.01,
                            kind="wireguard.handshake",
                        )

                    r.submit(build)
                await r.commit()
            await asyncio.sleep(0.2)
        service = app[SERVICE_KEY]
        deadline = time.monotonic() + 20
        while service.engine.observations_total < 36 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert service.engine.observations_total == 36
        assert app[INGEST_KEY].stats.rejects == dict.fromkeys(app[INGEST_KEY].stats.rejects, 0)
        states = {n: node.state.value for n, node in service.engine.nodes.items()}
        assert states == {"n0": "UP", "n1": "UP", "n2": "DOWN"}
    finally:
        for r in reporters:
            await r.close(drain_timeout=1)
        await server.close()
