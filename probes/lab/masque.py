"""A MASQUE test server for the lab (HTTP/3 on aioquic) plus a UDP echo service.

Run inside a lab host: ``python -m probes.lab.masque --listen 0.0.0.0:4433 --cert C --key K
--echo 0.0.0.0:7003``. It serves:

* CONNECT-UDP (RFC 9298): ``/.well-known/masque/udp/{host}/{port}/`` answered 200 with
  ``capsule-protocol: ?1``; HTTP datagrams (context ID 0) and DATAGRAM capsules are relayed to the
  target over a connected UDP socket, replies come back as HTTP datagrams.
* CONNECT-IP (RFC 9484): ``/.well-known/masque/ip/...`` answered 200, then an ADDRESS_ASSIGN
  (answering an ADDRESS_REQUEST's ID) and a ROUTE_ADVERTISEMENT; inside the tunnel the gateway
  address 10.200.0.1 answers ICMP echo (IPv4 packets in HTTP datagrams, context ID 0).
* ``--refuse STATUS``: every CONNECT is answered with that status (e.g. 403).
* ``--bad-capsules``: CONNECT-IP answers with a malformed ADDRESS_ASSIGN (prefix length 33).
* ``--alpn P``: offer ALPN ``P`` instead of ``h3`` (a client asking for h3 then fails).
* ``--echo HOST:PORT``: a UDP echo service (the CONNECT-UDP target; also the MTU probe's
  reflector). It can run alone, without ``--listen``.

Session tickets are kept in memory, so a second handshake can resume and use 0-RTT.
It is test equipment: it logs to stderr and trusts its arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.h3.events import DatagramReceived, DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, ProtocolNegotiated, QuicEvent
from aioquic.tls import SessionTicket

from probes.checks.quic import MAX_DATAGRAM_FRAME_SIZE, H3DatagramConnection
from probes.config import parse_host_port
from probes.protocols import capsules as cap
from probes.protocols.inet import checksum

log = logging.getLogger("masque")

ASSIGNED_ADDRESS = ipaddress.IPv4Address("10.200.0.2")
GATEWAY_ADDRESS = ipaddress.IPv4Address("10.200.0.1")  # answers ICMP echo inside CONNECT-IP
ROUTE = cap.AddressRange(ipaddress.IPv4Address("10.200.0.0"),
                         ipaddress.IPv4Address("10.200.0.255"), 0)


@dataclass(frozen=True)
class ServerOptions:
    refuse_status: int | None = None
    bad_capsules: bool = False


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.transport.sendto(data, addr)


class _UdpRelay(asyncio.DatagramProtocol):
    """The proxy's UDP socket toward one CONNECT-UDP target; replies go back as datagrams."""

    def __init__(self, session: MasqueServerProtocol, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.session.send_datagram(self.stream_id, cap.encode_http_datagram(0, data))


def icmp_echo_reply_for(packet: bytes) -> bytes | None:
    """The reply to an IPv4 ICMP echo request for :data:`GATEWAY_ADDRESS`, else None."""
    if len(packet) < 28 or packet[0] != 0x45 or packet[9] != 1:
        return None
    if packet[16:20] != GATEWAY_ADDRESS.packed or packet[20] != 8:
        return None
    icmp = bytearray(packet[20:])
    icmp[0], icmp[2:4] = 0, b"\x00\x00"
    icmp[2:4] = checksum(bytes(icmp)).to_bytes(2, "big")
    header = bytearray(packet[:20])
    header[12:16], header[16:20] = packet[16:20], packet[12:16]
    header[8], header[10:12] = 64, b"\x00\x00"
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + bytes(icmp)


class MasqueServerProtocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, options: ServerOptions, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.options = options
        self.h3: H3DatagramConnection | None = None
        self.relays: dict[int, asyncio.DatagramTransport] = {}
        self.parsers: dict[int, cap.CapsuleParser] = {}
        self.ip_streams: set[int] = set()
        self.tasks: set[asyncio.Future[None]] = set()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated) and event.alpn_protocol == "h3":
            self.h3 = H3DatagramConnection(self._quic)
        if isinstance(event, ConnectionTerminated):
            for relay in self.relays.values():
                relay.close()
            self.relays.clear()
        if self.h3 is not None:
            for h3_event in self.h3.handle_event(event):
                self._h3_event(h3_event)

    def send_datagram(self, stream_id: int, data: bytes) -> None:
        if self.h3 is not None:
            self.h3.send_datagram(stream_id, data)
            self.transmit()

    def _respond(self, stream_id: int, status: int, end: bool) -> None:
        assert self.h3 is not None
        headers = [(b":status", str(status).encode()), (b"server", b"tunnelwatch-lab-masque")]
        if status // 100 == 2:
            headers.append((b"capsule-protocol", b"?1"))
        self.h3.send_headers(stream_id, headers, end_stream=end)
        self.transmit()

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            task = asyncio.ensure_future(self._on_request(event))
            self.tasks.add(task)  # keep a reference until it is done
            task.add_done_callback(self.tasks.discard)
        elif isinstance(event, DatagramReceived):
            self._relay(event.stream_id, event.data)
        elif isinstance(event, DataReceived):
            self._on_data(event)

    async def _on_request(self, event: HeadersReceived) -> None:
        headers = dict(event.headers)
        method, protocol = headers.get(b":method"), headers.get(b":protocol")
        path = headers.get(b":path", b"").decode(errors="replace")
        log.info("request %s %s %s", method, protocol, path)
        sid = event.stream_id
        if method != b"CONNECT" or protocol not in (b"connect-udp", b"connect-ip"):
            self._respond(sid, 404 if method != b"CONNECT" else 501, end=True)
            return
        if self.options.refuse_status is not None:
            self._respond(sid, self.options.refuse_status, end=True)
            return
        self.parsers[sid] = cap.CapsuleParser()
        if protocol == b"connect-ip":
            self.ip_streams.add(sid)
            self._respond(sid, 200, end=False)
            return
        parts = path.strip("/").split("/")
        if len(parts) != 5 or parts[:3] != [".well-known", "masque", "udp"] \
                or not parts[4].isdigit():
            self._respond(sid, 400, end=True)
            return
        host = urllib.parse.unquote(parts[3])
        try:
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: _UdpRelay(self, sid), remote_addr=(host, int(parts[4])))
        except OSError as exc:
            log.warning("cannot reach target %s:%s: %s", host, parts[4], exc)
            self._respond(sid, 502, end=True)
            return
        self.relays[sid] = transport
        self._respond(sid, 200, end=False)

    def _relay(self, stream_id: int, http_datagram: bytes) -> None:
        relay = self.relays.get(stream_id)
        try:
            context_id, payload = cap.decode_http_datagram(http_datagram)
        except cap.CapsuleError:
            return
        if context_id != 0:
            return
        if relay is not None:
            relay.sendto(payload)
        elif stream_id in self.ip_streams:
            reply = icmp_echo_reply_for(payload)
            if reply is not None:
                self.send_datagram(stream_id, cap.encode_http_datagram(0, reply))

    def _on_data(self, event: DataReceived) -> None:
        parser = self.parsers.get(event.stream_id)
        if parser is None or self.h3 is None:
            return
        try:
            capsules = parser.feed(event.data)
        except cap.CapsuleError as exc:
            log.warning("bad capsule on stream %d: %s", event.stream_id, exc)
            self._quic.reset_stream(event.stream_id, 0x0101)  # H3_GENERAL_PROTOCOL_ERROR
            return
        for capsule in capsules:
            if capsule.type == cap.CapsuleType.DATAGRAM:
                self._relay(event.stream_id, capsule.value)
            elif capsule.type == cap.CapsuleType.ADDRESS_REQUEST \
                    and event.stream_id in self.ip_streams:
                self._assign(event.stream_id, capsule.value)
        if event.stream_ended:
            relay = self.relays.pop(event.stream_id, None)
            if relay is not None:
                relay.close()
            with contextlib.suppress(Exception):
                self.h3.send_data(event.stream_id, b"", end_stream=True)
            self.transmit()

    def _assign(self, stream_id: int, request_value: bytes) -> None:
        assert self.h3 is not None
        try:
            requests = cap.decode_prefixed_addresses(request_value, request=True)
        except cap.CapsuleError:
            requests = []
        request_id = requests[0].request_id if requests else 0
        prefix = 33 if self.options.bad_capsules else 32  # 33 is malformed for IPv4
        assign = cap.encode_prefixed_addresses(
            [cap.PrefixedAddress(request_id, ASSIGNED_ADDRESS, prefix)])
        routes = cap.encode_route_advertisement([ROUTE])
        self.h3.send_data(stream_id,
                          cap.encode_capsule(cap.CapsuleType.ADDRESS_ASSIGN, assign)
                          + cap.encode_capsule(cap.CapsuleType.ROUTE_ADVERTISEMENT, routes),
                          end_stream=False)
        self.transmit()


