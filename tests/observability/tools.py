"""Helpers for the observability tests: repository paths and the external tools they drive."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "rules"
ALERTMANAGER = ROOT / "alertmanager"
DASHBOARDS = ROOT / "dashboards"
DEPLOY = ROOT / "deploy"
DOCS = ROOT / "docs"


def tool(name: str) -> str:
    """Path of an external binary, or skip the test with the reason."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: prometheus, prometheus-alertmanager)")
    return path


def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # promtool runs every rule test file in one process: about 45 s at load average 8 here,
    # past 120 s under the shared machine's load (load average 20): generous, not a hang guard
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, cwd=cwd)
