"""``tunnelwatch probe tcp|udp|icmp``: one L4 check now, with the shared probe output contract."""

from __future__ import annotations

import argparse
from typing import Any

from probes.checks import l4
from probes.cli.probe import add_common_arguments, run_and_report, usage_error


def _tcp(args: argparse.Namespace) -> int:
    params = l4.TcpParams(host=args.host, port=args.port, tls=args.tls,
                          server_name=args.server_name, ca_file=args.ca_file,
                          verify=not args.insecure)
    return run_and_report(l4.TCP, params, args.timeout, args.json)


def _udp(args: argparse.Namespace) -> int:
    try:
        send = bytes.fromhex(args.send_hex)
        expect = bytes.fromhex(args.expect_hex) if args.expect_hex is not None else None
    except ValueError:
        return usage_error("--send-hex / --expect-hex must be hex digits")
    params = l4.UdpParams(host=args.host, port=args.port, send=send, expect_prefix=expect)
    return run_and_report(l4.UDP, params, args.timeout, args.json)


def _icmp(args: argparse.Namespace) -> int:
    if args.count < 1:
        return usage_error("--count must be >= 1")
    params = l4.IcmpParams(host=args.host, count=args.count, interval=args.interval,
                           payload_size=args.size)
    return run_and_report(l4.ICMP, params, args.timeout, args.json)


def add_parser(sub: Any) -> None:
    tcp = sub.add_parser("tcp", help="TCP connect, optionally followed by a TLS handshake")
    tcp.add_argument("host")
    tcp.add_argument("port", type=int)
    tcp.add_argument("--tls", action="store_true", help="run a TLS handshake after connecting")
    tcp.add_argument("--server-name", help="SNI / name to verify (default: host)")
    tcp.add_argument("--ca-file", help="CA bundle (default: system trust store)")
    tcp.add_argument("--insecure", action="store_true", help="do not verify the certificate")
    add_common_arguments(tcp, default_timeout=2.0)
    tcp.set_defaults(handler=_tcp)

    udp = sub.add_parser("udp", help="UDP request/response (ICMP unreachable via IP_RECVERR)")
    udp.add_argument("host")
    udp.add_argument("port", type=int)
    udp.add_argument("--send-hex", default="", help="payload to send, hex")
    udp.add_argument("--expect-hex", help="the reply must start with these bytes, hex")
    add_common_arguments(udp, default_timeout=2.0)
    udp.set_defaults(handler=_udp)

    icmp = sub.add_parser("icmp", help="ICMP echo (ping socket, raw socket fallback)")
    icmp.add_argument("host")
    icmp.add_argument("--count", type=int, default=1)
    icmp.add_argument("--interval", type=float, default=0.2, help="seconds between requests")
    icmp.add_argument("--size", type=int, default=56, help="payload bytes")
    add_common_arguments(icmp, default_timeout=2.0)
    icmp.set_defaults(handler=_icmp)
