"""``tunnelwatch probe ikev2``: one IKEv2 check now (init, auth or tunnel level), and
``tunnelwatch probe ikev2-telemetry``: the responder's SA counts from ``swanctl --list-sas``."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
from typing import Any

from probes.checks import ikev2, ikev2_telemetry
from probes.cli.probe import add_common_arguments, run_and_report, usage_error
from probes.protocols.ikev2 import IKEv2Error
from probes.protocols.ikev2.proposals import DEFAULT_IKE_PROPOSALS, parse_ike_proposals

KINDS = {"init": ikev2.INIT, "auth": ikev2.AUTH, "tunnel": ikev2.TUNNEL}


def split_endpoint(text: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[V6]:PORT``; raises ValueError."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 500
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 500


def _handler(args: argparse.Namespace) -> int:
    try:
        host, port = split_endpoint(args.endpoint)
    except ValueError:
        return usage_error(f"--endpoint {args.endpoint!r}: expected HOST[:PORT]")
    if not host or not 0 < port < 65536:
        return usage_error(f"--endpoint {args.endpoint!r}: expected HOST[:PORT]")
    proposals = tuple(args.proposal or DEFAULT_IKE_PROPOSALS)
    try:
        parse_ike_proposals(proposals)
    except IKEv2Error as exc:
        return usage_error(str(exc))
    if args.level != "init" and args.psk_file is None:
        return usage_error(f"--level {args.level} needs --psk-file")
    if args.count < 1:
        return usage_error("--count must be >= 1")
    for flag, value in (("--ping", args.ping), ("--inner-address", args.inner_address)):
        if value is not None:
            try:
                ipaddress.IPv4Address(value)
            except ValueError:
                return usage_error(f"{flag} {value!r} is not an IPv4 address")
    if args.psk_file is not None:
        try:
            with open(args.psk_file, encoding="utf-8") as f:
                f.read(1)
        except OSError as exc:
            return usage_error(f"--psk-file: {exc}")
    params = ikev2.Ikev2Params(
        host=host, port=port, proposals=proposals, psk_file=args.psk_file,
        local_id=args.local_id, remote_id=args.remote_id, ping=args.ping,
        inner_address=args.inner_address, echo_count=args.count, force_nat_t=args.force_nat_t)
    return run_and_report(KINDS[args.level], params, args.timeout, args.json)


def _telemetry(args: argparse.Namespace) -> int:
    try:
        if args.ssh:
            user, _, host = args.ssh.rpartition("@")
            counts = asyncio.run(ikev2_telemetry.collect_ssh(
                host, vici_uri=args.uri, username=user or None, port=args.ssh_port))
        else:
            counts = asyncio.run(ikev2_telemetry.collect_local(args.uri))
    except ikev2_telemetry.TelemetryError as exc:
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


def add_parser(sub: Any) -> None:
    p = sub.add_parser("ikev2", help="IKEv2 responder: SA_INIT, PSK IKE_AUTH, or ESP echoes")
    p.add_argument("--endpoint", required=True, help="responder HOST[:PORT] (default port 500)")
    p.add_argument("--level", choices=tuple(KINDS), default="init",
                   help="init: alive + proposal; auth: PSK IKE SA; tunnel: ICMP through ESP")
    p.add_argument("--proposal", action="append", metavar="PROPOSAL",
                   help="IKE proposal in strongSwan notation, e.g. aes256gcm16-prfsha256-ecp256 "
                        "(repeatable; default: AES-GCM and AES-CBC/SHA-2 with groups 31/19/20/14)")
    p.add_argument("--local-id", default="tunnelwatch-probe", help="our IDi (FQDN or IPv4)")
    p.add_argument("--remote-id", help="the responder must identify as this (IDr)")
    p.add_argument("--psk-file", help="file holding the pre-shared key (auth and tunnel levels)")
    p.add_argument("--ping", help="tunnel level: address behind the responder to echo")
    p.add_argument("--inner-address", help="tunnel level: our source address inside the tunnel")
    p.add_argument("--count", type=int, default=5, help="tunnel level: ICMP echoes to send")
    p.add_argument("--force-nat-t", action="store_true",
                   help="pretend to be behind NAT so the exchange floats to UDP 4500")
    add_common_arguments(p, default_timeout=5.0)
    p.set_defaults(handler=_handler)

    t = sub.add_parser("ikev2-telemetry", help="SA counts from swanctl --list-sas (local or SSH)")
    t.add_argument("--uri", help="charon's VICI socket, e.g. unix:///var/run/charon.vici")
    t.add_argument("--ssh", metavar="[USER@]HOST", help="run swanctl on this host over SSH")
    t.add_argument("--ssh-port", type=int, default=22)
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.set_defaults(handler=_telemetry)
