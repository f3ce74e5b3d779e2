"""``tunnelwatch config-reference [--output FILE] [--check]``: write the configuration reference
generated from the config models (probes/configref.py); with ``--check``, exit 1 when the file on
disk is stale. Without ``--output`` it writes docs/configuration-reference.md of the checkout it
runs from, and to stdout from an install (it used to write into site-packages)."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_STALE = 0, 1
# the checkout this package runs from (an editable install: `make docs`, the tests)
_CHECKOUT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = _CHECKOUT / "docs" / "configuration-reference.md"


def default_output() -> Path | None:
    """The checkout's reference file; None in an install (no source tree around it)."""
    return DEFAULT_OUTPUT if (_CHECKOUT / "pyproject.toml").is_file() else None
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

    fresh = render_reference()
    if args.output is None and default_output() is None:
        if args.check:
            print("tunnelwatch config-reference: --check needs --output FILE (no checkout here)",
                  file=sys.stderr)
            return 2
        sys.stdout.write(fresh)
        return EXIT_OK
    path = Path(args.output) if args.output is not None else DEFAULT_OUTPUT
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
    p.add_argument("--output", metavar="FILE",
                   help="where to write it (default: docs/configuration-reference.md of the "
                        "checkout this runs from; stdout from an installed package)")
    p.set_defaults(handler=handle)
