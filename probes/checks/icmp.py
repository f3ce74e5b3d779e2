"""ICMP for the L4 probes: echo packets, the kernel's error queue, kernel receive timestamps.

Three kernel facilities do the work without root:

* ``IP_RECVERR`` on a *connected* datagram socket (UDP or an unprivileged ping socket): ICMP
  errors (port/host unreachable, TTL exceeded) for that socket land on its error queue with type,
  code and errno, read with ``recvmsg(..., MSG_ERRQUEUE)``. Without it a closed UDP port looks
  exactly like a filtered one (a timeout).
* ``SO_TIMESTAMPNS``: the kernel's receive time of every datagram (CLOCK_REALTIME), so an RTT
  does not include the time the event loop took to notice the packet.
* ``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)`` ("ping socket"): echo without CAP_NET_RAW when
  ``net.ipv4.ping_group_range`` admits our group. The kernel owns the identifier and only hands
  us our own replies. When it refuses (EACCES/EPERM), we fall back to a raw socket, which sees
  every ICMP packet of the host and must filter by identifier and token itself.

:class:`DatagramProbe` is the one socket driver for UDP and ICMP probes: a non-blocking connected
socket whose readability callback drains the error queue first, then the data, each datagram
stamped by the kernel; replies are handed to a callback, errors to another. The error-queue and
timestamp ancillary data are parsed by :mod:`probes.checks.errqueue`.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from probes.checks.errqueue import (
    ICMP_ORIGINS,
    Ancillary,
    enable_error_queue,
    enable_receive_timestamps,
    kernel_timestamp_ns,
    parse_extended_error,
)
from probes.model import Reason
from probes.protocols import ipv4

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11

_ICMP_HEADER = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence
_ANCILLARY = 256
_MAX_DATAGRAM = 65535
_DRAIN_LIMIT = 64  # datagrams per readability callback: a flood must not starve the loop


# ------------------------------------------------------------------------------- packets


class IcmpParseError(ValueError):
    """Bytes that are not an ICMP message we understand."""


def build_echo_request(identifier: int, sequence: int, payload: bytes) -> bytes:
    return ipv4.icmp_echo(identifier, sequence, payload)


@dataclass(frozen=True, slots=True)
class IcmpMessage:
    """An echo reply, or an error quoting one of our echo requests."""

    type: int
    code: int
    identifier: int
    sequence: int
    payload: bytes  # echo payload (reply), or the quoted echo's payload prefix (error)

    @property
    def is_reply(self) -> bool:
        return self.type == ICMP_ECHO_REPLY


def strip_ipv4_header(data: bytes) -> bytes:
    """Raw ICMP sockets deliver the IPv4 header too; ping sockets do not."""
    if len(data) < 20 or data[0] >> 4 != 4:
        raise IcmpParseError("not an IPv4 packet")
    ihl = (data[0] & 0x0F) * 4
    if ihl < 20 or len(data) < ihl:
        raise IcmpParseError("bad IPv4 header length")
    return data[ihl:]


def parse_icmp(data: bytes) -> IcmpMessage:
    """Parse an echo reply or an unreachable/time-exceeded that quotes an echo request."""
    if len(data) < _ICMP_HEADER.size:
        raise IcmpParseError("short ICMP message")
    icmp_type, code, _csum, ident, seq = _ICMP_HEADER.unpack_from(data)
    if icmp_type == ICMP_ECHO_REPLY:
        return IcmpMessage(icmp_type, code, ident, seq, data[_ICMP_HEADER.size:])
    if icmp_type in (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED):
        quoted = strip_ipv4_header(data[8:])  # the offending datagram's IP header + 8 bytes
        if len(quoted) < _ICMP_HEADER.size:
            raise IcmpParseError("ICMP error quotes too little")
        q_type, _q_code, _q_csum, q_ident, q_seq = _ICMP_HEADER.unpack_from(quoted)
        if q_type != ICMP_ECHO_REQUEST:
            raise IcmpParseError("ICMP error does not quote an echo request")
        return IcmpMessage(icmp_type, code, q_ident, q_seq, quoted[_ICMP_HEADER.size:])
    raise IcmpParseError(f"ICMP type {icmp_type} is not for us")


# ------------------------------------------------------------------------------- error queue


@dataclass(frozen=True, slots=True)
class QueuedError:
    """One entry of a socket's error queue (struct sock_extended_err)."""

    err: int
    origin: int
    icmp_type: int
    icmp_code: int

    @property
    def reason(self) -> Reason:
        if self.origin in ICMP_ORIGINS:
            return Reason.ICMP_UNREACHABLE
        return reason_for_errno(self.err)

    def describe(self) -> str:
        name = errno.errorcode.get(self.err, str(self.err))
        if self.origin in ICMP_ORIGINS:
            return f"{name} (ICMP type {self.icmp_type} code {self.icmp_code})"
        return name


