"""Linux socket error queue and kernel receive timestamps, parsed from ``recvmsg`` ancillary data.

The error queue: with ``IP_RECVERR`` (``IPV6_RECVERR``) set, the kernel keeps the errors of a
datagram socket on a per-socket queue instead of only a bare pending errno. ICMP messages about
our datagrams (port/host unreachable, fragmentation needed, packet too big, TTL exceeded) and
local send errors (EMSGSIZE) each become one entry, read with ``recvmsg(..., MSG_ERRQUEUE)``.
The entry arrives as ancillary data: a ``struct sock_extended_err`` (errno, origin, ICMP type and
code, ``ee_info`` such as the next-hop MTU) followed by ``SO_EE_OFFENDER``, the sockaddr of the
host that sent the ICMP. No root is needed; the socket must be connected for ICMP to reach it.

``SO_TIMESTAMPNS`` makes the kernel attach its receive time (a ``struct timespec``, CLOCK_REALTIME)
to every datagram, so an RTT does not include the time the event loop took to notice the packet.

Python's :mod:`socket` module does not export these constants or structs, so they are spelt out
here once (linux/in.h, linux/in6.h, linux/errqueue.h, asm-generic/socket.h) for every probe that
reads an error queue: :mod:`probes.checks.icmp`, :mod:`probes.checks.udp`, :mod:`probes.checks.mtu`.
Parsers never raise on malformed ancillary data: they skip what they cannot read.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

IP_RECVERR = 11  # linux/in.h
IPV6_RECVERR = 25  # linux/in6.h
SO_TIMESTAMPNS = 35  # asm-generic/socket.h
SO_EE_ORIGIN_LOCAL = 1  # linux/errqueue.h: our own stack refused (e.g. EMSGSIZE)
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
ICMP_ORIGINS = (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6)

# struct sock_extended_err: ee_errno, ee_origin, ee_type, ee_code, ee_pad, ee_info, ee_data
_EXTENDED_ERR = struct.Struct("=IBBBBII")
_TIMESPEC = struct.Struct("=qq")  # struct timespec on 64-bit Linux: tv_sec, tv_nsec
# SO_EE_OFFENDER, the sockaddr after sock_extended_err, by origin: (family, address offset, size);
# sockaddr_in is family, port, address; sockaddr_in6 is family, port, flowinfo, address
_OFFENDER_ADDRESS = {SO_EE_ORIGIN_ICMP: (socket.AF_INET, 4, 4),
                     SO_EE_ORIGIN_ICMP6: (socket.AF_INET6, 8, 16)}

Ancillary = Iterable[tuple[int, int, bytes]]  # (level, type, data), as recvmsg returns them


@dataclass(frozen=True, slots=True)
class ExtendedError:
    """One error-queue entry (struct sock_extended_err plus the offender's address)."""

    err: int  # errno, e.g. ECONNREFUSED for an ICMP port unreachable
    origin: int  # SO_EE_ORIGIN_*
    icmp_type: int
    icmp_code: int
    info: int  # ee_info: the next-hop MTU of frag-needed / packet-too-big, local MTU for EMSGSIZE
    offender: str | None  # the ICMP sender's address; None for local errors or when unreadable

    @property
    def from_icmp(self) -> bool:
        return self.origin in ICMP_ORIGINS


def parse_extended_error(ancdata: Ancillary) -> ExtendedError | None:
    """The first error-queue entry in the ancillary data of one ``MSG_ERRQUEUE`` message."""
    for level, kind, payload in ancdata:
        ours = (level == socket.IPPROTO_IP and kind == IP_RECVERR) or (
            level == socket.IPPROTO_IPV6 and kind == IPV6_RECVERR)
        if not ours or len(payload) < _EXTENDED_ERR.size:
            continue
        err, origin, icmp_type, icmp_code, _pad, info, _data = _EXTENDED_ERR.unpack_from(payload)
        offender = _offender(origin, payload[_EXTENDED_ERR.size:])
        return ExtendedError(err, origin, icmp_type, icmp_code, info, offender)
    return None


def _offender(origin: int, sockaddr: bytes) -> str | None:
    # the address family follows the ICMP version that reported the error; local errors have none
    if origin not in _OFFENDER_ADDRESS:
        return None
    family, offset, size = _OFFENDER_ADDRESS[origin]
    raw = sockaddr[offset:offset + size]
    return socket.inet_ntop(family, raw) if len(raw) == size else None


def kernel_timestamp_ns(ancdata: Ancillary) -> int | None:
    """The kernel's receive time (CLOCK_REALTIME, ns) from ``SO_TIMESTAMPNS`` ancillary data."""
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= _TIMESPEC.size:
            seconds, nanos = _TIMESPEC.unpack_from(payload)
            return int(seconds) * 1_000_000_000 + int(nanos)
    return None


def error_queue_option(family: int) -> tuple[int, int]:
    """The (level, option) that queues a ``family`` socket's ICMP and local errors."""
    if family == socket.AF_INET6:
        return socket.IPPROTO_IPV6, IPV6_RECVERR
    return socket.IPPROTO_IP, IP_RECVERR


def enable_error_queue(sock: socket.socket) -> None:
    """Queue ICMP and local errors for ``sock`` (``IP_RECVERR`` / ``IPV6_RECVERR``)."""
    level, option = error_queue_option(sock.family)
    sock.setsockopt(level, option, 1)


def enable_receive_timestamps(sock: socket.socket) -> None:
    """Have the kernel stamp every received datagram (``SO_TIMESTAMPNS``)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
