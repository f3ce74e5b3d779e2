"""``tunnelwatch probe KIND ...``: run one check now and print what it saw.

The subcommands are the probe commands the check families declare (:mod:`probes.checks.registry`,
built by :mod:`probes.cli.probe_command`), plus the node views of :mod:`probes.cli.node_views`.
Every check goes through :func:`run_and_report`, so all probes share one output contract:

* human-readable lines by default;
* with ``--json``, one JSON object with at least ``ok``, ``reason``, ``duration_seconds`` and
  ``phases`` (seconds), plus ``quality``, ``detail`` and ``facts`` when present;
* exit code 0 when the check passed, 1 when it failed, 2 on a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from probes.checks.base import CheckKind, CheckResult, execute


def add_common_arguments(parser: argparse.ArgumentParser, default_timeout: float = 5.0) -> None:
    parser.add_argument("--timeout", type=float, default=default_timeout,
                        help=f"seconds before the check gives up (default {default_timeout:g})")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("probe", help="run one check now and print the result")
    probe_sub = parser.add_subparsers(dest="probe_kind", required=True, metavar="KIND")
    # imported here: probe_command and node_views build on this module's output contract
    from probes.checks import registry  # noqa: PLC0415
    from probes.cli import node_views, probe_command  # noqa: PLC0415

    for family in registry.families():
        for command in family.commands:
            probe_command.add_command(probe_sub, command)
    node_views.add_parsers(probe_sub)


def format_human(result: CheckResult) -> str:
    lines = [f"{'OK' if result.ok else 'FAILED'}  reason={result.reason.value}  "
             f"took {result.duration_seconds * 1000:.2f} ms"]
    for phase, seconds in result.phases.items():
        lines.append(f"  phase {phase:<20} {seconds * 1000:9.3f} ms")
    if result.quality is not None:
        q = result.quality
        lines.append(f"  sent {q.sent} received {q.received} loss {q.loss_ratio:.1%}")
        for label, rtt in (("rtt p50", q.rtt_p50_seconds), ("rtt p99", q.rtt_p99_seconds),
                           ("rtt max", q.rtt_max_seconds)):
            if rtt is not None:
                lines.append(f"  {label:<26} {rtt * 1000:9.3f} ms")
    for key, fact in result.facts.items():
        lines.append(f"  {key}: {fact}")
    if result.detail:
        lines.append(f"  detail: {result.detail}")
    return "\n".join(lines)


def run_and_report(kind: CheckKind[Any], params: Any, timeout: float, as_json: bool) -> int:
    result = asyncio.run(execute(kind, params, timeout))
    print(json.dumps(result.to_json_dict(), sort_keys=True) if as_json else format_human(result))
    return 0 if result.ok else 1


def usage_error(message: str) -> int:
    print(f"tunnelwatch probe: error: {message}", file=sys.stderr)
    return 2
