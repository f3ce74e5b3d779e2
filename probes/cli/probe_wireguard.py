"""``tunnelwatch probe wireguard``: one WireGuard handshake (or session) now.

    tunnelwatch probe wireguard --endpoint HOST:PORT --server-public-key KEY \\
        --private-key-file F [--preshared-key-file F] \\
        [--tunnel-address A.B.C.D/32 --ping A.B.C.D [--count N]] [--timeout S] [--json]

Without ``--ping`` it runs ``wireguard.handshake``; with it, ``wireguard.session`` (handshake, N
ICMP echoes to the in-tunnel address, keepalive). Exit 0 ok, 1 check failed, 2 usage error.

``tunnelwatch probe wireguard-telemetry --interface IF [--ssh [USER@]HOST]`` prints the node's own
view (``wg show IF dump``): peers, active peers, bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import time
from pathlib import Path
from typing import Any

from probes.checks import wireguard as wgcheck
from probes.checks import wireguard_telemetry as telemetry
from probes.cli.probe import add_common_arguments, run_and_report, usage_error


def default_state_file() -> str:
    """Where the one-shot CLI keeps its last TAI64N timestamps (per agent key)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "tunnelwatch" / "wireguard-timestamps.json")


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); ValueError with a message otherwise."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"--endpoint must be HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("write an IPv6 endpoint as [ADDRESS]:PORT")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return host, port


def build_params(args: argparse.Namespace) -> wgcheck.WireGuardParams:
    """Validate the arguments into check parameters; ValueError says what is wrong."""
    host, port = parse_endpoint(args.endpoint)
    if (args.tunnel_address is None) != (args.ping is None):
        raise ValueError("--tunnel-address and --ping go together")
    if args.tunnel_address is not None:
        ipaddress.ip_interface(args.tunnel_address)
        ipaddress.ip_address(args.ping)
    if args.count < 1:
        raise ValueError("--count must be >= 1")
    if args.timeout <= 0:
        raise ValueError("--timeout must be > 0")
    params = wgcheck.WireGuardParams(
        host=host, port=port, server_public_key=args.server_public_key,
        private_key_file=args.private_key_file, preshared_key_file=args.preshared_key_file,
        state_file=None if args.no_state else (args.state_file or default_state_file()),
        tunnel_address=args.tunnel_address, canary=args.ping, echo_count=args.count,
        echo_interval=args.interval, loss_threshold=args.loss_threshold)
    wgcheck.load_config(params)  # unreadable or malformed keys are a usage error, exit 2
    return params


def _probe(args: argparse.Namespace) -> int:
    try:
        params = build_params(args)
    except (ValueError, wgcheck.ConfigError) as exc:
        return usage_error(str(exc))
    kind = wgcheck.SESSION if params.canary is not None else wgcheck.HANDSHAKE
    return run_and_report(kind, params, args.timeout, args.json)


def _telemetry(args: argparse.Namespace) -> int:
    try:
        if args.ssh:
            user, _, host = args.ssh.rpartition("@")
            view = asyncio.run(telemetry.collect_ssh(host, args.interface, username=user or None,
                                                     port=args.ssh_port))
        else:
            view = asyncio.run(telemetry.collect_local(args.interface))
    except telemetry.TelemetryError as exc:
        print(f"tunnelwatch probe wireguard-telemetry: {exc}")
        return 1
    now = time.time()
    summary = view.summary(now)
    if args.json:
        summary["peer_list"] = [
            {"public_key": p.public_key, "endpoint": p.endpoint, "allowed_ips": list(p.allowed_ips),
             "handshake_age_seconds": p.handshake_age(now), "rx_bytes": p.rx_bytes,
             "tx_bytes": p.tx_bytes} for p in view.peers]
        print(json.dumps(summary, sort_keys=True))
        return 0
    print(f"{view.interface}  port {view.listen_port}  peers {summary['peers']}  "
          f"active {summary['active_peers']}  rx {view.rx_bytes} B  tx {view.tx_bytes} B")
    for p in view.peers:
        age = p.handshake_age(now)
        seen = "never" if age is None else f"{age:.0f}s ago"
        print(f"  {p.public_key}  {','.join(p.allowed_ips) or '-':<18} handshake {seen:<10} "
              f"rx {p.rx_bytes} tx {p.tx_bytes}")
    return 0


def add_parser(sub: Any) -> None:
    wg = sub.add_parser("wireguard", help="WireGuard handshake, or a session with --ping",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    wg.add_argument("--endpoint", required=True, metavar="HOST:PORT")
    wg.add_argument("--server-public-key", required=True, metavar="KEY", help="base64")
    wg.add_argument("--private-key-file", required=True, metavar="F",
                    help="this agent's private key (as written by `tunnelwatch keygen wireguard`)")
    wg.add_argument("--preshared-key-file", metavar="F")
    wg.add_argument("--tunnel-address", metavar="A.B.C.D/32",
                    help="this agent's AllowedIPs address on the node (inner source address)")
    wg.add_argument("--ping", metavar="A.B.C.D", help="in-tunnel address to echo (session)")
    wg.add_argument("--count", type=int, default=5, help="echo requests (default 5)")
    wg.add_argument("--interval", type=float, default=0.05, help="seconds between echoes")
    wg.add_argument("--loss-threshold", type=float, default=0.5,
                    help="fail above this in-tunnel loss ratio (default 0.5)")
    wg.add_argument("--state-file", metavar="F",
                    help=f"last TAI64N timestamp per key (default {default_state_file()})")
    wg.add_argument("--no-state", action="store_true",
                    help="do not persist timestamps (a stepped-back clock may then be refused)")
    add_common_arguments(wg, default_timeout=5.0)
    wg.set_defaults(handler=_probe)

    tel = sub.add_parser("wireguard-telemetry", help="a node's own view: `wg show IF dump`")
    tel.add_argument("--interface", required=True)
    tel.add_argument("--ssh", metavar="[USER@]HOST", help="run wg on this host over SSH")
    tel.add_argument("--ssh-port", type=int, default=22)
    tel.add_argument("--json", action="store_true", help="print one JSON object")
    tel.set_defaults(handler=_telemetry)
