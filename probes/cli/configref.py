"""``tunnelwatch config-reference [--check]``: write docs/configuration-reference.md from the
config models (probes/configref.py); with ``--check``, exit 1 when the file on disk is stale."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_STALE = 0, 1
# the checkout this package runs from (an editable install: `make docs`, the tests)
DEFAULT_OUTPUT = Path(__file__).resolve().parents[2] / "docs" / "configuration-reference.md"
_DIFF_LINES_SHOWN = 40


def stale_summary(committed: str, fresh: str, name: str) -> list[str]:
    """A short account of how ``committed`` differs from ``fresh``: counts, then the diff's head."""
    diff = list(difflib.unified_diff(committed.splitlines(), fresh.splitlines(),
                                     f"{name} (on disk)", f"{name} (from the models)",
                                     lineterm=""))
    added = sum(1 for d in diff if d.startswith("+") and not d.startswith("+++"))
    removed = sum(1 for d in diff if d.startswith("-") and not d.startswith("---"))
    lines = [f"{name} is stale: {added} line(s) to add, {removed} to remove"]
    lines += diff[:_DIFF_LINES_SHOWN]
    if len(diff) > _DIFF_LINES_SHOWN:
        lines.append(f"... {len(diff) - _DIFF_LINES_SHOWN} more diff lines")
    lines.append("regenerate with `tunnelwatch config-reference` (or `make docs`)")
    return lines


def handle(args: argparse.Namespace) -> int:
    from probes.configref import render_reference  # noqa: PLC0415 - imports every model

    path = Path(args.output)
    fresh = render_reference()
    try:
        on_disk: str | None = path.read_text()
    except FileNotFoundError:
        on_disk = None
    if args.check:
        if on_disk == fresh:
            print(f"{path}: up to date")
            return EXIT_OK
        if on_disk is None:
            print(f"{path}: missing; run `tunnelwatch config-reference`", file=sys.stderr)
        else:
            print("\n".join(stale_summary(on_disk, fresh, str(path))), file=sys.stderr)
        return EXIT_STALE
    if on_disk != fresh:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(fresh)
        print(f"wrote {path}")
    else:
        print(f"{path}: up to date")
    return EXIT_OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser("config-reference",
                       help="write the configuration reference generated from the config models")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 with a diff summary if the file is stale")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT),
                   help="default: docs/configuration-reference.md of this checkout")
    p.set_defaults(handler=handle)
