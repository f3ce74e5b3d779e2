"""``tunnelwatch assets export DIR``: write the rules, dashboards, Alertmanager config, example
configs and license that come with this install into DIR (probes/assets.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _export(args: argparse.Namespace) -> int:
    from probes.assets import AssetsError, export  # noqa: PLC0415 - keeps the CLI start light

    dest = Path(args.dir)
    if dest.exists() and any(dest.iterdir()) and not args.force:
        print(f"tunnelwatch assets: {dest} is not empty (use --force to write into it)",
              file=sys.stderr)
        return 2
    try:
        written = export(dest)
    except (AssetsError, OSError) as exc:
        print(f"tunnelwatch assets: {exc}", file=sys.stderr)
        return 2
    folders = sorted({p.relative_to(dest).parts[0] for p in written})
    print(f"wrote {len(written)} files into {dest}: {', '.join(folders)}")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("assets", help="the rules, dashboards, Alertmanager config and example "
                                      "configs that come with tunnelwatch")
    inner = p.add_subparsers(dest="assets_command", required=True, metavar="SUBCOMMAND")
    export = inner.add_parser("export", help="write them into DIR")
    export.add_argument("dir", help="where to write them (made if missing)")
    export.add_argument("--force", action="store_true", help="write into a non-empty DIR")
    export.set_defaults(handler=_export)
