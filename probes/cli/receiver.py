"""``tunnelwatch receiver --config F``: the reference webhook receiver (verifies the mesh's signed
verdicts, de-duplicates, keeps per-node order, applies them to a local HAProxy). See
docs/webhooks.md and probes/mesh/publish/receiver.py."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from probes.config import ConfigError
from probes.model.signing import KeyFileError

EXIT_OK, EXIT_USAGE = 0, 2


def handle(args: argparse.Namespace) -> int:
    from probes.mesh.publish.receiver import load_receiver_config, serve  # noqa: PLC0415

    try:
        cfg, base = load_receiver_config(args.config)
        if args.check:
            print(f"{args.config}: OK")
            return EXIT_OK
        serve(cfg, base)
    except (ConfigError, KeyFileError) as exc:  # one line, no traceback
        print(f"tunnelwatch receiver: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser("receiver", help="reference webhook receiver applying verdicts to HAProxy")
    p.add_argument("--config", required=True, help="receiver config (YAML)")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.set_defaults(handler=handle)
