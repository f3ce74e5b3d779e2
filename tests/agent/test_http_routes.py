"""The agent's routes as aiohttp answered them: 404 for an unknown path, 405 with Allow for a
wrong method, HEAD like GET without the body, /-/reload's ``force``; over a real socket."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import aiohttp
import pytest

from probes.agent.http import HttpHooks, start_http
from probes.agent.probe_target import ProbeChoice, ProbeRequestError
from probes.checks.l4 import TCP, TcpParams

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


async def test_probes_run_started_or_as_coroutines_and_stop_with_the_server() -> None:
    """A plain connect to an IP literal runs as a started run (no task); a host name takes the
    coroutine; a run still in progress is cancelled when the server stops."""
    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    open_server = await asyncio.start_server(accept, "127.0.0.1", 0)
    open_port = open_server.sockets[0].getsockname()[1]
    stuck = socket.socket()  # listens, never accepts: once its queue is full, SYNs go unanswered
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)
    fillers = [socket.create_connection(stuck.getsockname(), timeout=5)]
    choices = {name: ProbeChoice("tcp", TCP, TcpParams(host=host, port=port), "test", None)
               for name, host, port in (("literal", "127.0.0.1", open_port),
                                        ("name", "localhost", open_port),
                                        ("stuck", "127.0.0.1", stuck.getsockname()[1]))}

    async def reload(*, force: bool = False) -> str:
        return ""

    hooks = HttpHooks(render_metrics=lambda: [], choose_probe=lambda t, m: choices[t],
                      tier_timeout=lambda c: 30.0, reload=reload, health=dict)
    listen = f"127.0.0.1:{free_port()}"
    server = await start_http(hooks, listen)
    try:
        async with aiohttp.ClientSession(f"http://{listen}") as s:
            for target in ("literal", "name"):
                async with s.get("/probe", params={"target": target, "module": "tcp"}) as r:
                    assert r.status == 200 and "probe_success 1.0" in await r.text(), target
            stuck_probe = asyncio.create_task(
                s.get("/probe", params={"target": "stuck", "module": "tcp"}))
            await _until(lambda: any(c.running is not None for c in server.connections))
            assert not server.tasks  # a started run, not a task
            async with asyncio.timeout(5):
                await server.cleanup()
            with pytest.raises(aiohttp.ClientError):
                await stuck_probe  # closed without an answer
    finally:
        await server.cleanup()
        for f in fillers:
            f.close()
        stuck.close()
        open_server.close()


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)
