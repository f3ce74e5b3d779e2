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


def load_any(path: Path, kind: str | None = None) -> str:
    """Load and validate an agent or mesh config (``kind`` None: told by its keys); a line
    saying what it is. ConfigError with every problem otherwise."""
    kind = kind or _kind_of(path)
    if kind == "mesh":
        # the mesh config lives with the mesh; imported lazily so the agent needs none of it
        importlib.import_module("probes.mesh.config").load_mesh_config(path)
        return "mesh config"
    cfg = load_agent_config(path)
    return f"agent {cfg.agent.vantage}, {len(cfg.targets)} targets"


def handle(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        what = load_any(path, args.kind)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"{path}: ok ({what})")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("check-config", help="validate a configuration file (exit 0 valid, 2 not)")
    p.add_argument("file")
    p.add_argument("--kind", choices=("agent", "mesh"), help="default: detected from the keys")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(handler=handle)
