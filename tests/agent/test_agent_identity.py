"""An agent that loses its state directory is heard again at once; no replay is ever taken.

Lab test of issue 18's first symptom: with ``state_dir`` deleted and the agent restarted, the
mesh used to refuse every batch as a replay (the agent's batch_seq restarted at 0) and the
decision engine ignored every observation as a duplicate (its seq restarted too), while the
agent counted the refused batches as delivered. Here a real mesh (in this process) and a real
``tunnelwatch agent`` process probe a loopback TCP server; the test records every request the
mesh accepted, kills the agent, deletes its state, restarts it, and then replays recorded
requests as an eavesdropper would.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from probes.mesh.config import load_mesh_config
from probes.mesh.gate import SignedBody
from probes.mesh.server import INGEST_KEY, SERVICE_KEY, build_app
from probes.model import signing

from .helpers import FAST_L4, free_port, l4_target, until, write_config
from .test_agent_process import _kill, _start

pytestmark = [pytest.mark.agent, pytest.mark.mesh]

NODES = 3
Recorded = tuple[dict[str, str], bytes]  # the signed headers and body of an accepted batch


def _mesh_config(folder: Path, port: int, key: str) -> Path:
    signing.write_key_file(folder / "va.key", key)
    nodes = "".join(f"  - {{id: node-{i}, pool: pool-a, pop: pop-1, region: eu}}\n"
                    for i in range(NODES))
    (folder / "mesh.yaml").write_text(
        f"listen: 127.0.0.1:{port}\ndatabase: mesh.db\n"
        "agents:\n  - {name: va, key_file: va.key}\n"
        f"nodes:\n{nodes}")
    return folder / "mesh.yaml"


def _recorder(accepted: list[Recorded], bodies: dict[int, bytes]
              ) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware keeping every batch request the mesh answered 2xx, as sent (the body as the
    mesh's gate read it)."""

    @web.middleware
    async def record(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        response = await handler(request)
        if request.path == "/v1/batches" and response.status < 300:
            headers = {k: v for k, v in request.headers.items() if k.startswith("X-Tunnelwatch")}
            accepted.append((headers, bodies.pop(id(request))))
        return response

    return record


async def _replay(url: str, recorded: Recorded) -> int:
    headers, body = recorded
    async with aiohttp.ClientSession() as session, session.post(
            url, data=body, headers={**headers, "Content-Type": "application/json"}) as resp:
        return resp.status


async def test_agent_without_its_state_is_accepted_within_one_batch_and_replays_are_not(
        tmp_path: Path) -> None:
    key = signing.generate_key()
    mesh_dir = tmp_path / "mesh"
    mesh_dir.mkdir()
    port = free_port()
    app = build_app(load_mesh_config(_mesh_config(mesh_dir, port, key)), CollectorRegistry())
    accepted: list[Recorded] = []
    bodies: dict[int, bytes] = {}  # id(request) -> its body, as the gate read it
    app.middlewares.append(_recorder(accepted, bodies))
    read_signed = app[INGEST_KEY].gate.read

    async def read_and_keep(request: web.Request) -> SignedBody:
        signed = await read_signed(request)
        bodies[id(request)] = signed.body
        return signed

    app[INGEST_KEY].gate.read = read_and_keep  # type: ignore[method-assign]
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    ingest, service = app[INGEST_KEY], app[SERVICE_KEY]
    url = f"http://127.0.0.1:{port}/v1/batches"

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    target = await asyncio.start_server(accept, "127.0.0.1", 0)
    target_port = target.sockets[0].getsockname()[1]
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    signing.write_key_file(agent_dir / "mesh.key", key)
    cfg = write_config(
        agent_dir / "agent.yaml", listen=f"127.0.0.1:{free_port()}", tiers=FAST_L4,
        targets=[l4_target(f"node-{i}", target_port) for i in range(NODES)],
        mesh={"endpoints": [f"http://127.0.0.1:{port}"], "key_id": "va",
              "key_file": "mesh.key", "flush_interval": 0.2},
        vantage="va")
    log = agent_dir / "agent.log"
    first = _start(cfg, log)
    second = None
    try:
        await until(lambda: ingest.stats.batches_total >= 4, 60, "four batches accepted")
        await asyncio.to_thread(_kill, first, signal.SIGKILL)
        before_restart = list(accepted)
        shutil.rmtree(agent_dir / "state")  # the agent's whole state: spool, seqs, positions
        batches = ingest.stats.batches_total
        duplicates = service.engine.duplicate_total
        restarted_at = time.time()
        second = _start(cfg, log)
        # the very first batch of the new instance is taken: no refusal before it
        await until(lambda: ingest.stats.batches_total > batches
                    or ingest.stats.rejects["replay"] > 0, 60, "a batch from the new instance")
        assert ingest.stats.rejects["replay"] == 0, "the new instance was refused as a replay"
        await until(lambda: ingest.stats.batches_total > batches + 2, 60, "three more batches")
        assert ingest.stats.rejects["replay"] == 0
        # ... and its observations count: none was dropped as an old duplicate
        assert service.engine.duplicate_total == duplicates
        check = service.engine.check_state("node-0", "va", next(
            name for (node, vantage, name) in service.engine._checks
            if node == "node-0" and vantage == "va"))
        assert check.seen >= restarted_at
        # true replays, as an eavesdropper would send them within the timestamp window: a
        # request of the lost instance, and one of the running instance, both refused
        after_restart = accepted[len(before_restart):]
        for recorded in (before_restart[-1], before_restart[0], after_restart[0]):
            assert await _replay(url, recorded) == 409
        assert ingest.stats.rejects["replay"] == 3
        bodies = [body for _, body in accepted]
        assert len(set(bodies)) == len(bodies), "a request was accepted twice"
    finally:
        await asyncio.to_thread(_kill, first, signal.SIGKILL)
        if second is not None:
            await asyncio.to_thread(_kill, second, signal.SIGKILL)
        target.close()
        await runner.cleanup()
