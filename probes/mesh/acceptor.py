"""Accepting connections cheaply: a new connection is a bare socket until its request head ends.

Under attack (1,000 slow clients sending their headers a byte a second and reconnecting when
closed, against a cap of 512 connections) the mesh accepted and evicted ~650 connections a
second. Through asyncio's server each cost a task, a transport, aiohttp's request handler with a
task and a timer of its own, and the callbacks of its closing: ~43 % of the mesh's busy time in
that phase (cProfile; ~30 % here, at less than half the cost a connection). They came in bursts
of up to 128 accepts in one loop iteration, which the agents' requests then waited behind (their
p99 43.7 ms under attack against 9.9 ms without, on a quiet machine).

Here the loop reads the listening sockets directly:

* at most :data:`ACCEPT_BATCH` connections are accepted per loop iteration, so the agents'
  requests (ready on their own sockets) take turns with a burst of newcomers;
* a newcomer that finds the guard at its cap either makes room (the guard evicts a stranger) or
  is closed at once: no transport, no protocol;
* an admitted connection stays a bare socket whose bytes are collected until its request head
  ends (a blank line) or :data:`HEAD_LIMIT` bytes came; only then does it become an aiohttp
  connection, fed the collected bytes first. A client that never finishes its head costs one
  reader callback per read and is closed synchronously (no callbacks) when evicted, or when its
  head is still incomplete ``idle_timeout`` seconds after it connected (one sweep a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from probes.logutil import RateLimitedLog

if TYPE_CHECKING:
    from probes.mesh.connections import ConnectionGuard

log = logging.getLogger(__name__)
trouble = RateLimitedLog(log)

ACCEPT_BATCH = 16  # connections accepted per loop iteration and listening socket
HEAD_LIMIT = 16 * 1024  # a head longer than this is handed over for aiohttp to refuse (431)
SWEEP_SECONDS = 1.0  # how often heads still incomplete after idle_timeout are looked for
ACCEPT_RETRY_SECONDS = 1.0  # out of descriptors or memory: accept again after this pause
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

# what becomes of a connection once its head is complete: (socket, bytes read so far)
HandOver = Callable[[socket.socket, bytes], None]


def _head_ended(data: bytes, start: int) -> bool:
    """Whether ``data`` holds a blank line at or after ``start``: CRLF CRLF, or bare LFs (which
    HTTP parsers may accept too)."""
    return data.find(b"\n\r\n", start) >= 0 or data.find(b"\n\n", start) >= 0


class Waiting:
    """An accepted connection whose request head is not complete yet."""

    __slots__ = ("_guard", "_hand_over", "_loop", "fd", "head", "opened", "sock")

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 guard: ConnectionGuard, hand_over: HandOver) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.head = b""
        self.opened = loop.time()
        self._loop = loop
        self._guard = guard
        self._hand_over = hand_over
        loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(HEAD_LIMIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # reset by the peer: as good as gone
        if not data:
            self._guard.forget_waiting(self)
            self.close()
            return
        start = max(0, len(self.head) - 2)  # a blank line may straddle two reads
        self.head += data
        if not _head_ended(self.head, start) and len(self.head) < HEAD_LIMIT:
            return
        self._loop.remove_reader(self.fd)
        self._guard.forget_waiting(self)
        self._hand_over(self.sock, self.head)

    def close(self) -> None:
        """Close at once (the guard has already forgotten it)."""
        self._loop.remove_reader(self.fd)
        self.sock.close()


class Listener(asyncio.AbstractServer):
    """Listening sockets whose connections go through ``guard`` (see the module docstring; a
    head is cut off after ``guard.idle_timeout``); ``hand_over`` makes a connection of a socket
    whose head is complete."""

    def __init__(self, sockets: list[socket.socket], guard: ConnectionGuard,
                 hand_over: HandOver) -> None:
        self._sockets = sockets
        self._guard = guard
        self._hand_over = hand_over
        self._loop = asyncio.get_running_loop()
        self._serving = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._resume: asyncio.TimerHandle | None = None
        self._closed = asyncio.Event()

    @classmethod
    async def bind(cls, host: str, port: int, backlog: int, guard: ConnectionGuard,
                   hand_over: HandOver) -> Listener:
        """Listen on every address ``host`` resolves to (raises OSError, as binding does)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _name, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # as asyncio does: one socket per family
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], port, *address[2:]))
                sock.listen(backlog)
                sock.setblocking(False)
                if not port:  # an ephemeral port: the same one for every address
                    port = sock.getsockname()[1]
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        listener = cls(sockets, guard, hand_over)
        listener._start()
        return listener

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def _start(self) -> None:
        self._serving = True
        self._read_listeners()
        self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _address = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    return
                # out of descriptors: stop accepting a while, and say so once per 10 s
                trouble("accept", "accepting paused for %g s: %s", ACCEPT_RETRY_SECONDS, exc)
                self._pause()
                return
            if not self._guard.admit():
                sock.close()  # every slot held by an authenticated client
                continue
            sock.setblocking(False)
            self._guard.add_waiting(Waiting(sock, self._loop, self._guard, self._hand_over))

    def _pause(self) -> None:
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
        if self._resume is None:
            self._resume = self._loop.call_later(ACCEPT_RETRY_SECONDS, self._unpause)

    def _unpause(self) -> None:
        self._resume = None
        if self._serving:
            self._read_listeners()

    def _read_listeners(self) -> None:
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _sweep(self) -> None:
        self._guard.expire_waiting(self._loop.time() - self._guard.idle_timeout)
        self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    # ---- asyncio.AbstractServer ---------------------------------------------------------

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        self._closed.set()
        for handle in (self._sweeper, self._resume):
            if handle is not None:
                handle.cancel()
        for sock in self._sockets:
            with contextlib.suppress(ValueError, OSError):  # already paused: not registered
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._guard.close_waiting()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        return None  # serving from bind() on

    async def serve_forever(self) -> None:
        """Serves until closed; cancelling it closes the listener (as asyncio's Server does)."""
        try:
            await self._closed.wait()
        finally:
            self.close()

    async def wait_closed(self) -> None:
        return None  # closing is synchronous
