"""``tunnelwatch probe mtu HOST [PORT]``: path MTU toward a node; PMTU black holes.

With PORT (``mtu.udp``): no privileges (an ordinary UDP socket with ``IP_MTU_DISCOVER`` and
``IP_RECVERR``); the node must run a UDP echo service there. Without PORT (``mtu.icmp``): ICMP
echo over a ping socket (``net.ipv4.ping_group_range`` must include our group) or, failing that,
a raw socket (``CAP_NET_RAW``). Shared output contract of :mod:`probes.cli.probe`.
"""

from __future__ import annotations

import argparse
from typing import Any

from probes.checks import mtu
from probes.cli.probe import add_common_arguments, run_and_report, usage_error


def _run(args: argparse.Namespace) -> int:
    if args.attempts < 1:
        return usage_error("--attempts must be >= 1")
    if args.max_size is not None and args.min_size is not None and args.min_size > args.max_size:
        return usage_error("--min-size must not be above --max-size")
    if args.port is not None and not 0 < args.port < 65536:
        return usage_error("PORT must be 1..65535")
    params = mtu.MtuParams(host=args.host, port=args.port, max_size=args.max_size,
                           min_size=args.min_size, required_mtu=args.required_mtu,
                           attempts=args.attempts, probe_wait=args.probe_wait)
    kind = mtu.UDP if args.port is not None else mtu.ICMP
    return run_and_report(kind, params, args.timeout, args.json)


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "mtu", help="path MTU by DF-set UDP or ICMP echo probes (PMTU black holes)",
        description="Binary search with DF-set probes: UDP to an echo service on PORT (no "
                    "privileges), or ICMP echo without PORT (ping socket or CAP_NET_RAW). "
                    "Reports the largest IP packet that passes and whether ICMP "
                    "fragmentation-needed came back. Sizes are whole IP packets (MTU figures).")
    parser.add_argument("host")
    parser.add_argument("port", type=int, nargs="?",
                        help="the node's UDP echo port; without it, ICMP echo (mtu.icmp)")
    parser.add_argument("--max-size", type=int,
                        help="largest packet to try (default: the outgoing interface MTU)")
    parser.add_argument("--min-size", type=int,
                        help="floor that must pass (default 576 IPv4, 1280 IPv6)")
    parser.add_argument("--required-mtu", type=int,
                        help="fail with mtu-below-minimum if the path MTU is smaller")
    parser.add_argument("--attempts", type=int, default=2,
                        help="tries per size before silence counts as too big (default 2)")
    parser.add_argument("--probe-wait", type=float, default=0.3,
                        help="seconds to wait for each echo (default 0.3)")
    add_common_arguments(parser, default_timeout=10.0)
    parser.set_defaults(handler=_run)
