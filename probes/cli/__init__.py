"""``tunnelwatch`` command line.

Each command group lives in its own module exposing ``add_parser(subparsers)``; the parser it
adds sets ``handler`` to a function ``(argparse.Namespace) -> int`` (the exit code). Exit codes
across the CLI: 0 success, 1 the thing checked failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from probes import __version__

COMMAND_MODULES: tuple[str, ...] = (
    "check_config",
    "probe",
    "lab",
    "demo",
    "agent",
    "keygen",
    "mesh",
    "status",
    "drain",
    "receiver",
    "configref",
    "paths",
    "reflector",
    "assets",
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunnelwatch",
        description="Health checks and SLOs for load-balanced VPN fleets.",
    )
    parser.add_argument("--version", action="version", version=f"tunnelwatch {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"probes.cli.{name}").add_parser(sub)
    return parser


def _exit_on_signal(signum: int, frame: object) -> None:
    print(f"tunnelwatch: {signal.Signals(signum).name}: stopping, cleaning up", file=sys.stderr)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM and SIGHUP unwind like Ctrl-C, saying so, so `with Lab(...)` blocks and other
    # cleanups run; long-running commands (agent, mesh) install their own handlers on their loop
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
