"""``tunnelwatch agent --config F``: run the probe agent until SIGTERM/SIGINT (SIGHUP reloads)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from probes.aio import run_fast
from probes.config import ConfigError
from probes.model.signing import KeyFileError
from probes.startup import StartupError, os_error_line


def _run(args: argparse.Namespace) -> int:
    from probes.agent.runtime import Agent, JsonLogFormatter  # noqa: PLC0415 - keeps CLI start fast

    if args.log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())
    logging.getLogger().setLevel(getattr(logging, args.log_level.upper()))
    try:
        agent = Agent(args.config, listen=args.listen)
        run_fast(agent.run())
    except (ConfigError, KeyFileError, StartupError) as exc:  # one line, no traceback
        print(f"tunnelwatch agent: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder it may not use (state_dir), or that is not there
        print(f"tunnelwatch agent: {os_error_line(exc)}", file=sys.stderr)
        return 2
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("agent", help="run the probe agent")
    p.add_argument("--config", required=True, help="agent YAML config")
    p.add_argument("--listen", help="override agent.listen (host:port) for /metrics, /probe")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.set_defaults(handler=_run)
