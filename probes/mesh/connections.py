"""Serving an aiohttp app with a cap on connections, for a process others may attack.

Without a cap, 1,100 slow clients took every descriptor of a mesh with the common 1,024
open-file limit: legitimate agents could not connect, and each failed accept() logged a line
(157,695 in 30 s). Here:

* at most ``limit`` connections are open at once, and ``limit`` stays below the process's
  open-file limit (a reserve is kept for the store, publishers and snapshots);
* when a new connection arrives at the cap, the oldest connection that never completed an
  authenticated request is closed to make room (a slow or idle stranger gives way to a newcomer;
  an agent whose signed request went through keeps its keep-alive connection); when every
  connection is authenticated, the newcomer is closed instead;
* a new connection costs a socket and a few bytes until its request head is complete
  (:mod:`probes.mesh.acceptor`); one whose head is not complete ``idle_timeout`` seconds after
  it connected is closed, and so is one that sends no request for that long between requests
  (aiohttp's keep-alive timer);
* request bodies are never decompressed, headers and lines are kept small.

:func:`serve` runs the app until SIGINT or SIGTERM, like ``aiohttp.web.run_app``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import signal
import socket
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from probes.aio import run_fast
from probes.logutil import RateLimitedLog, RateLimitFilter, install_loop_exception_limiter
from probes.mesh.acceptor import Listener, Waiting
from probes.startup import bind_error

log = logging.getLogger(__name__)
# aiohttp's own error lines: every malformed request head logged one with a traceback, so any
# client could flood the log; one line per kind per 10 s, without the traceback when the
# client is at fault
server_log = logging.getLogger("aiohttp.server.guarded")
server_log.addFilter(RateLimitFilter(RateLimitedLog(server_log), (HttpProcessingError,)))

BACKLOG = 128  # the listen queue; asyncio accepts up to this many at once before any is seen
# descriptors kept for everything but client connections: the store, publishers, snapshots,
# and one accept burst (a burst is accepted before the guard can close anything)
FD_RESERVE = 64 + BACKLOG


def handler_args(idle_timeout: float) -> dict[str, Any]:
    """Per-connection settings for ``web.Application(handler_args=...)``."""
    return {
        "auto_decompress": False,  # a gzip body is bytes like any other (and refused: 415)
        "keepalive_timeout": idle_timeout,  # from connect and between requests
        "lingering_time": 1.0,  # draining an unread body after answering: a second at most
        "max_headers": 32,
        "max_field_size": 4096,
        "max_line_size": 4096,
    }


def connection_limit(wanted: int) -> int:
    """``wanted``, lowered to fit the process's open-file limit minus a reserve."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    fits = max(16, int(soft) - FD_RESERVE)
    if wanted > fits:
        log.warning("max_connections %d lowered to %d: the open-file limit is %d", wanted,
                    fits, soft)
    return min(wanted, fits)


