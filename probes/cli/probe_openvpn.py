"""``tunnelwatch probe openvpn``: one OpenVPN check now, with the shared probe output contract.

``tunnelwatch probe openvpn-telemetry --management-socket PATH [--ssh [USER@]HOST]`` prints the
node's own view from its management interface (``status 3``, ``load-stats``): clients, bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from probes.checks import openvpn
from probes.checks import openvpn_telemetry as telemetry
from probes.cli.probe import add_common_arguments, run_and_report, usage_error
from probes.protocols.openvpn.data import Framing

LEVELS = {level.name.lower(): level for level in openvpn.Level}


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint must be HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def params_from_args(args: argparse.Namespace) -> openvpn.OpenVPNParams:
    host, port = parse_endpoint(args.endpoint)
    if (args.cert is None) != (args.key is None):
        raise ValueError("--cert and --key go together")
    if args.key_direction is not None and args.tls_auth is None:
        raise ValueError("--key-direction only applies to --tls-auth")
    if args.count < 1:
        raise ValueError("--count must be >= 1")
    return openvpn.OpenVPNParams(
        host=host, port=port, proto=args.proto, ca_file=args.ca, cert_file=args.cert,
        key_file=args.key, tls_crypt_file=args.tls_crypt, tls_auth_file=args.tls_auth,
        key_direction=args.key_direction, auth_digest=args.auth,
        tls_crypt_v2_file=args.tls_crypt_v2, auth_user_pass_file=args.auth_user_pass,
        echo_count=args.count, echo_interval=args.interval, compression=args.compression)


def _run(args: argparse.Namespace) -> int:
    level = LEVELS[args.level]
    try:
        params = params_from_args(args)
        # read every key and certificate now: a bad file is a usage error (2), not a failed node
        openvpn.build_wrapper(params, 0)
        if level >= openvpn.Level.TLS:
            openvpn.build_ssl_context(params)
        if params.auth_user_pass_file:
            openvpn.read_user_pass(params.auth_user_pass_file)
    except (ValueError, openvpn.ConfigError) as exc:
        return usage_error(str(exc))
    return run_and_report(openvpn.KINDS[level], params, args.timeout, args.json)


def _telemetry(args: argparse.Namespace) -> int:
    try:
        if args.ssh:
            user, _, host = args.ssh.rpartition("@")
            options: dict[str, Any] = {"port": args.ssh_port}
            if user:
                options["username"] = user
            view = asyncio.run(telemetry.read_management_ssh(
                host, args.management_socket, timeout=args.timeout, **options))
        else:
            view = asyncio.run(telemetry.read_management_socket(args.management_socket,
                                                                args.timeout))
    except telemetry.TelemetryError as exc:
        print(f"tunnelwatch probe openvpn-telemetry: {exc}")
        return 1
    summary: dict[str, Any] = {"clients": len(view.status.clients),
                               "bytes_in": view.load.bytes_in if view.load else None,
                               "bytes_out": view.load.bytes_out if view.load else None}
    if args.json:
        summary["client_list"] = [
            {"common_name": c.common_name, "virtual_address": c.virtual_address,
             "bytes_received": c.bytes_received, "bytes_sent": c.bytes_sent,
             "connected_since": c.connected_since, "cipher": c.cipher}
            for c in view.status.clients]
        print(json.dumps(summary, sort_keys=True))
        return 0
    print(f"clients {summary['clients']}  in {summary['bytes_in']} B  "
          f"out {summary['bytes_out']} B")
    for c in view.status.clients:
        print(f"  {c.common_name:<24} {c.virtual_address:<15} rx {c.bytes_received} B  "
              f"tx {c.bytes_sent} B  {c.cipher}")
    return 0


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "openvpn", help="OpenVPN hard reset, TLS, key-method 2 + PUSH_REPLY, or in-tunnel echoes",
        description="Probe an OpenVPN 2.x server like a client would; ends with EXIT.")
    parser.add_argument("--endpoint", required=True, metavar="HOST:PORT")
    parser.add_argument("--proto", choices=("udp", "tcp"), default="udp")
    parser.add_argument("--ca", metavar="FILE", help="CA that signed the server (tls and up)")
    parser.add_argument("--cert", metavar="FILE", help="this agent's client certificate")
    parser.add_argument("--key", metavar="FILE", help="its private key")
    wrap = parser.add_mutually_exclusive_group()
    wrap.add_argument("--tls-crypt", metavar="FILE", help="tls-crypt static key")
    wrap.add_argument("--tls-auth", metavar="FILE", help="tls-auth static key")
    wrap.add_argument("--tls-crypt-v2", metavar="FILE", help="tls-crypt-v2 client key")
    parser.add_argument("--key-direction", type=int, choices=(0, 1),
                        help="tls-auth key direction (clients normally use 1)")
    parser.add_argument("--auth", default="SHA1", metavar="DIGEST",
                        help="tls-auth HMAC digest (default SHA1)")
    parser.add_argument("--auth-user-pass", metavar="FILE",
                        help="file with a username line and a password line")
    parser.add_argument("--level", choices=tuple(LEVELS), default="session")
    parser.add_argument("--compression", choices=tuple(f.value for f in Framing), default="none",
                        help="the server's compression framing (its --comp-lzo / --compress); "
                             "a pushed one wins (tunnel level)")
    parser.add_argument("--count", type=int, default=5, help="ICMP echoes at the tunnel level")
    parser.add_argument("--interval", type=float, default=0.05,
                        help="seconds between echoes at the tunnel level")
    add_common_arguments(parser, default_timeout=5.0)
    parser.set_defaults(handler=_run)

    tele = sub.add_parser("openvpn-telemetry",
                          help="an OpenVPN node's own view from its management interface")
    tele.add_argument("--management-socket", required=True, metavar="PATH",
                      help="the node's --management unix socket")
    tele.add_argument("--ssh", metavar="[USER@]HOST", help="read it on HOST over SSH (asyncssh)")
    tele.add_argument("--ssh-port", type=int, default=22)
    add_common_arguments(tele, default_timeout=5.0)
    tele.set_defaults(handler=_telemetry)
