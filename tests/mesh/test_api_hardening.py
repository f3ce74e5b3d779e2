"""Small things an attacker or a sloppy script could do to the API (issue #17, item 9): a
non-UTF-8 Authorization header, an out-of-range ``after``, a negative ``limit``, actor names
with newlines and escape codes. Each is a clean 4xx or a cleaned value, never a 500."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.mesh.apptest import TOKEN, Mesh, mesh_app

pytestmark = pytest.mark.mesh


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async with mesh_app(tmp_path) as m:
        yield m


async def _raw(mesh: Mesh, request: bytes) -> bytes:
    assert mesh.client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.client.server.port)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    return answer


async def test_a_non_utf8_authorization_header_is_401(mesh: Mesh) -> None:
    answer = await _raw(mesh, b"POST /v1/nodes/n0/drain HTTP/1.1\r\nHost: m\r\n"
                              b"Authorization: Bearer \xff\xfe\x80secret\r\nContent-Length: 0\r\n"
                              b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


@pytest.mark.parametrize("query", ["after=1e23", "after=100000000000000000000000",
                                   "after=-1", "after=0&limit=-5", "after=0&limit=0",
                                   "after=0&limit=99999999999999999999999"])
async def test_out_of_range_log_queries_are_400(mesh: Mesh, query: str) -> None:
    resp = await mesh.client.get(f"/v1/verdicts?{query}")
    assert resp.status == 400, await resp.text()


@pytest.mark.parametrize(("actor", "stored"), [
    ("alice\nforged log line", "alice forged log line"),
    ("\x1b[31mred\x1b[0m", "[31mred[0m"),
    ("\u202eevil", "evil"),  # a bidi override: reverses how the rest is shown
    ("  ", "operator"),
    ("x" * 200, "x" * 64),
])
async def test_actor_names_are_sanitised(mesh: Mesh, actor: str, stored: str) -> None:
    resp = await mesh.client.post("/v1/nodes/n0/drain", headers=TOKEN, json={"actor": actor})
    assert resp.status == 200
    assert mesh.service.store.admin_states()["n0"].actor == stored
    log = (await (await mesh.client.get("/v1/verdicts?after=0&node=n0")).json())["log"]
    assert log[-1]["verdict"]["reasons"][0]["note"] == f"DRAINING set by operator {stored}"


async def test_an_admin_body_is_small(mesh: Mesh) -> None:
    resp = await mesh.client.post("/v1/nodes/n0/drain", headers=TOKEN,
                                  data=b'{"actor": "' + b"a" * 100_000 + b'"}')
    assert resp.status == 413
