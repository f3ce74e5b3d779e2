"""The agent's routes as aiohttp answered them: 404 for an unknown path, 405 with Allow for a
wrong method, HEAD like GET without the body, /-/reload's ``force``; over a real socket."""

from __future__ import annotations

import aiohttp
import pytest

from probes.agent.http import HttpHooks, start_http
from probes.agent.probe_target import ProbeChoice, ProbeRequestError

from .helpers import free_port

pytestmark = pytest.mark.agent


async def test_routes_methods_and_reload() -> None:
    forced: list[bool] = []

    async def reload(*, force: bool = False) -> str:
        forced.append(force)
        if not force:
            raise ValueError("would remove 2 of the 2 running checks")
        return "reloaded"

    def choose(target: str, module: str) -> ProbeChoice:
        raise ProbeRequestError("module", f"Unknown module {module!r}")

    hooks = HttpHooks(render_metrics=lambda: ["up ", "1\n"], choose_probe=choose,
                      tier_timeout=lambda c: 1.0, reload=reload,
                      health=lambda: {"status": "ok"})
    listen = f"127.0.0.1:{free_port()}"
    server = await start_http(hooks, listen)
    try:
        async with aiohttp.ClientSession(f"http://{listen}") as s:
            async with s.get("/nope") as r:
                assert (r.status, await r.text()) == (404, "404: Not Found")
            async with s.post("/probe") as r:
                assert r.status == 405 and r.headers["Allow"] == "GET, HEAD"
            async with s.get("/-/reload") as r:
                assert r.status == 405 and r.headers["Allow"] == "POST"
            async with s.head("/healthz") as r:
                assert r.status == 200 and int(r.headers["Content-Length"]) > 0
            async with s.get("/healthz") as r:
                assert (await r.json()) == {"status": "ok"}
            async with s.get("/metrics") as r:
                assert await r.text() == "up 1\n"
                assert r.headers["Content-Type"].startswith("text/plain; version=")
            async with s.get("/probe", params={"target": "a", "module": "x y"}) as r:
                assert (r.status, await r.text()) == (400, "Unknown module 'x y'\n")
            async with s.post("/-/reload") as r:
                assert r.status == 400 and "reload refused: would remove" in await r.text()
            async with s.post("/-/reload", params={"force": "true"}) as r:
                assert (r.status, await r.text()) == (200, "reloaded\n")
        assert forced == [False, True]
    finally:
        await server.cleanup()
