"""``tunnelwatch probe wireguard-telemetry | openvpn-telemetry | ikev2-telemetry |
load-telemetry``: a node's own view of its sessions, printed as read (not a check result):
``wg show IF dump``, an OpenVPN management socket (``status 3``, ``load-stats``), or ``swanctl
--list-sas``; or its load (two ``telemetry.load`` reads an interval apart: the rates the mesh
would weigh); on this host (or in a network namespace), or on the node over SSH."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import msgspec

from probes.checks import ikev2_telemetry, load, openvpn_telemetry, wireguard_telemetry
from probes.checks.base import execute
from probes.checks.remote import NodeShell, TelemetryError
from probes.cli.probe import add_common_arguments


def _shell(args: argparse.Namespace) -> NodeShell | None:
    """``--ssh [USER@]HOST`` -> how to log in to the node; None: read on this host."""
    if not args.ssh:
        return None
    user, _, host = args.ssh.rpartition("@")
    return NodeShell(host=host, port=args.ssh_port, username=user or None)


def _add_login(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--ssh", metavar="[USER@]HOST", help=f"{what} on this host over SSH")
    parser.add_argument("--ssh-port", type=int, default=22)


def _wireguard(args: argparse.Namespace) -> int:
    try:
        view = asyncio.run(wireguard_telemetry.collect(args.interface, _shell(args)))
    except TelemetryError as exc:
        print(f"tunnelwatch probe wireguard-telemetry: {exc}")
        return 1
    now = time.time()
    summary = view.summary(now)
    if args.json:
        summary["peer_list"] = [
            {"public_key": p.public_key, "endpoint": p.endpoint,
             "allowed_ips": list(p.allowed_ips),
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


def _openvpn(args: argparse.Namespace) -> int:
    try:
        view = asyncio.run(openvpn_telemetry.read_management(
            args.management_socket, _shell(args), args.timeout))
    except TelemetryError as exc:
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


def _ikev2(args: argparse.Namespace) -> int:
    try:
        counts = asyncio.run(ikev2_telemetry.collect(args.uri, _shell(args)))
    except TelemetryError as exc:
        print(f"tunnelwatch probe ikev2-telemetry: {exc}")
        return 1
    summary = counts.summary()
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(f"IKE SAs {counts.ike_sas} (half-open {counts.half_open})  "
              f"CHILD_SAs {counts.child_sas}")
        for kind in ("ike_by_state", "child_by_state"):
            for state, n in sorted(summary[kind].items()):
                print(f"  {kind.split('_')[0]:<6} {state:<12} {n}")
    return 0


def _load(args: argparse.Namespace) -> int:
    params = load.LoadParams(
        node="cli", ssh=_shell(args), netns=args.netns, interfaces=tuple(args.interface),
        daemon_pid_file=args.daemon_pid_file, daemon_cores=args.daemon_cores, cpu=args.cpu,
        wireguard_interface=args.wireguard_interface)

    async def two_reads() -> Any:
        first = await execute(load.LOAD, params, args.timeout)
        if not first.ok:
            return first
        await asyncio.sleep(args.interval)
        return await execute(load.LOAD, params, args.timeout)

    result = asyncio.run(two_reads())
    if not result.ok:
        print(f"tunnelwatch probe load-telemetry: {result.reason.value}: {result.detail}")
        return 1
    rates = msgspec.to_builtins(result.load) if result.load is not None else {}
    if args.json:
        print(json.dumps({"load": rates, "facts": result.facts}, sort_keys=True))
        return 0
    for name, value in rates.items():
        print(f"  {name:<32} {value}")
    return 0


def add_parsers(sub: Any) -> None:
    tel = sub.add_parser("wireguard-telemetry", help="a node's own view: `wg show IF dump`")
    tel.add_argument("--interface", required=True)
    _add_login(tel, "run wg")
    tel.add_argument("--json", action="store_true", help="print one JSON object")
    tel.set_defaults(handler=_wireguard)

    tele = sub.add_parser("openvpn-telemetry",
                          help="an OpenVPN node's own view from its management interface")
    tele.add_argument("--management-socket", required=True, metavar="PATH",
                      help="the node's --management unix socket")
    _add_login(tele, "read it")
    add_common_arguments(tele, default_timeout=5.0)
    tele.set_defaults(handler=_openvpn)

    t = sub.add_parser("ikev2-telemetry", help="SA counts from swanctl --list-sas (local or SSH)")
    t.add_argument("--uri", help="charon's VICI socket, e.g. unix:///var/run/charon.vici")
    _add_login(t, "run swanctl")
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.set_defaults(handler=_ikev2)

    lt = sub.add_parser("load-telemetry",
                        help="a node's load as the mesh weighs it: two reads an interval apart")
    lt.add_argument("--netns", help="read inside this network namespace")
    lt.add_argument("--interface", action="append", default=[],
                    help="count this interface (repeat; default: all but lo)")
    lt.add_argument("--daemon-pid-file", help="the VPN daemon, for its own CPU share")
    lt.add_argument("--daemon-cores", type=float, default=1.0)
    lt.add_argument("--cpu", choices=("both", "host", "daemon"), default="both")
    lt.add_argument("--wireguard-interface", help="count its peers as sessions")
    lt.add_argument("--interval", type=float, default=1.0, help="seconds between the reads")
    _add_login(lt, "read it")
    add_common_arguments(lt, default_timeout=5.0)
    lt.set_defaults(handler=_load)
