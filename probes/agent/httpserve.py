"""A lean HTTP/1.1 keep-alive server for the agent's endpoints: an asyncio Protocol per
connection, heads parsed by :mod:`probes.agent.httphead`, answers written as one buffer.

Why not aiohttp: a ``/probe`` answered through aiohttp's request, response, router and writer
objects cost about a third of the agent's CPU per probe, more than the TCP check it ran
(cProfile under the ``/probe`` benchmark). Here a request costs a head parse and one write.

Bounds (a client cannot make the agent hold more than these):

* one request at a time per connection, answered in order; bytes that arrive meanwhile are
  kept up to :data:`BUFFER_LIMIT`, beyond which reading pauses until the answer is out;
* no next request is answered while the transport holds more than its high-water mark of
  answers the client has not read (pipelined requests for big answers, never read);
* a head over :data:`~probes.agent.httphead.HEAD_LIMIT` bytes, a malformed one or a body over
  :data:`~probes.agent.httphead.BODY_LIMIT` gets a 4xx/5xx naming what was wrong, and the
  connection is closed;
* a connection whose head is still incomplete after :data:`HEAD_TIMEOUT` seconds, or idle
  between requests for :data:`KEEPALIVE_TIMEOUT` seconds, is closed (one sweep a second);
* at most :data:`MAX_CONNECTIONS` are open; a newcomer at the cap closes the longest-idle one,
  or is closed itself when every connection has a request in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any, cast

from probes.agent.httphead import (
    BODY_LIMIT,
    HEAD_LIMIT,
    BadRequest,
    Head,
    head_size,
    parse_head,
)
from probes.checks.base import Started

log = logging.getLogger(__name__)

KEEPALIVE_TIMEOUT = 75.0  # aiohttp's default, which the agent had
HEAD_TIMEOUT = 10.0
MAX_CONNECTIONS = 512
BUFFER_LIMIT = HEAD_LIMIT + BODY_LIMIT
SWEEP_SECONDS = 1.0
HEAD_MEMO_MAX = 256  # distinct request heads whose parse is remembered

TEXT = b"text/plain; charset=utf-8"
JSON = b"application/json; charset=utf-8"


class Answer:
    """A whole answer: its status line and headers are written once, with the body."""

    __slots__ = ("body", "content_type", "extra", "status")

    def __init__(self, status: int, body: bytes, content_type: bytes = TEXT,
                 extra: bytes = b"") -> None:
        self.status, self.body, self.content_type, self.extra = status, body, content_type, extra

    @classmethod
    def text(cls, status: int, text: str) -> Answer:
        return cls(status, text.encode())


def head_of(status: int, content_type: bytes, length: int, keep_alive: bool,
            extra: bytes = b"") -> bytes:
    """A response head (status line and headers, blank line included)."""
    before, after = _head_around_length(status, content_type, keep_alive, extra)
    return b"%s%d%s" % (before, length, after)


@functools.lru_cache(maxsize=64)
def _head_around_length(status: int, content_type: bytes, keep_alive: bool,
                        extra: bytes) -> tuple[bytes, bytes]:
    """A response head but its length, written once per kind of answer."""
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: " % (
                status, HTTPStatus(status).phrase.encode(), content_type),
            b"\r\nConnection: %s\r\n%s\r\n" % (b"keep-alive" if keep_alive else b"close",
                                                 extra))


# answers a request: an Answer now, or None when the handler answers later (Connection.answer)
Handler = Callable[["Connection", Head], Answer | None]


class HttpServer:
    """The listening side: its connections, the handler's tasks and the idle sweep."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections: dict[Connection, None] = {}  # oldest first
        self.tasks: set[asyncio.Task[Answer]] = set()
        self._heads: dict[bytes, Head] = {}
        self._server: asyncio.Server | None = None
        self._sweep: asyncio.TimerHandle | None = None

    async def listen(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Connection(self), host, port,
                                                reuse_address=True)
        self._sweep = loop.call_later(SWEEP_SECONDS, self._sweep_idle)

    def head(self, buf: bytes) -> Head | None:
        """The request head at the start of ``buf`` (see :func:`parse_head`); a scraper sends
        the same head again and again, so a head seen before is not parsed again."""
        size = head_size(buf)
        if size is None:
            return None
        raw = buf[:size]
        head = self._heads.get(raw)
        if head is None:
            head = parse_head(raw)
            assert head is not None
            if len(self._heads) >= HEAD_MEMO_MAX:
                self._heads.clear()
            self._heads[raw] = head
        return head

    def admit(self, newcomer: Connection) -> bool:
        if len(self.connections) >= MAX_CONNECTIONS:
            idle = [c for c in self.connections if not c.busy]
            if not idle:
                return False
            min(idle, key=lambda c: c.last).close()  # the oldest of equals (a coarse clock)
        self.connections[newcomer] = None
        return True

    def _sweep_idle(self) -> None:
        now = asyncio.get_running_loop().time()
        for conn in list(self.connections):
            if not conn.busy and now - conn.last > (HEAD_TIMEOUT if conn.buf else
                                                    KEEPALIVE_TIMEOUT):
                conn.close()
        self._sweep = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep_idle)

    async def cleanup(self) -> None:
        """Stop listening, close every connection, cancel what handlers still run."""
        if self._sweep is not None:
            self._sweep.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.running is not None:
                conn.running.cancel()
            conn.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()


