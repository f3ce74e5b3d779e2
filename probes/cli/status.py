"""``tunnelwatch status``: a live table of nodes x vantages from a running mesh.

Each cell is that vantage's opinion of the node: ``up``, ``DEG``, ``DOWN``, ``-`` (no opinion
yet), ``stale`` or ``imp`` (vantage judged impaired). The last columns are the node's verdict and
flags (``Q`` quorum lost, ``G`` held by the pool guard, ``A`` admin state).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
CELL = {
    "UP": "up",
    "DEGRADED": "DEG",
    "DOWN": "DOWN",
    "NONE": "-",
    "STALE": "stale",
    "IMPAIRED": "imp",
}


def fetch(url: str, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url.rstrip('/')}/v1/verdicts?vantages=1", timeout=timeout) as r:  # noqa: S310 - operator-given URL
        data: dict[str, Any] = json.load(r)
    return data


def render(data: dict[str, Any], width: int = 7) -> str:
    vantages: list[str] = data["vantages"]
    nodes: list[dict[str, Any]] = data["nodes"]
    name_w = max([4, *(len(n["node"]) for n in nodes)])
    head = ["node".ljust(name_w), *(v[:width].ljust(width) for v in vantages), "verdict     flags"]
    lines = [" ".join(head)]
    for n in nodes:
        cells = [CELL.get(n.get("vantages", {}).get(v, ""), "") for v in vantages]
        flags = ("Q" if n["quorum_lost"] else "") + ("G" if n["guard_hold"] else "")
        flags += "A" if n["admin"] else ""
        row = [
            n["node"].ljust(name_w),
            *(c.ljust(width) for c in cells),
            n["state"].ljust(11),
            flags,
        ]
        lines.append(" ".join(row).rstrip())
    counts: dict[str, int] = {}
    for n in nodes:
        counts[n["state"]] = counts.get(n["state"], 0) + 1
    lines.append("")
    lines.append("  ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no nodes")
    return "\n".join(lines)


def _url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url)
    if args.config:
        from probes.mesh.config import load_mesh_config  # noqa: PLC0415

        host, port = load_mesh_config(args.config).listen_host_port()
        return f"http://{host}:{port}"
    return "http://127.0.0.1:9480"


def handle(args: argparse.Namespace) -> int:
    try:
        url = _url(args)
    except ValueError as exc:  # ConfigError is a ValueError
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    while True:
        try:
            table = render(fetch(url))
        except (OSError, ValueError, KeyError) as exc:
            print(f"{url}: {exc}", file=sys.stderr)
            if args.once:
                return EXIT_FAILED
            table = f"{url}: unreachable ({exc})"
        if args.once:
            print(table)
            return EXIT_OK
        sys.stdout.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S ") + url + "\n\n" + table + "\n")
        sys.stdout.flush()
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return EXIT_OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="live table of nodes x vantages from a running mesh")
    p.add_argument(
        "--url", help="mesh base URL (default: from --config, else http://127.0.0.1:9480)"
    )
    p.add_argument("--config", help="mesh config file, for its listen address")
    p.add_argument("--once", action="store_true", help="print once and exit")
    p.add_argument("--interval", type=float, default=2.0, help="refresh period in seconds")
    p.set_defaults(handler=handle)
