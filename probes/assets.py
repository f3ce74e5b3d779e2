"""The files that come with tunnelwatch beside the code: Prometheus rules (and their promtool
tests), Grafana dashboards, the Alertmanager config (and its route tests), example configs and
the license.

In a checkout they live in the top-level folders (``rules/``, ``dashboards/``, ``alertmanager/``,
``docs/examples/``); a wheel carries them as package data under ``probes/assets/``, gathered from
those folders when it is built (setup.py runs :func:`gather` from this file). ``tunnelwatch assets
export DIR`` writes them out from either. Standard library only: setup.py loads this file on its
own, before the package can be imported.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# (name in the export and in probes/assets/, source folder in a checkout, file patterns)
ASSETS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("rules", "rules", ("*.rules.yaml", "tests/*.yaml", "README.md")),
    ("dashboards", "dashboards", ("*.json", "README.md")),
    ("alertmanager", "alertmanager", ("alertmanager.yml", "route-tests.yaml", "README.md")),
    ("examples", "docs/examples", ("*.yaml",)),
)
LICENSE = "LICENSE"
PACKAGED = Path(__file__).resolve().parent / "assets"  # in an installed wheel
CHECKOUT = Path(__file__).resolve().parent.parent  # the source tree (an editable install)


class AssetsError(OSError):
    """The assets are not where this install keeps them, or cannot be written out."""


def gather(root: Path, target: Path) -> list[Path]:
    """Copy the assets of the source tree ``root`` into ``target`` (same layout as the
    export); the files written."""
    written: list[Path] = []
    for name, folder, patterns in ASSETS:
        for pattern in patterns:
            for source in sorted((root / folder).glob(pattern)):
                written.append(_copy(source, target / name / source.relative_to(root / folder)))
    written.append(_copy(root / LICENSE, target / LICENSE))
    return written


def _copy(source: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, dest)
    return dest


def export(dest: Path) -> list[Path]:
    """Write every asset under ``dest`` (rules/, dashboards/, alertmanager/, examples/,
    LICENSE): from the wheel's package data, or from the checkout this runs from."""
    if PACKAGED.is_dir():
        written = []
        for source in sorted(p for p in PACKAGED.rglob("*") if p.is_file()):
            written.append(_copy(source, dest / source.relative_to(PACKAGED)))
        return written
    if (CHECKOUT / LICENSE).is_file() and (CHECKOUT / "rules").is_dir():
        return gather(CHECKOUT, dest)
    raise AssetsError(f"no assets in {PACKAGED} (an install without them?) nor a checkout at "
                      f"{CHECKOUT}")