class _TicketStore:
    def __init__(self) -> None:
        self.tickets: dict[bytes, SessionTicket] = {}

    def add(self, ticket: SessionTicket) -> None:
        self.tickets[ticket.ticket] = ticket

    def pop(self, label: bytes) -> SessionTicket | None:
        return self.tickets.pop(label, None)


def _host_port(text: str) -> tuple[str, int]:
    return parse_host_port(text)


async def serve_forever(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    closers: list[Any] = []
    if args.echo:
        host, port = _host_port(args.echo)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        transport, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=(host, port),
                                                           family=family)
        closers.append(transport.close)
        log.info("UDP echo on %s", args.echo)
    if args.listen:
        config = QuicConfiguration(is_client=False, alpn_protocols=[args.alpn],
                                   max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE)
        config.load_cert_chain(args.cert, args.key)
        host, port = _host_port(args.listen)
        tickets = _TicketStore()
        options = ServerOptions(refuse_status=args.refuse, bad_capsules=args.bad_capsules)
        server = await serve(
            host, port, configuration=config,
            create_protocol=lambda *a, **kw: MasqueServerProtocol(*a, options=options, **kw),
            session_ticket_fetcher=tickets.pop, session_ticket_handler=tickets.add)
        closers.append(server.close)
        log.info("MASQUE on %s alpn=%s refuse=%s", args.listen, args.alpn, args.refuse)
    print("ready", flush=True)
    await stop.wait()
    for close in closers:
        close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m probes.lab.masque", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", help="HOST:PORT for HTTP/3 (UDP)")
    parser.add_argument("--cert", help="server certificate (PEM)")
    parser.add_argument("--key", help="server key (PEM)")
    parser.add_argument("--alpn", default="h3", help="ALPN to offer (default h3)")
    parser.add_argument("--refuse", type=int, metavar="STATUS",
                        help="answer every CONNECT with this status")
    parser.add_argument("--bad-capsules", action="store_true",
                        help="send a malformed ADDRESS_ASSIGN on CONNECT-IP")
    parser.add_argument("--echo", help="HOST:PORT of a UDP echo service")
    args = parser.parse_args(argv)
    if not args.listen and not args.echo:
        parser.error("nothing to serve: give --listen and/or --echo")
    if args.listen and not (args.cert and args.key):
        parser.error("--listen needs --cert and --key")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s masque %(message)s")
    asyncio.run(serve_forever(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
