"""Corroboration on demand end to end, through the real endpoints: a real mesh (its app on a TCP
port, SQLite) asks a real agent to re-probe a check another vantage saw fail, in the reply to
the agent's batch; what became of the request is on the agent's own /metrics (``honoured``, or
``busy`` when the check happened to be running or due at that moment; ``disabled`` when the
agent is told not to honour requests), and the mesh's /metrics counts it ``sent``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from probes.agent.runtime import Agent
from probes.mesh.config import load_mesh_config
from probes.mesh.server import SERVICE_KEY, build_app
from probes.model import ObservationBatch, Reason, encode, signing
from tests.mesh.helpers import obs, write_mesh_config

from .helpers import free_port, l4_target, until, write_config

pytestmark = [pytest.mark.agent, pytest.mark.mesh]

# two nodes, so that the agent sends a batch every 1.5 s: the request rides on the next one
TIERS = {"l4": {"interval": 3.0, "timeout": 0.5, "fast_interval": 0.25, "jitter": 0.0}}
WAIT = 60.0  # generous deadlines for what does come (a loaded machine is only slower)


async def _listener() -> tuple[asyncio.Server, int]:
    async def accept(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _mesh(folder: Path, port: int) -> AsyncIterator[web.Application]:
    # a request waits for the agent's next batch: on a loaded machine that may take longer than
    # the default max_delay_seconds (2), and an expired request never reaches the agent
    cfg = load_mesh_config(write_mesh_config(folder, 2, ["va", "vb"], port=port,
                                             extra="reprobe: {max_delay_seconds: 60}\n"))
    app = build_app(cfg, CollectorRegistry())
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield app
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("honour", [True, False])
async def test_a_request_from_the_mesh_is_counted_on_both_metrics_endpoints(
        tmp_path: Path, honour: bool) -> None:
    server, node_port = await _listener()
    mesh_port = free_port()
    gen = _mesh(tmp_path / "mesh", mesh_port)
    app = await anext(gen)
    service = app[SERVICE_KEY]
    agent_addr = f"127.0.0.1:{free_port()}"
    check = f"tcp:{node_port}"
    cfg = write_config(
        tmp_path / "agent.yaml", listen=agent_addr, tiers=TIERS, vantage="vb",
        targets=[{**l4_target("n0", node_port), "pool": "p0"},
                 {**l4_target("n1", node_port), "pool": "p0"}],
        mesh={"endpoints": [f"http://127.0.0.1:{mesh_port}"], "key_id": "vb",
              "key_file": str(tmp_path / "mesh" / "vb.key"), "flush_interval": 0.05,
              "reprobe": honour})
    doc = yaml.safe_load(cfg.read_text())
    doc["agent"]["max_start_lag"] = 60.0  # a loaded machine starts probes late: run them anyway
    cfg.write_text(yaml.safe_dump(doc))
    agent = Agent(cfg, use_apscheduler=False)
    await agent.start()
    try:
        def seen(node: str) -> bool:
            nv = service.engine.nodes[node].nvs.get("vb")
            return nv is not None and any(c.name == check for c in nv.checks)

        await until(lambda: seen("n0"), WAIT, "vb's first result for n0 at the mesh")
        # va (a vantage the test plays) sees n0's check begin failing now
        key = signing.load_key(tmp_path / "mesh" / "va.key")
        now = time.time()
        batch = ObservationBatch(version=1, agent="va", batch_seq=1, sent_at=now, observations=[
            obs("n0", "va", True, check=check, kind="tcp", at=now - 1),
            obs("n0", "va", False, check=check, kind="tcp", at=now, reason=Reason.TIMEOUT)])
        body = encode(batch)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:
            headers = signing.signed_headers("va", "va", key, body, now)
            async with http.post(f"http://127.0.0.1:{mesh_port}/v1/batches", data=body,
                                 headers=headers) as r:
                assert r.status == 200, await r.text()
            requests = agent.scheduler.stats.reprobe_requests
            await until(lambda: sum(requests.values()) >= 1, WAIT, "the request at vb")
            async with http.get(f"http://{agent_addr}/metrics") as r:
                text = await r.text()
            for name, count in requests.items():
                line = (f'tunnelwatch_scheduler_reprobe_requests_total{{result="{name}",'
                        f'vantage="vb"}} {float(count)}')
                assert line in text, line
            assert sum(requests.values()) == 1
            if honour:  # honoured: n0's check ran again at once, not at its next slot
                assert requests["honoured"] + requests["busy"] == 1, requests
                if requests["honoured"]:
                    await until(lambda: agent.scheduler.stats.reprobes_total == 1, WAIT,
                                "the re-probe")
            else:
                assert requests["disabled"] == 1, requests
            async with http.get(f"http://127.0.0.1:{mesh_port}/metrics") as r:
                mesh_text = await r.text()
            assert 'tunnelwatch_mesh_reprobe_requests_total{result="sent"} 1.0' in mesh_text
    finally:
        await agent.stop(drain_timeout=0)
        await gen.aclose()
        server.close()
        await server.wait_closed()