class Connection(asyncio.Protocol):
    """One client connection: heads in, answers out, one request at a time."""

    __slots__ = ("blocked", "buf", "busy", "head_only", "keep_alive", "last", "paused", "running",
                 "server", "skip", "transport")

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.skip = 0  # body bytes still to drop
        self.busy = False  # a request is being answered
        self.keep_alive = True
        self.head_only = False
        self.paused = False  # reading, while the buffer is over its bound
        self.blocked = False  # answering, while the client does not read what it was sent
        self.last = 0.0
        self.running: Started | None = None  # a check run started for the request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.last = asyncio.get_running_loop().time()
        if not self.server.admit(self):
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.pop(self, None)
        self.transport = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        self.blocked = True

    def resume_writing(self) -> None:
        self.blocked = False
        if not self.busy:
            self._resume()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy and not self.blocked:
            self._next()
        elif len(self.buf) > BUFFER_LIMIT and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True

    def _next(self) -> None:
        """Answer the complete requests in the buffer, in order, until one is left pending."""
        while not self.busy and not self.blocked and self.transport is not None:
            if self.skip:
                dropped = min(self.skip, len(self.buf))
                self.buf, self.skip = self.buf[dropped:], self.skip - dropped
                if self.skip:
                    return
            try:
                head = self.server.head(self.buf)
            except BadRequest as exc:
                self.keep_alive, self.head_only = False, False
                self._put(Answer.text(exc.status, f"{exc}\n"))
                return
            if head is None:
                return
            self.buf, self.skip = self.buf[head.size:], head.content_length
            self.busy, self.keep_alive = True, head.keep_alive
            self.head_only = head.method == "HEAD"
            answer = self.server.handler(self, head)
            if answer is not None:
                self._put(answer)

    def answer(self, answer: Answer) -> None:
        """Answer the request in progress (a handler that returned None); then the next."""
        self.running = None
        self._put(answer)
        self._resume()

    def _put(self, answer: Answer) -> None:
        self._write(head_of(answer.status, answer.content_type, len(answer.body),
                            self.keep_alive, answer.extra), answer.body)

    def _write(self, head: bytes, body: bytes) -> None:
        transport = self.transport
        self.busy = False
        if transport is None:
            return
        transport.write(head if self.head_only else head + body)
        self.last = asyncio.get_running_loop().time()
        if not self.keep_alive:
            transport.close()
            self.transport = None

    def _resume(self) -> None:
        if self.transport is None or self.blocked:
            return
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        if self.buf:
            self._next()

    def spawn(self, work: Coroutine[Any, Any, Answer]) -> None:
        """Answer with what ``work`` returns (a 500 naming the error if it raises)."""
        task = asyncio.get_running_loop().create_task(work)
        self.server.tasks.add(task)
        task.add_done_callback(self._spawned)

    def _spawned(self, task: asyncio.Task[Answer]) -> None:
        self.server.tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("request failed: %s: %s", type(exc).__name__, exc)
            self.answer(Answer.text(500, f"500: Internal Server Error ({type(exc).__name__})\n"))
        else:
            self.answer(task.result())