class ConnectionGuard:
    """Counts connections and decides who gives way at the cap (see the module docstring).

    A connection is *waiting* until its request head is complete (a bare socket, see
    :mod:`probes.mesh.acceptor`), then *untrusted* (an aiohttp connection) until it completes
    an authenticated request, then *trusted*. At the cap the oldest waiting one is evicted
    first, then the oldest untrusted one; trusted ones never are."""

    def __init__(self, limit: int, idle_timeout: float = 30.0) -> None:
        self.limit = limit
        self.idle_timeout = idle_timeout  # a head still incomplete after this is cut off
        self._waiting: dict[Waiting, None] = {}  # oldest first
        self._untrusted: dict[_Guarded, None] = {}  # oldest first
        self._trusted: set[_Guarded] = set()
        self._outer: dict[asyncio.BaseProtocol, _Guarded] = {}
        self.evicted_total = 0  # strangers closed to make room
        self.refused_total = 0  # newcomers closed: every slot held by authenticated clients

    @property
    def open(self) -> int:
        return len(self._waiting) + len(self._untrusted) + len(self._trusted)

    def admit(self) -> bool:
        """Whether a new connection may open, evicting a stranger to make room at the cap."""
        if self.open >= self.limit and not self._evict_one():
            self.refused_total += 1
            return False
        return True

    def trust(self, protocol: object) -> None:
        """The connection carrying ``protocol`` (a request's ``request.protocol``) completed an
        authenticated request: it is not evicted any more."""
        outer = self._outer.get(protocol)  # type: ignore[call-overload]
        if outer is not None and outer in self._untrusted:
            del self._untrusted[outer]
            self._trusted.add(outer)

    def _evict_one(self) -> bool:
        for waiting in self._waiting:
            del self._waiting[waiting]
            waiting.close()
            self.evicted_total += 1
            return True
        for victim in self._untrusted:
            victim.close()
            self._forget(victim)
            self.evicted_total += 1
            return True
        return False

    # ---- connections whose head is not complete (probes.mesh.acceptor) -------------------

    @property
    def heads_waiting(self) -> int:
        """Connections whose request head is not complete yet."""
        return len(self._waiting)

    def add_waiting(self, conn: Waiting) -> None:
        self._waiting[conn] = None

    def forget_waiting(self, conn: Waiting) -> None:
        self._waiting.pop(conn, None)

    def expire_waiting(self, opened_before: float) -> None:
        """Close the connections whose head is still incomplete since before ``opened_before``
        (loop time): slowly sent headers are cut off."""
        while self._waiting:
            oldest = next(iter(self._waiting))
            if oldest.opened >= opened_before:
                return
            del self._waiting[oldest]
            oldest.close()

    def close_waiting(self) -> None:
        while self._waiting:
            self._waiting.popitem()[0].close()

    # ---- aiohttp connections -------------------------------------------------------------

    def _opened(self, conn: _Guarded) -> None:
        self._untrusted[conn] = None
        self._outer[conn.inner] = conn

    def _forget(self, conn: _Guarded) -> None:
        self._untrusted.pop(conn, None)
        self._trusted.discard(conn)
        self._outer.pop(conn.inner, None)


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol, with the guard told when the connection opens and closes, and fed
    first the bytes read while the connection was waiting for its head."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.BaseProtocol,
                 head: bytes = b"") -> None:
        self.guard = guard
        self.inner: Any = inner
        self.head = head
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.guard._opened(self)
        self.inner.connection_made(transport)
        # before the transport reads anything itself (its reader is added after this call)
        head, self.head = self.head, b""
        if head:
            self.inner.data_received(head)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard._forget(self)
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self.inner.eof_received()
        return result

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class GuardedSite(web.TCPSite):
    """A TCP site whose connections go through ``guard``, accepted by a
    :class:`~probes.mesh.acceptor.Listener`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int,
                 guard: ConnectionGuard) -> None:
        super().__init__(runner, host, port)
        self.guard = guard
        self._handing_over: set[asyncio.Task[object]] = set()

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site; the server is made here instead
        listener = await Listener.bind(self._host or "", self._port, BACKLOG, self.guard,
                                       self._hand_over)
        self._server = listener
        sockets = listener.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port

    def _hand_over(self, sock: socket.socket, head: bytes) -> None:
        """A connection whose head is complete becomes aiohttp's, fed ``head`` first."""
        server = self._runner.server
        if server is None:  # the runner is shutting down
            sock.close()
            return
        loop = asyncio.get_running_loop()
        protocol = _Guarded(self.guard, server(), head)
        task = loop.create_task(loop.connect_accepted_socket(lambda: protocol, sock))
        self._handing_over.add(task)
        task.add_done_callback(functools.partial(self._handed_over, sock))

    def _handed_over(self, sock: socket.socket, task: asyncio.Task[object]) -> None:
        self._handing_over.discard(task)
        if task.cancelled() or task.exception() is not None:
            sock.close()  # no transport took it (closing twice is harmless)

    async def stop(self) -> None:
        for task in list(self._handing_over):
            task.cancel()
        await super().stop()


async def start_site(app: web.Application, host: str, port: int,
                     guard: ConnectionGuard) -> tuple[web.AppRunner, GuardedSite]:
    """Set ``app`` up and listen on ``host:port`` (0: any free port) through ``guard``."""
    install_loop_exception_limiter(asyncio.get_running_loop(),
                                   RateLimitedLog(logging.getLogger("asyncio")))
    runner = web.AppRunner(app, access_log=None, logger=server_log)
    await runner.setup()
    site = GuardedSite(runner, host, port, guard)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise bind_error(exc, host, port) from None
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site


async def run_until_signalled(app: web.Application, host: str, port: int,
                              guard: ConnectionGuard) -> None:
    """Serve ``app`` on ``host:port`` through ``guard`` until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner, _site = await start_site(app, host, port, guard)
    log.info("listening on %s:%d (at most %d connections)", host, port, guard.limit)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(app: web.Application, host: str, port: int, guard: ConnectionGuard) -> None:
    run_fast(run_until_signalled(app, host, port, guard))
