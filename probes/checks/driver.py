"""The one asyncio driver of the protocol cores (as aioquic's protocol is to its connection).

A :class:`Driver` owns the sockets of one check run and pumps one sans-I/O core
(:class:`probes.protocols.core.Core`) over them: it sends what the core queues, feeds it every
datagram that arrives (with its kernel receive time as ``now``), fires its timers, and hands the
check one event at a time::

    driver = Driver(core)
    await driver.open_udp(remote)
    core.start(time.monotonic())
    while (event := await driver.next_event(deadline)) is not None:
        ...  # the check's logic; it may queue more (core.send_data(...)) and return

Order of work in :meth:`Driver.next_event`: the core's pending events first (so a check reacts
to one — persisting a timestamp, say — before the datagram it announced leaves), then a flush,
then due timers, then waiting for the next arrival, the next timer or ``until``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from probes.checks.udp import Datagram, IcmpError, SendStamp, UdpEndpoint
from probes.protocols.core import Address, BadDatagram, Core

E = TypeVar("E")


@dataclass(frozen=True, slots=True)
class Unreachable:
    """An error reported on one of the driver's sockets: ICMP unreachable, or a local one."""

    error: IcmpError
    addr: Address


@dataclass(frozen=True, slots=True)
class Closed:
    """A stream transport ended: the peer closed it (``error`` empty) or it broke."""

    addr: Address
    error: str = ""


class Deframer(Protocol):
    """Turns a byte stream into packets (e.g. OpenVPN's 2-byte length prefix over TCP)."""

    def feed(self, data: bytes) -> list[bytes]: ...


class _Stream:
    """Length-framed packets over one TCP connection with Nagle off."""

    def __init__(self, writer: asyncio.StreamWriter, frame: Callable[[bytes], bytes]) -> None:
        self.writer = writer
        self.frame = frame

    def send(self, data: bytes) -> SendStamp:
        stamp = SendStamp(time.monotonic(), time.time_ns())
        if not self.writer.is_closing():
            self.writer.write(self.frame(data))
        return stamp

    def close(self) -> None:
        self.writer.close()


