"""The agent's lean HTTP server over real loopback sockets, on uvloop (as the agent runs) and on
asyncio's own loop: keep-alive, pipelined requests answered in order, HEAD, bodies dropped, a
clear 4xx and a closed connection for a bad head, and the bounds (buffering, idle connections,
the connection cap)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from probes.agent import httpserve
from probes.agent.httphead import HEAD_LIMIT, Head
from probes.agent.httpserve import Answer, Connection, HttpServer

pytestmark = pytest.mark.agent

WAIT = 10.0
BIG = 1 << 20


def handler(conn: Connection, head: Head) -> Answer | None:
    if head.path == "/later":
        async def later() -> Answer:
            await asyncio.sleep(0.05)
            return Answer.text(200, "later")
        conn.spawn(later())
        return None
    if head.path == "/crash":
        async def crash() -> Answer:
            raise RuntimeError("boom")
        conn.spawn(crash())
        return None
    if head.path == "/big":
        return Answer(200, b"x" * BIG)
    return Answer.text(200, f"{head.method} {head.path} {head.query}")


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status_line, *lines = head.strip().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


def on_both_loops(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[str], None]:
    @pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
    def run(loop: str) -> None:
        factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(asyncio.wait_for(test(), WAIT))
    run.__name__ = test.__name__
    return run


async def _serve() -> tuple[HttpServer, int]:
    server = HttpServer(handler)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await server.listen("127.0.0.1", port)
    return server, port


@on_both_loops
async def test_keep_alive_pipelining_head_and_bodies() -> None:
    server, port = await _serve()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # four requests in one write: answered in order, the slow one holding the others back
        writer.write(b"GET /later HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"POST /x?y=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
                     b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"GET /last HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await _read_answer(reader))[2] == b"later"
        assert (await _read_answer(reader))[2] == b"POST /x y=1"  # the body was dropped
        status, headers, _ = await _read_answer_head_only(reader)
        assert status == 200 and headers["content-length"] == str(len("HEAD /h "))
        status, headers, body = await _read_answer(reader)
        assert (status, body, headers["connection"]) == (200, b"GET /last ", "keep-alive")
        writer.write(b"GET /crash HTTP/1.1\r\nHost: a\r\n\r\n")
        status, _, body = await _read_answer(reader)
        assert status == 500 and b"RuntimeError" in body
        writer.write(b"GET /bye HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        status, headers, _ = await _read_answer(reader)
        assert headers["connection"] == "close"
        assert await reader.read() == b""  # closed after the answer
        writer.close()
    finally:
        await server.cleanup()


async def _read_answer_head_only(reader: asyncio.StreamReader
                                 ) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status_line, *lines = head.strip().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, b""


@on_both_loops
async def test_a_bad_head_gets_a_clear_answer_and_the_connection_closes() -> None:
    server, port = await _serve()
    try:
        for raw, status, says in ((b"GET / HTTP/1.1\r\nHost: a\r\nX : y\r\n\r\n", 400,
                                   b"Bad header line"),
                                  (b"GET / HTTP/1.1\r\nX: " + b"x" * (HEAD_LIMIT + 10), 431,
                                   b"longer than 8192 bytes")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            got, headers, body = await _read_answer(reader)
            assert (got, headers["connection"]) == (status, "close") and says in body, body
            assert await reader.read() == b""
            writer.close()
    finally:
        await server.cleanup()


@on_both_loops
async def test_idle_and_incomplete_connections_are_closed(
        ) -> None:
    server, port = await _serve()
    saved = httpserve.KEEPALIVE_TIMEOUT, httpserve.HEAD_TIMEOUT
    httpserve.KEEPALIVE_TIMEOUT = httpserve.HEAD_TIMEOUT = 0.2
    try:
        idle_reader, idle = await asyncio.open_connection("127.0.0.1", port)
        slow_reader, slow = await asyncio.open_connection("127.0.0.1", port)
        slow.write(b"GET / HTTP/1.1\r\n")  # and never the rest
        assert await idle_reader.read() == b""  # within the sweep after the timeout
        assert await slow_reader.read() == b""
        assert not server.connections
        idle.close()
        slow.close()
    finally:
        httpserve.KEEPALIVE_TIMEOUT, httpserve.HEAD_TIMEOUT = saved
        await server.cleanup()


@on_both_loops
async def test_at_the_cap_the_longest_idle_connection_gives_way() -> None:
    server, port = await _serve()
    saved = httpserve.MAX_CONNECTIONS
    httpserve.MAX_CONNECTIONS = 2
    try:
        first_reader, first = await asyncio.open_connection("127.0.0.1", port)
        await _until(lambda: len(server.connections) == 1)
        _, second = await asyncio.open_connection("127.0.0.1", port)
        await _until(lambda: len(server.connections) == 2)
        third_reader, third = await asyncio.open_connection("127.0.0.1", port)
        assert await first_reader.read() == b""  # the oldest idle one made room
        third.write(b"GET /third HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await _read_answer(third_reader))[2] == b"GET /third "
        assert len(server.connections) == 2
        for w in (first, second, third):
            w.close()
    finally:
        httpserve.MAX_CONNECTIONS = saved
        await server.cleanup()


@on_both_loops
async def test_reading_pauses_while_an_answer_is_pending() -> None:
    server, port = await _serve()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /later HTTP/1.1\r\nHost: a\r\n\r\n")
        await _until(lambda: any(c.busy for c in server.connections))
        conn = next(iter(server.connections))
        flood = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n" * 5000  # pipelined, far past the bound
        writer.write(flood)
        await _until(lambda: conn.paused or not conn.busy)
        assert len(conn.buf) <= httpserve.BUFFER_LIMIT + 256 * 1024  # one read past the bound
        assert (await _read_answer(reader))[2] == b"later"
        for _ in range(5000):  # every pipelined request still answered, in order
            assert (await _read_answer(reader))[2] == b"GET /x "
        writer.close()
    finally:
        await server.cleanup()


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


@on_both_loops
async def test_answers_wait_while_the_client_does_not_read_them() -> None:
    """Pipelined requests for big answers, never read: the server stops answering once the
    transport holds more than its high-water mark, instead of buffering every answer."""
    server, port = await _serve()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=4 * BIG)
        writer.write(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n" * 100)  # 100 MB of answers
        await _until(lambda: any(c.blocked for c in server.connections))
        conn = next(iter(server.connections))
        assert conn.transport is not None
        assert conn.transport.get_write_buffer_size() <= 2 * BIG
        assert conn.buf  # the rest wait, unanswered
        for _ in range(100):  # reading, the client gets every answer, in order
            status, _, body = await _read_answer(reader)
            assert status == 200 and len(body) == BIG
        writer.close()
    finally:
        await server.cleanup()
