"""``tunnelwatch check-config FILE``: validate a config file; exit 0 when valid, 2 when not."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

import yaml

from probes.config import ConfigError, load_agent_config


def _kind_of(path: Path) -> str:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return "agent"  # let the agent loader report the read/parse error with its position
    if isinstance(data, dict) and "targets" not in data and ("nodes" in data or "agents" in data):
        return "mesh"
    return "agent"


def handle(args: argparse.Namespace) -> int:
    path = Path(args.file)
    kind = args.kind or _kind_of(path)
    try:
        if kind == "mesh":
            # the mesh config lives with the mesh; imported lazily so the agent needs none of it
            importlib.import_module("probes.mesh.config").load_mesh_config(path)
        else:
            cfg = load_agent_config(path)
            if not args.quiet:
                print(f"{path}: ok (agent {cfg.agent.vantage}, {len(cfg.targets)} targets)")
                return 0
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"{path}: ok ({kind} config)")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("check-config", help="validate a configuration file (exit 0 valid, 2 not)")
    p.add_argument("file")
    p.add_argument("--kind", choices=("agent", "mesh"), help="default: detected from the keys")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(handler=handle)
