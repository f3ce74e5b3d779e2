"""Build hook: the wheel carries the rules, dashboards, Alertmanager config, example configs and
the license as package data (``probes/assets/``), gathered from the top-level folders when the
package is built (the table and the copying are probes/assets.py's). The folders stay where they
are; nothing is copied into the source tree. Everything else is in pyproject.toml."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _assets_module():  # type: ignore[no-untyped-def]
    # loaded by path: the package itself (and its dependencies) cannot be imported at build time
    spec = importlib.util.spec_from_file_location("tunnelwatch_assets", ROOT / "probes" /
                                                  "assets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildWithAssets(build_py):  # type: ignore[misc]
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "probes" / "assets"
        shutil.rmtree(target, ignore_errors=True)  # a build folder from an earlier build
        _assets_module().gather(ROOT, target)


setup(cmdclass={"build_py": BuildWithAssets})
