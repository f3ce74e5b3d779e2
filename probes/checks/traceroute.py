"""Run a :class:`~probes.protocols.traceroute.TraceCore` over raw sockets (IPv4).

Three sockets, all raw (``CAP_NET_RAW``; the agent runs as root or with that capability):

* an ``IPPROTO_RAW`` socket sends the core's packets as they are (``IP_HDRINCL``: the core sets
  TTL, identification and DF itself);
* an ``IPPROTO_ICMP`` socket receives the answers. A raw ICMP socket gets a copy of every ICMP
  packet the host receives, so a classic BPF filter lets only time-exceeded, unreachable and the
  target's echo replies up to us: the replies to the agent's own ICMP checks stay in the kernel;
* for TCP traces an ``IPPROTO_TCP`` socket, filtered to segments from the target's port (the
  SYN-ACK or RST that answers a SYN; the kernel, which knows no such connection, resets it).

Nothing here blocks: the sockets are non-blocking and pumped from the event loop, and the whole
trace is bounded by ``deadline`` (a core that never finishes would be a bug, not a hang).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import random
import socket
import struct
import time
from dataclasses import dataclass, replace
from pathlib import Path

from probes.model import PathFlow, TraceProtocol
from probes.protocols.traceroute import TraceCore, TraceSpec

IP_MTU = 14  # linux/in.h
IP_MTU_DISCOVER, IP_PMTUDISC_PROBE = 10, 3
SIOCGIFMTU = 0x8921  # linux/sockios.h
SO_ATTACH_FILTER = 26  # asm-generic/socket.h
_RECV = 65535
_DRAIN_LIMIT = 256  # packets per readable callback


class TraceUnavailable(RuntimeError):
    """This host cannot trace (no raw sockets, no IPv4 route): not the node's fault."""


@dataclass(frozen=True, slots=True)
class TraceRun:
    flows: list[PathFlow]
    duration_seconds: float
    packets_sent: int
    cpu_seconds: float  # thread CPU spent in this trace's own code (core and socket calls)