def parse_errqueue(ancdata: Ancillary) -> QueuedError | None:
    """The entry in one ``MSG_ERRQUEUE`` message's ancillary data, or None."""
    entry = parse_extended_error(ancdata)
    if entry is None:
        return None
    return QueuedError(entry.err, entry.origin, entry.icmp_type, entry.icmp_code)


def reason_for_errno(err: int) -> Reason:
    if err == errno.ECONNREFUSED:
        return Reason.REFUSED
    if err in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.ENETDOWN):
        return Reason.NETWORK_UNREACHABLE
    if err == errno.ETIMEDOUT:
        return Reason.TIMEOUT
    return Reason.PROBE_ERROR


# ------------------------------------------------------------------------------- socket driver


@dataclass(frozen=True, slots=True)
class Received:
    data: bytes
    monotonic: float  # when the event loop read it
    kernel_wall_ns: int | None  # kernel receive time (CLOCK_REALTIME)


def round_trip_seconds(sent_monotonic: float, sent_wall_ns: int, received: Received) -> float:
    """RTT from the kernel receive stamp when it is trustworthy, else from the loop's read time.

    The kernel stamp is wall-clock, so it is used only if it falls inside the monotonic bound
    (a clock step between send and receive would otherwise give a negative or inflated RTT).
    """
    loop_rtt = received.monotonic - sent_monotonic
    if received.kernel_wall_ns is not None:
        kernel_rtt = (received.kernel_wall_ns - sent_wall_ns) / 1e9
        if 0.0 <= kernel_rtt <= loop_rtt:
            return kernel_rtt
    return loop_rtt


def drain_errqueue(sock: _socket.socket) -> QueuedError | None:
    """Empty the socket's error queue (``IP_RECVERR``); the first error in it, if any."""
    first: QueuedError | None = None
    for _ in range(_DRAIN_LIMIT):
        try:
            _, ancdata, _, _ = sock.recvmsg(_MAX_DATAGRAM, _ANCILLARY, socket.MSG_ERRQUEUE)
        except OSError:
            break
        entry = parse_errqueue(ancdata)
        if entry is None:
            break
        first = first or entry
    return first


def receive(sock: _socket.socket) -> Received:
    """The next datagram with its read time and kernel timestamp; OSError (BlockingIOError
    when there is none) as ``recvmsg`` raises it."""
    data, ancdata, _, _ = sock.recvmsg(_MAX_DATAGRAM, _ANCILLARY)
    return Received(data, time.monotonic(), kernel_timestamp_ns(ancdata))


class DatagramProbe:
    """A non-blocking connected datagram socket on the running loop (UDP or ICMP).

    ``on_data`` gets every datagram; ``on_error`` gets error-queue entries and socket errors.
    """

    def __init__(self, sock: socket.socket, on_data: Callable[[Received], None],
                 on_error: Callable[[QueuedError], None]) -> None:
        self.sock = sock
        self._on_data = on_data
        self._on_error = on_error
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._closed = False
        self._loop.add_reader(self._fd, self._readable)

    @staticmethod
    def make_socket(family: int, kind: int, proto: int) -> socket.socket:
        # non-blocking from its creation: no ioctl of its own (``setblocking``)
        sock = socket.socket(family, kind | socket.SOCK_NONBLOCK, proto)
        try:
            enable_error_queue(sock)
            enable_receive_timestamps(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def send(self, data: bytes) -> tuple[float, int]:
        """Send now; return (monotonic, wall ns) send stamps. Errors go to ``on_error``."""
        stamp = (time.monotonic(), time.time_ns())
        try:
            self.sock.send(data)
        except BlockingIOError:
            pass  # a full send buffer drops the datagram, as the wire would
        except OSError as exc:
            self._on_error(self._drain_errqueue() or QueuedError(exc.errno or 0, 0, 0, 0))
        return stamp

    def _drain_errqueue(self) -> QueuedError | None:
        return drain_errqueue(self.sock)

    def _readable(self) -> None:
        # the error queue first: reading it clears the pending socket error, so an ICMP error
        # is reported once and with its type/code rather than as a bare ECONNREFUSED
        queued = self._drain_errqueue()
        if queued is not None:
            self._on_error(queued)
        for _ in range(_DRAIN_LIMIT):
            if self._closed:
                return
            try:
                received = receive(self.sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._on_error(self._drain_errqueue() or QueuedError(exc.errno or 0, 0, 0, 0))
                return
            self._on_data(received)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self.sock.close()


# ------------------------------------------------------------------------------- echo sockets


def open_echo_socket(family: int = socket.AF_INET) -> tuple[socket.socket, bool]:
    """An ICMP socket: unprivileged ping socket if allowed, else raw. Returns (socket, is_raw)."""
    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    try:
        return DatagramProbe.make_socket(family, socket.SOCK_DGRAM, proto), False
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EPROTONOSUPPORT):
            raise
    return DatagramProbe.make_socket(family, socket.SOCK_RAW, proto), True


def echo_token() -> bytes:
    """A per-probe token carried in the payload: on a raw socket it tells our replies apart."""
    return os.urandom(8)
