"""``tunnelwatch probe quic``: a QUIC/HTTP/3 handshake, or a MASQUE CONNECT-UDP / CONNECT-IP.

Without ``--connect-udp`` / ``--connect-ip`` it runs ``quic.handshake``; the output contract is the
shared one of :mod:`probes.cli.probe` (exit 0 passed, 1 failed, 2 usage error; ``--json``).
"""

from __future__ import annotations

import argparse
from typing import Any

from probes.checks import quic
from probes.cli.probe import add_common_arguments, run_and_report, usage_error


def _run(args: argparse.Namespace) -> int:
    if args.count < 1:
        return usage_error("--count must be >= 1")
    if not 0.0 <= args.loss_threshold <= 1.0:
        return usage_error("--loss-threshold must be between 0 and 1")
    if args.ip_ping and not args.connect_ip:
        return usage_error("--ip-ping needs --connect-ip")
    params = quic.QuicParams(
        host=args.host, port=args.port, server_name=args.server_name, ca_file=args.ca_file,
        verify=not args.insecure, alpn=args.alpn, resume=args.resume,
        target=args.connect_udp, echo_count=args.count, echo_interval=args.interval,
        payload_size=args.size, loss_threshold=args.loss_threshold,
        rtt_threshold=args.rtt_threshold, ip_ping=args.ip_ping)
    if not 0 <= args.size <= quic.MAX_ECHO_PAYLOAD:
        return usage_error(f"--size must be 0..{quic.MAX_ECHO_PAYLOAD}")
    try:  # configuration problems are usage errors here, not a failed node
        quic.client_configuration(params)
        if args.connect_udp:
            quic.split_target(args.connect_udp)
    except quic.QuicConfigError as exc:
        return usage_error(str(exc))
    kind = quic.HANDSHAKE
    if args.connect_udp:
        kind = quic.CONNECT_UDP
    elif args.connect_ip:
        kind = quic.CONNECT_IP
    return run_and_report(kind, params, args.timeout, args.json)


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "quic", help="QUIC/HTTP/3 handshake, or MASQUE CONNECT-UDP / CONNECT-IP",
        description="QUIC handshake (ALPN h3, certificate verified), or a MASQUE session: "
                    "CONNECT-UDP with HTTP datagrams echoed through the proxy (RTT, loss), or "
                    "CONNECT-IP up to a parsed ADDRESS_ASSIGN capsule.")
    parser.add_argument("host")
    parser.add_argument("--port", type=int, default=443)
    parser.add_argument("--server-name", help="SNI and name to verify (default: host)")
    parser.add_argument("--ca-file", help="PEM CA bundle (default: certifi's bundle)")
    parser.add_argument("--insecure", action="store_true", help="do not verify the certificate")
    parser.add_argument("--alpn", default=quic.H3_ALPN, help="ALPN to offer (default h3)")
    parser.add_argument("--resume", action="store_true",
                        help="handshake again with the session ticket (resumption, 0-RTT facts)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--connect-udp", metavar="HOST:PORT",
                      help="CONNECT-UDP to this UDP echo service and echo datagrams through it")
    mode.add_argument("--connect-ip", action="store_true",
                      help="CONNECT-IP up to a 2xx and a parsed ADDRESS_ASSIGN")
    parser.add_argument("--ip-ping", metavar="ADDR",
                        help="with --connect-ip: ICMP-echo this IPv4 address inside the tunnel")
    parser.add_argument("--count", type=int, default=5, help="echoes to send")
    parser.add_argument("--interval", type=float, default=0.05,
                        help="seconds between datagrams")
    parser.add_argument("--size", type=int, default=32, help="datagram payload bytes")
    parser.add_argument("--loss-threshold", type=float, default=0.5,
                        help="fail above this loss ratio (default 0.5)")
    parser.add_argument("--rtt-threshold", type=float,
                        help="fail if the median RTT is above this many seconds")
    add_common_arguments(parser, default_timeout=5.0)
    parser.set_defaults(handler=_run)