def route_facts(target: str) -> tuple[str, int]:
    """Our source address toward ``target`` (a connected UDP socket asks the kernel's routing
    table; nothing is sent) and the MTU of the interface the route leaves by. Not the route's
    MTU: that is a path MTU the kernel may have learnt, and a probe the size of the link is
    what finds a smaller one again."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((target, 9))
            source = str(s.getsockname()[0])
            route_mtu = int(s.getsockopt(socket.IPPROTO_IP, IP_MTU))
        except OSError as exc:
            raise OSError(exc.errno, f"no route to {target}: {exc.strerror}") from None
        device = _route_device(target)
        if device is None:
            return source, route_mtu
        try:
            ifreq = fcntl.ioctl(s.fileno(), SIOCGIFMTU, struct.pack("16si", device.encode(), 0))
        except OSError:
            return source, route_mtu
    return source, int(struct.unpack_from("i", ifreq, 16)[0])


def _route_device(target: str) -> str | None:
    """The interface of the main table's longest matching route (this thread's namespace)."""
    try:
        lines = Path("/proc/thread-self/net/route").read_text().splitlines()[1:]
    except OSError:
        return None
    addr = int(ipaddress.IPv4Address(target))
    best: tuple[int, str] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:  # hex of the address's bytes read as a little-endian number, as the kernel prints
            dest = int.from_bytes(bytes.fromhex(fields[1]), "little")
            mask = int.from_bytes(bytes.fromhex(fields[7]), "little")
        except ValueError:
            continue
        length = mask.bit_count()
        if addr & mask == dest and (best is None or length > best[0]):
            best = (length, fields[0])
    return best[1] if best else None


def attach_filter(s: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """SO_ATTACH_FILTER: a ``struct sock_fprog`` pointing at the program (``struct sock_filter``
    entries); the kernel copies it, so the buffer only lives through the call."""
    insns = b"".join(struct.pack("HBBI", *ins) for ins in program)
    buf = ctypes.create_string_buffer(insns, len(insns))
    s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                 struct.pack("HL", len(program), ctypes.addressof(buf)))


# classic BPF opcodes (linux/filter.h)
_LDX_MSH = 0xB1  # X = 4 * (P[k] & 0xf): the IP header length
_LDB_IND = 0x50  # A = P[X + k], byte
_LDH_IND = 0x48  # A = P[X + k], half word
_LDW_ABS = 0x20  # A = P[k], word
_JEQ = 0x15
_RET = 0x06
_ACCEPT = 0xFFFF


def icmp_filter(target: str) -> list[tuple[int, int, int, int]]:
    """Accept ICMP time-exceeded and unreachable (about anyone's packets: the core checks they
    quote ours), and echo replies from ``target`` only."""
    dst = int(ipaddress.IPv4Address(target))
    return [
        (_LDX_MSH, 0, 0, 0),
        (_LDB_IND, 0, 0, 0),  # ICMP type
        (_JEQ, 4, 0, 11),  # time exceeded -> accept
        (_JEQ, 3, 0, 3),  # unreachable -> accept
        (_JEQ, 0, 3, 0),  # echo reply -> check the source, else drop
        (_LDW_ABS, 0, 0, 12),  # source address
        (_JEQ, 0, 1, dst),
        (_RET, 0, 0, _ACCEPT),
        (_RET, 0, 0, 0),
    ]


def tcp_filter(target: str, port: int) -> list[tuple[int, int, int, int]]:
    """Accept TCP segments from ``target``:``port`` only."""
    dst = int(ipaddress.IPv4Address(target))
    return [
        (_LDW_ABS, 0, 0, 12),
        (_JEQ, 0, 4, dst),
        (_LDX_MSH, 0, 0, 0),
        (_LDH_IND, 0, 0, 0),  # TCP source port
        (_JEQ, 0, 1, port),
        (_RET, 0, 0, _ACCEPT),
        (_RET, 0, 0, 0),
    ]


def _raw(proto: int, program: list[tuple[int, int, int, int]] | None) -> socket.socket:
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    except PermissionError:
        raise TraceUnavailable("raw sockets need root or CAP_NET_RAW") from None
    s.setblocking(False)
    if program is not None:
        try:
            attach_filter(s, program)
        except OSError:
            s.close()
            raise
    return s


async def trace(spec: TraceSpec, *, deadline: float = 60.0) -> TraceRun:
    """Run one trace. ``spec.source`` may be empty (taken from the route); ``big_size`` is
    clamped to the route's MTU (a bigger probe could not leave this host at all)."""
    source, mtu = route_facts(spec.target)
    spec = replace(spec, source=spec.source or source,
                   big_size=min(spec.big_size, mtu) if spec.big_size else 0,
                   id_base=spec.id_base or random.randrange(1, 0xFFFF))
    core = TraceCore(spec)
    sockets: list[socket.socket] = []
    try:
        sender = _raw(socket.IPPROTO_RAW, None)
        sockets.append(sender)
        # send at the link's size whatever path MTU the kernel has learnt for the target:
        # finding that MTU (again) is what the big probes are for
        sender.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
        sockets.append(_raw(socket.IPPROTO_ICMP, icmp_filter(spec.target)))
        if spec.protocol is TraceProtocol.TCP:
            sockets.append(_raw(socket.IPPROTO_TCP, tcp_filter(spec.target, spec.port)))
        return await _pump(core, sender, sockets[1:], deadline)
    finally:
        for s in sockets:
            s.close()


async def _pump(core: TraceCore, sender: socket.socket, receivers: list[socket.socket],
                deadline: float) -> TraceRun:
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    cpu = 0.0
    started = time.monotonic()

    def readable(sock: socket.socket) -> None:
        nonlocal cpu
        t0 = time.thread_time()
        for _ in range(_DRAIN_LIMIT):
            try:
                data = sock.recv(_RECV)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            core.receive_datagram(data, None, time.monotonic())
        cpu += time.thread_time() - t0
        wake.set()

    for s in receivers:
        loop.add_reader(s.fileno(), readable, s)
    try:
        core.start(time.monotonic())
        while time.monotonic() - started <= deadline:
            t0 = time.thread_time()
            core.handle_timer(time.monotonic())
            for packet in core.datagrams_to_send(time.monotonic()):
                _send(core, sender, packet)
            timer = core.get_timer()
            cpu += time.thread_time() - t0
            if core.done:
                break
            wake.clear()
            wait = 0.05 if timer is None else max(0.0, timer - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=min(wait, deadline))
    finally:
        for s in receivers:
            loop.remove_reader(s.fileno())
    return TraceRun(core.result(), time.monotonic() - started, core.sent, cpu)


def _send(core: TraceCore, sender: socket.socket, packet: bytes) -> None:
    dst = socket.inet_ntoa(packet[16:20])
    try:
        sender.sendto(packet, (dst, 0))
    except OSError as exc:
        # bigger than our own link (EMSGSIZE), or our own routing or firewall said no
        if exc.errno in (errno.EMSGSIZE, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EPERM,
                         errno.EACCES):
            core.local_error(packet)
        # ENOBUFS and the like: the probe is lost like any other and its timeout retries it
