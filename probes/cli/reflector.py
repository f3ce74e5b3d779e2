"""``tunnelwatch reflector --listen HOST:PORT``: the UDP responder the egress and throughput
checks reach through a tunnel (docs/probes/user-path.md). An operator runs it beyond the VPN
nodes (where their users' traffic goes); it answers each well-formed request with one reply no
larger than the request, rate-limited per source (probes/protocols/reflector.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
import time
from typing import Any, cast

from probes.config import parse_host_port
from probes.protocols.reflector import DEFAULT_SOURCE_RATE, Reflector

log = logging.getLogger(__name__)
EXIT_OK, EXIT_USAGE = 0, 2


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, reflector: Reflector) -> None:
        self.reflector = reflector
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = self.reflector.answer(data, (str(addr[0]), int(addr[1])), time.monotonic())
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def serve(host: str, port: int, reflector: Reflector, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Answer on ``host:port`` until ``stop`` is set (or SIGTERM/SIGINT when not given)."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Protocol(reflector), local_addr=(host, port), family=socket.AF_INET)
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    log.info("reflector listening on %s:%d", host, port)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        transport.close()
        log.info("reflector stopping: %s", reflector.stats)


def handle(args: argparse.Namespace) -> int:
    try:
        host, port = parse_host_port(args.listen, default_host="0.0.0.0")  # noqa: S104
        socket.inet_aton(host)  # an operator's choice of IPv4 address
    except (ValueError, OSError):
        print(f"tunnelwatch reflector: --listen: expected IPV4:PORT (port 1..65535), got "
              f"{args.listen!r}", file=sys.stderr)
        return EXIT_USAGE
    if not args.source_rate > 0:
        print("tunnelwatch reflector: --source-rate must be > 0", file=sys.stderr)
        return EXIT_USAGE
    asyncio.run(serve(host, port, Reflector(source_rate=args.source_rate)))
    return EXIT_OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser("reflector", help="UDP responder for the egress and throughput checks")
    p.add_argument("--listen", default="0.0.0.0:7447",
                   help="IPV4:PORT to answer on (default 0.0.0.0:7447)")
    p.add_argument("--source-rate", type=float, default=DEFAULT_SOURCE_RATE,
                   help="answered requests per second per source address, at most "
                        f"(default {DEFAULT_SOURCE_RATE:g})")
    p.set_defaults(handler=handle)
