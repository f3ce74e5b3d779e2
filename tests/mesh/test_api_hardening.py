"""Small things an attacker or a sloppy script could do to the API (issue #17, item 9): a
non-UTF-8 Authorization header, an out-of-range ``after``, a negative ``limit``, actor names
with newlines and escape codes. Each is a clean 4xx or a cleaned value, never a 500; a
property test sends generated queries, node names and operator bodies to every endpoint."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# ---- whatever a client sends, the API answers it: never a 500 --------------------------------

_values = st.one_of(
    st.sampled_from(["1e23", "-0", "nan", "inf", "0x10", "1_000", " 5", "\x00", "n0", "", "%",
                     "\u202e"]),
    st.sampled_from([2**63 - 1, 2**63, 2**64, 10**23, -(2**63) - 1, -1, 0, 2**31]).map(str),
    st.integers().map(str),
    st.floats().map(repr),
    st.text(max_size=20),
)
_queries = st.fixed_dictionaries({}, optional=dict.fromkeys(("after", "limit", "node", "x"),
                                                          _values))
_bodies = st.one_of(
    st.binary(max_size=64),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                 lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.sampled_from(["actor", "note", "x"]), inner, max_size=3),
                 max_leaves=6).map(lambda doc: json.dumps(doc).encode()),
)
_requests = st.tuples(_queries, st.one_of(st.just("n0"), st.text(max_size=30)), _bodies,
                      st.sampled_from(["drain", "maintenance", "ready", "explode"]))
GET_PATHS = ("/v1/verdicts", "/v1/nodes", "/v1/audit", "/v1/paths", "/healthz", "/metrics")


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(requests=st.lists(_requests, min_size=2, max_size=8))
def test_no_request_gets_a_500(tmp_path_factory: pytest.TempPathFactory,
                               requests: list[tuple[dict[str, str], str, bytes, str]]) -> None:
    """Generated queries (numbers far out of range, floats, text) to every GET endpoint, node
    names, operator bodies (any JSON, any bytes) to every action: each is answered with a
    status below 500."""
    async def run() -> None:
        async with mesh_app(tmp_path_factory.mktemp("api")) as mesh:
            for query, node, body, action in requests:
                node_path = "/v1/nodes/" + quote(node, safe="")
                asked = [("GET", path, query, b"") for path in (*GET_PATHS, node_path)]
                asked.append(("POST", f"{node_path}/{action}", {}, body))
                for method, path, params, data in asked:
                    resp = await mesh.client.request(method, path, params=params, data=data,
                                                     headers=TOKEN)
                    text = await resp.text()
                    assert resp.status < 500, (method, path, params, data, resp.status,
                                               text[:300])

    asyncio.run(run())
