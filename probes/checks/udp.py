"""A connected asyncio UDP endpoint for protocol probes (WireGuard, OpenVPN/UDP, IKEv2, ...).

Why not ``loop.create_datagram_endpoint``: it hides ancillary data. A probe wants two things from
the kernel that only ``recvmsg`` gives:

* ``IP_RECVERR`` / ``IPV6_RECVERR``: ICMP errors (port/host unreachable) for a *connected* socket
  land on the socket's error queue with their type, code and the offending router's address. No
  root needed. Without it an unconnected socket just times out.
* ``SO_TIMESTAMPNS``: the kernel's receive time of each datagram, so an RTT does not include the
  time the event loop took to notice the packet.

Both are parsed by :mod:`probes.checks.errqueue`.

Usage::

    async with await UdpEndpoint.open(host, port) as udp:
        sent = udp.send(payload)             # SendStamp
        datagram = await udp.recv(timeout)   # Datagram, or None on timeout; IcmpError if ICMP came
        rtt = round_trip_seconds(sent, datagram)
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from probes.checks.errqueue import (
    ICMP_ORIGINS,
    SO_EE_ORIGIN_ICMP6,
    Ancillary,
    enable_error_queue,
    enable_receive_timestamps,
    kernel_timestamp_ns,
    parse_extended_error,
)
from probes.model import Reason

_MAX_DATAGRAM = 65535
_ANCILLARY = 512


@dataclass(frozen=True, slots=True)
class Datagram:
    data: bytes
    received_monotonic: float  # when the event loop read it
    kernel_wall_ns: int | None  # kernel receive timestamp (CLOCK_REALTIME), if the kernel gave one


@dataclass(frozen=True, slots=True)
class SendStamp:
    monotonic: float
    wall_ns: int


class IcmpError(OSError):
    """An error reported for our connected socket: an ICMP message, or a local send/receive error.

    ``origin`` is SO_EE_ORIGIN_* (ICMP, ICMP6, LOCAL, or 0 when the kernel gave only an errno).
    """

    def __init__(self, err: int, origin: int = 0, icmp_type: int | None = None,
                 icmp_code: int | None = None, offender: str | None = None) -> None:
        super().__init__(err, describe_icmp(err, origin, icmp_type, icmp_code, offender))
        self.origin = origin
        self.icmp_type = icmp_type
        self.icmp_code = icmp_code
        self.offender = offender

    @property
    def from_icmp(self) -> bool:
        return self.origin in ICMP_ORIGINS or (
            self.origin == 0 and self.errno == errno.ECONNREFUSED)

    @property
    def reason(self) -> Reason:
        """The closed-enum reason a check should report for this error."""
        if self.from_icmp:
            return Reason.ICMP_UNREACHABLE
        if self.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL):
            return Reason.NETWORK_UNREACHABLE
        return Reason.PROBE_ERROR


def describe_icmp(err: int, origin: int, icmp_type: int | None, icmp_code: int | None,
                  offender: str | None) -> str:
    text = errno.errorcode.get(err, str(err))
    if origin in ICMP_ORIGINS:
        family = "ICMPv6" if origin == SO_EE_ORIGIN_ICMP6 else "ICMP"
        text += f" ({family} type {icmp_type} code {icmp_code}"
        text += f" from {offender})" if offender else ")"
    return text


def round_trip_seconds(sent: SendStamp, received: Datagram) -> float:
    """RTT of one exchange, from the kernel receive timestamp when it is trustworthy.

    The kernel stamp is wall-clock time, so it is used only if it lands inside the monotonic
    bound (a clock step in between would otherwise produce a negative or inflated RTT).
    """
    monotonic_rtt = received.received_monotonic - sent.monotonic
    if received.kernel_wall_ns is not None:
        kernel_rtt = (received.kernel_wall_ns - sent.wall_ns) / 1e9
        if 0.0 <= kernel_rtt <= monotonic_rtt:
            return kernel_rtt
    return monotonic_rtt


def parse_error_queue_message(ancdata: Ancillary) -> IcmpError | None:
    """Turn the ancillary data of one MSG_ERRQUEUE message into an :class:`IcmpError`."""
    entry = parse_extended_error(ancdata)
    if entry is None:
        return None
    if not entry.from_icmp:  # a local error: type and code mean nothing
        return IcmpError(entry.err, entry.origin)
    return IcmpError(entry.err, entry.origin, entry.icmp_type, entry.icmp_code, entry.offender)


class UdpEndpoint:
    """A non-blocking connected UDP socket driven by the running event loop."""

    def __init__(self, sock: socket.socket, remote: tuple[str, int],
                 sink: Callable[[Datagram | IcmpError], None] | None = None) -> None:
        self.sock = sock
        self.remote = remote
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Datagram | IcmpError] = asyncio.Queue()
        # where arrivals go: this endpoint's own queue (recv), or a driver's inbox
        self._sink = sink or self._queue.put_nowait
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def redirect(self, sink: Callable[[Datagram | IcmpError], None]) -> None:
        """Hand arrivals to ``sink`` from now on (what is queued already goes first)."""
        while not self._queue.empty():
            sink(self._queue.get_nowait())
        self._sink = sink

    @classmethod
    async def open(cls, host: str, port: int, *, local_port: int = 0,
                   sink: Callable[[Datagram | IcmpError], None] | None = None) -> UdpEndpoint:
        """Resolve, bind and connect. Raises ``socket.gaierror`` / ``OSError`` as the OS does."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, proto, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM, proto)
        try:
            sock.setblocking(False)
            enable_error_queue(sock)
            enable_receive_timestamps(sock)
            if local_port:
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", local_port))  # noqa: S104
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return cls(sock, (str(address[0]), int(address[1])), sink)

    @property
    def local_address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def send(self, data: bytes) -> SendStamp:
        """Send one datagram now. A pending ICMP error surfaces here as :class:`IcmpError`."""
        stamp = SendStamp(time.monotonic(), time.time_ns())
        try:
            self.sock.send(data)
        except BlockingIOError:
            pass  # a full send buffer on UDP: the datagram is lost, like on the wire
        except OSError as exc:
            queued = self._drain_error_queue()
            raise queued or IcmpError(exc.errno or 0) from None
        return stamp

    async def recv(self, timeout: float) -> Datagram | None:
        """The next datagram, None after ``timeout`` seconds; raises :class:`IcmpError`."""
        try:
            item = await asyncio.wait_for(self._queue.get(), max(timeout, 0.0))
        except TimeoutError:
            return None
        if isinstance(item, IcmpError):
            raise item
        return item

    def _drain_error_queue(self) -> IcmpError | None:
        first: IcmpError | None = None
        while True:
            try:
                _, ancdata, _, _ = self.sock.recvmsg(_MAX_DATAGRAM, _ANCILLARY, socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return first
            except OSError:
                return first
            error = parse_error_queue_message(ancdata)
            if error is not None and first is None:
                first = error
            if error is None:
                return first

    def _on_readable(self) -> None:
        # the error queue first: reading it clears the socket's pending error, so the ICMP
        # message is reported once, with its details
        sink = self._sink
        error = self._drain_error_queue()
        if error is not None:
            sink(error)
        for _ in range(64):  # bounded, so a flood cannot starve the loop
            try:
                data, ancdata, _, _ = self.sock.recvmsg(_MAX_DATAGRAM, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                sink(self._drain_error_queue() or IcmpError(exc.errno or 0))
                return
            sink(Datagram(data, time.monotonic(), kernel_timestamp_ns(ancdata)))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()

    async def __aenter__(self) -> UdpEndpoint:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()
