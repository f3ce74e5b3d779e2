"""The real mesh app on aiohttp's test server, with a real SQLite file: a signed poster and a
view of what was stored. Shared by the ingest, API and hardening tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from probes.mesh.config import load_mesh_config
from probes.mesh.server import SERVICE_KEY, build_app
from probes.model import ObservationBatch, encode, signing
from tests.mesh.helpers import OPERATOR_TOKEN, obs, write_mesh_config

NOW = 1_764_000_000.0
TOKEN = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


class Mesh:
    def __init__(self, client: TestClient[Any, Any], folder: Path) -> None:
        self.client = client
        self.folder = folder
        self.now = NOW
        self.service = client.app[SERVICE_KEY]  # type: ignore[index]

    def key(self, agent: str) -> bytes:
        return signing.load_key(self.folder / f"{agent}.key")

    def body(self, agent: str, seq: int, results: dict[str, bool], **kw: Any) -> bytes:
        observations = [
            obs(n, kw.get("vantage", agent), ok, at=self.now, seq=kw.get("obs_seq"))
            for n, ok in results.items()
        ]
        b = ObservationBatch(
            version=1,
            agent=kw.get("batch_agent", agent),
            batch_seq=seq,
            sent_at=self.now,
            observations=observations,
            epoch=kw.get("epoch", 0),
        )
        return encode(b)

    async def post(
        self, agent: str, body: bytes, *, key_agent: str | None = None, **hdr: str
    ) -> Any:
        headers = signing.signed_headers(
            agent, key_agent or agent, self.key(key_agent or agent), body, self.now
        )
        headers.update(hdr)
        resp = await self.client.post("/v1/batches", data=body, headers=headers)
        return resp.status, await resp.json()

    def stored(self) -> tuple[int, dict[str, tuple[int, int]], int, int]:
        store = self.service.store
        return (
            store.journal_length(),
            store.recover().agents,
            store.verdict_count(),
            self.service.engine.observations_total,
        )


@contextlib.asynccontextmanager
async def mesh_app(
    folder: Path, *, nodes: int = 4, agents: tuple[str, ...] = ("va", "vb", "vc"), extra: str = ""
) -> AsyncIterator[Mesh]:
    """The mesh app serving a fresh config in ``folder`` (or the one already there: a restart),
    its clock the returned :class:`Mesh`'s ``now``."""
    path = folder / "mesh.yaml"
    if not path.exists():
        path = write_mesh_config(folder, nodes, agents, extra="max_body_bytes: 4096\n" + extra)
    holder: dict[str, Mesh] = {}
    app = build_app(load_mesh_config(path), CollectorRegistry(), clock=lambda: holder["m"].now)
    client = TestClient(TestServer(app))
    await client.start_server()
    holder["m"] = Mesh(client, folder)
    try:
        yield holder["m"]
    finally:
        await client.close()
