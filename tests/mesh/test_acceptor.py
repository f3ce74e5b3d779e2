"""Connections are bare sockets until their request head is complete (probes/mesh/acceptor.py).

Under the abuse benchmark's 1,000 slow clients the mesh accepted and evicted ~650 connections a
second, each through asyncio's server and aiohttp's request handler (a task, a transport, a
timer): ~40 % of the mesh's CPU in that phase. Here a connection whose head is incomplete is a
socket the guard can close synchronously; these tests pin what must not change for agents (a
head in pieces, a head and body in one read, keep-alive) and what strangers now get.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from probes.mesh import acceptor
from probes.mesh.connections import ConnectionGuard
from probes.mesh.server import GUARD_KEY
from tests.mesh.test_abuse import served, status_of


async def send_in_pieces(port: int, data: bytes, piece: int) -> bytes:
    """``data`` a few bytes at a time on a fresh connection; the answer up to the server's close
    (the request asks for one)."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in range(0, len(data), piece):
                writer.write(data[i:i + piece])
                await writer.drain()
                await asyncio.sleep(0.001)
            return await reader.read()
        finally:
            writer.close()


async def test_a_head_sent_in_pieces_is_served(tmp_path: Path) -> None:
    """A blank line split across reads still ends the head; the body follows in pieces."""
    # one byte a write takes ~0.35 s for the head and ~0.3 s for the body here, over twice that
    # on a loaded machine: the abuse tests' 1 s idle and body timeouts cut it off mid-request
    async with served(tmp_path, limits="idle_timeout_seconds: 60\nbody_timeout_seconds: 60\n"
                      ) as mesh:
        for piece in (1, 3, 4096):
            body = mesh.batch()
            request = mesh.head(mesh.signed(body) | {"Connection": "close"}, len(body)) + body
            answer = await send_in_pieces(mesh.port, request, piece)
            assert status_of(answer) == 200, (piece, answer[:300])


async def test_keep_alive_requests_follow_the_first(tmp_path: Path) -> None:
    """The bytes read while waiting for the head go to aiohttp first, later ones after: two
    requests written back to back on one connection are both answered, in order."""
    async with served(tmp_path) as mesh:
        first, second = mesh.batch(), mesh.batch()
        data = (mesh.head(mesh.signed(first), len(first)) + first
                + mesh.head(mesh.signed(second) | {"Connection": "close"}, len(second)) + second)
        answer = await send_in_pieces(mesh.port, data, len(data))
        assert answer.count(b"HTTP/1.1 200") == 2, answer[:600]


async def test_an_endless_head_is_handed_to_aiohttp_and_refused(tmp_path: Path) -> None:
    """Past HEAD_LIMIT bytes without a blank line aiohttp judges the head (and refuses it)."""
    async with served(tmp_path) as mesh:
        head = b"POST /v1/batches HTTP/1.1\r\nX-Pad: " + b"a" * (acceptor.HEAD_LIMIT + 10)
        answer = await mesh.raw(head, wait=5.0)
        assert answer.split(b" ", 2)[1] in (b"400", b"431"), answer[:300]


async def test_waiting_strangers_give_way_first_and_are_cut_off_after_the_idle_timeout(
        tmp_path: Path) -> None:
    """At the cap the oldest connection still sending its head is closed for a newcomer, an
    agent's trusted connection never; a head still incomplete after ``idle_timeout_seconds``
    (1 s here) is closed too."""
    async with served(tmp_path, extra="max_connections: 16\n") as mesh:
        guard: ConnectionGuard = mesh.app[GUARD_KEY]  # type: ignore[index]
        # an agent's keep-alive connection, trusted after one signed request
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.port)
        body = mesh.batch()
        writer.write(mesh.head(mesh.signed(body), len(body)) + body)
        await writer.drain()
        assert b" 200 " in await reader.readuntil(b"\r\n")
        await reader.readuntil(b"}")
        strangers = []
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", mesh.port), timeout=2)
            s.sendall(b"POST /v1/batches HTTP/1.1\r\nHost: mesh\r\n")
            strangers.append(s)
        deadline = time.monotonic() + 10
        while guard.evicted_total < 40 - 15 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert guard.evicted_total >= 40 - 15 and guard.open <= guard.limit
        # the agent's connection is still there: a second request on it goes through
        body = mesh.batch()
        writer.write(mesh.head(mesh.signed(body), len(body)) + body)
        await writer.drain()
        assert b" 200 " in await reader.readuntil(b"\r\n")
        deadline = time.monotonic() + 10  # past the idle timeout every head is cut off
        while guard.heads_waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert guard.heads_waiting == 0
        writer.close()
        for s in strangers:
            s.close()


async def test_a_head_ended_by_bare_line_feeds_is_answered_not_left_waiting(
        tmp_path: Path) -> None:
    """Some clients end lines with LF alone; such a head is handed over as soon as it ends (the
    HTTP parser answers it), not left waiting for the idle timeout."""
    async with served(tmp_path, limits="idle_timeout_seconds: 30\n") as mesh:
        started = time.monotonic()
        answer = await mesh.raw(b"GET /healthz HTTP/1.1\nHost: mesh\nConnection: close\n\n",
                                wait=10.0)
        assert answer.startswith(b"HTTP/1."), answer[:300]
        assert time.monotonic() - started < 10


async def test_serve_forever_returns_when_closed_and_closes_when_cancelled() -> None:
    """The listener keeps asyncio.AbstractServer's contract: serve_forever waits while serving,
    returns on close(), and cancelling it closes the listener."""
    def refuse(sock: socket.socket, _head: bytes) -> None:
        sock.close()

    for stop in ("close", "cancel"):
        listener = await acceptor.Listener.bind("127.0.0.1", 0, 8, ConnectionGuard(8), refuse)
        serving = asyncio.create_task(listener.serve_forever())
        await asyncio.sleep(0.01)
        assert not serving.done() and listener.is_serving()
        if stop == "close":
            listener.close()
        else:
            serving.cancel()
        async with asyncio.timeout(5):
            await asyncio.gather(serving, return_exceptions=True)
        assert serving.cancelled() == (stop == "cancel")
        assert not listener.is_serving()
        assert all(sock.fileno() == -1 for sock in listener.sockets)