_Arrival = tuple[Address, Datagram | IcmpError | Closed]
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect_stream(addr: Address, timeout: float) -> Stream:
    """A TCP connection to ``addr`` with Nagle off (small control packets would otherwise wait
    ~40 ms for delayed ACKs). Raises as the OS does (refused, unreachable) or TimeoutError."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), timeout)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


class Driver(Generic[E]):
    def __init__(self, core: Core[E],
                 on_send: Callable[[bytes, Address, SendStamp], None] | None = None) -> None:
        self.core = core
        self.on_send = on_send  # told of every datagram sent (the check keys its send stamps)
        self.datagram: Datagram | None = None  # the arrival whose events are being handed out
        self.last_sent: SendStamp | None = None  # RTTs: from this to a datagram's kernel stamp
        self._endpoints: dict[Address, UdpEndpoint | _Stream] = {}
        self._inbox: deque[_Arrival] = deque()
        self._notes: deque[Unreachable | Closed] = deque()  # the driver's own events
        self._unrouted: deque[tuple[bytes, Address]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._readers: list[asyncio.Task[None]] = []

    # ---- transports --------------------------------------------------------------------------

    async def open_udp(self, addr: Address, *, local_port: int = 0) -> UdpEndpoint:
        """A connected UDP socket to ``addr`` (resolved; ``socket.gaierror`` / ``OSError`` as
        the OS raises them). A datagram the core queues for another address opens one too."""
        endpoint = await UdpEndpoint.open(addr[0], addr[1], local_port=local_port,
                                          sink=lambda item: self._arrived(addr, item))
        self._add(addr, endpoint)
        return endpoint

    def adopt_udp(self, addr: Address, endpoint: UdpEndpoint) -> None:
        """Use an endpoint the check opened itself (e.g. one with a fresh source port)."""
        endpoint.redirect(lambda item: self._arrived(addr, item))
        self._add(addr, endpoint)

    def adopt_stream(self, addr: Address, stream: Stream, frame: Callable[[bytes], bytes],
                     deframer: Deframer) -> None:
        """Carry the core's packets over a connected stream (:func:`connect_stream`), each
        ``frame``-d on the way out and cut out of the byte stream by ``deframer``."""
        reader, writer = stream
        self._add(addr, _Stream(writer, frame))
        self._readers.append(asyncio.create_task(self._read_stream(addr, reader, deframer)))

    async def _read_stream(self, addr: Address, reader: asyncio.StreamReader,
                           deframer: Deframer) -> None:
        while True:
            try:
                chunk = await reader.read(65536)
            except OSError:
                chunk = b""
            if not chunk:
                self._arrived(addr, Closed(addr))
                return
            try:
                packets = deframer.feed(chunk)
            except ValueError as exc:  # a broken frame: the stream cannot be trusted further
                self._arrived(addr, Closed(addr, str(exc)))
                return
            now = time.monotonic()
            for packet in packets:
                self._arrived(addr, Datagram(packet, now, None))

    def _add(self, addr: Address, endpoint: UdpEndpoint | _Stream) -> None:
        old = self._endpoints.pop(addr, None)
        if old is not None:
            old.close()
        self._endpoints[addr] = endpoint

    def _arrived(self, addr: Address, item: Datagram | IcmpError | Closed) -> None:
        self._inbox.append((addr, item))
        if self._waiter is not None:
            _release(self._waiter)

    # ---- sending -----------------------------------------------------------------------------

    def send(self, data: bytes, addr: Address) -> SendStamp | None:
        """One datagram to ``addr`` now (the core's, or one the check builds itself). An error
        the socket reports becomes an :class:`Unreachable` event; a datagram for an address
        without a socket yet (IKEv2 floating to the NAT-T port) waits for :meth:`next_event` to
        open one."""
        endpoint = self._endpoints.get(addr)
        if endpoint is None:
            self._unrouted.append((data, addr))
            return None
        try:
            stamp = endpoint.send(data)
        except IcmpError as exc:
            self._notes.append(Unreachable(exc, addr))
            return None
        self.last_sent = stamp
        if self.on_send is not None:
            self.on_send(data, addr, stamp)
        return stamp

    def flush(self) -> SendStamp | None:
        """Send everything the core has queued; the last send's stamp."""
        stamp = None
        for data, addr in self.core.datagrams_to_send(time.monotonic()):
            stamp = self.send(data, addr) or stamp
        return stamp

    async def _route(self) -> None:
        while self._unrouted:
            data, addr = self._unrouted.popleft()
            if addr not in self._endpoints:
                try:
                    await self.open_udp(addr)
                except OSError as exc:
                    self._notes.append(Unreachable(IcmpError(exc.errno or 0), addr))
                    continue
            self.send(data, addr)

    # ---- the pump ----------------------------------------------------------------------------

    async def next_event(self, until: float) -> E | BadDatagram | Unreachable | Closed | None:
        """The next event of the core or the driver; None once ``until`` (monotonic) passed."""
        core = self.core
        while True:
            event = core.next_event()
            if event is not None:
                return event
            self.flush()
            if self._unrouted:
                await self._route()
            if self._notes:
                return self._notes.popleft()
            now = time.monotonic()
            timer = core.get_timer()
            if timer is not None and now >= timer:
                core.handle_timer(now)
                continue
            if self._inbox:
                addr, item = self._inbox.popleft()
                if isinstance(item, Datagram):
                    self.datagram = item
                    core.receive_datagram(item.data, addr, item.received_monotonic)
                    continue
                return item if isinstance(item, Closed) else Unreachable(item, addr)
            if now >= until:
                return None
            await self._wait((until if timer is None else min(until, timer)) - now)

    async def _wait(self, seconds: float) -> None:
        """Until something arrives or ``seconds`` passed (no task per wait: this is the hot
        path of every handshake)."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        wake = loop.call_later(seconds, _release, waiter)
        try:
            await waiter
        finally:
            wake.cancel()
            self._waiter = None

    def close(self) -> None:
        for task in self._readers:
            task.cancel()
        for endpoint in self._endpoints.values():
            endpoint.close()
        self._endpoints.clear()


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
