"""``tunnelwatch demo``: build the lab, probe it with real clients, print what was seen."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def handle(args: argparse.Namespace) -> int:
    from probes.lab import LabError  # noqa: PLC0415 - keeps the CLI start fast
    from probes.lab.showcase import run  # noqa: PLC0415

    try:
        return 0 if run(sys.stdout) else 1
    except LabError as exc:
        print(f"tunnelwatch demo: {exc}", file=sys.stderr)
        return 2


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="build the lab, probe every protocol, print what was seen")
    p.set_defaults(handler=handle)
