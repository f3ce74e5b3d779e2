"""``tunnelwatch demo``: act 1 probes a lab node with every protocol's real client; act 2 runs the
whole stack (3 nodes, 3 agents, mesh, HAProxy, Prometheus) through a script of faults and prints a
summary with timings. Finishes by itself and tears everything down (also on Ctrl-C / SIGTERM)."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any


def handle(args: argparse.Namespace) -> int:
    from probes.cli import _exit_on_signal  # noqa: PLC0415
    from probes.lab import LabError  # noqa: PLC0415 - keeps the CLI start fast
    from probes.lab.showcase import run  # noqa: PLC0415

    # Ctrl-C unwinds like SIGTERM (SystemExit through every `with Lab`): left to Python's
    # default, an interrupt landing inside a probe's asyncio.run became a cancellation the
    # probe reported as a failed check, and the demo carried on (seen in CI: 60 s, no exit)
    signal.signal(signal.SIGINT, _exit_on_signal)
    try:
        if args.ha:
            from probes.lab.ha_story import run as run_ha  # noqa: PLC0415

            return 0 if run_ha(sys.stdout) else 1
        return 0 if run(sys.stdout, story_seconds=0 if args.quick else args.duration) else 1
    except LabError as exc:
        print(f"tunnelwatch demo: {exc}", file=sys.stderr)
        return 2


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="build the lab, probe every protocol, play a fault script")
    p.add_argument("--duration", type=float, default=180.0,
                   help="seconds the fault script may take (it stops starting steps after)")
    p.add_argument("--quick", action="store_true", help="act 1 only (real clients)")
    p.add_argument("--ha", action="store_true",
                   help="instead: 3 mesh replicas on a 3-member etcd; kill the leader, an etcd "
                        "member; check every verdict is delivered (docs/ha.md)")
    p.set_defaults(handler=handle)
