"""The installable product, outside the checkout: the wheel built from this tree is installed
into a fresh venv by following docs/walkthrough.md step by step (its ``sh`` blocks, in order,
with free ports and the built wheel swapped in), which ends in a first verdict on loopback; then
the installed command is checked against the acceptance of issue 18: ``--help``, ``python -m
probes``, every exported example through ``check-config``, the exported rules through
``promtool check rules``, and commands that write files write where they are told.

Slow-ish for a default test (one wheel build and one venv install, ~1 min under load), and the
only test that proves what an operator gets from ``pip install``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.agent.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
WALKTHROUGH = ROOT / "docs" / "walkthrough.md"
PROMTOOL = shutil.which("promtool")


def _blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```$", text, re.S | re.M)


def _env() -> dict[str, str]:
    """The caller's environment without this checkout's venv: the base interpreter first."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    keep = [p for p in env.get("PATH", "").split(os.pathsep)
            if p and not p.startswith(str(ROOT))]
    env["PATH"] = os.pathsep.join([str(Path(sys.base_prefix) / "bin"), *keep])
    return env


@pytest.fixture(scope="module")
def walked(tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """docs/walkthrough.md run as written in a folder outside the checkout."""
    home = tmp_path_factory.mktemp("operator")
    assert not home.is_relative_to(ROOT)
    dist = home / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                            "-w", str(dist), "-q"], capture_output=True, text=True,
                           timeout=600, check=False)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next(dist.glob("tunnelwatch-*.whl"))
    script = "\n".join(_blocks(WALKTHROUGH.read_text()))
    assert "pip install tunnelwatch\n" in script
    script = script.replace("pip install tunnelwatch\n", f"pip install -q --no-compile {wheel}\n")
    for port in ("9480", "9470", "8443"):
        script = script.replace(port, str(free_port()))
    wrapped = ("set -euo pipefail\n"
               "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n" + script)
    result = subprocess.run(["bash", "-c", wrapped], cwd=home, env=_env(), capture_output=True,
                            text=True, timeout=900, check=False)
    return home, result


def test_the_walkthrough_ends_in_a_first_verdict(
        walked: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    home, result = walked
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in home.glob("*.log"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + logs
    assert "tunnelwatch 0.1.0" in result.stdout
    assert '"node":"demo-node"' in result.stdout and '"state":"UP"' in result.stdout, (
        result.stdout[-2000:])
    assert "probe_success 1.0" in result.stdout
    mesh_log = (home / "mesh.log").read_text()
    assert "mesh loaded: 1 agents, 1 nodes" in mesh_log and "listening on" in mesh_log
    # the install is the wheel's, not this checkout's
    site = next((home / "tw" / "lib").glob("python3*/site-packages"))
    assert (site / "probes" / "assets" / "rules" / "alerts.rules.yaml").is_file()
    assert (site / "probes" / "assets" / "LICENSE").is_file()
    assert list(site.glob("tunnelwatch-*.dist-info/licenses/LICENSE"))


def _tw(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(home / "tw" / "bin" / "tunnelwatch"), *args], cwd=home,
                          env=_env(), capture_output=True, text=True, timeout=120, check=False)


def _keys_then_check(home: Path, example: Path) -> tuple[str, str]:
    """``keygen secrets`` then ``check-config`` on one example: their errors, '' when fine."""
    keys = _tw(home, "keygen", "secrets", str(example))
    if keys.returncode != 0:
        return example.name, "keygen secrets: " + keys.stderr
    checked = _tw(home, "check-config", str(example))
    return example.name, "" if checked.returncode == 0 else "check-config: " + checked.stderr


def test_the_installed_wheel_is_the_whole_product(
        walked: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    home, result = walked
    assert result.returncode == 0, "the walkthrough failed (see the other test)"
    out = home / "exported"
    # the commands that do not depend on each other run side by side: each one is a Python
    # start of a few seconds under load, and the machine has two cores
    with ThreadPoolExecutor(max_workers=4) as pool:
        helped = pool.submit(_tw, home, "--help")
        module = pool.submit(subprocess.run, [str(home / "tw" / "bin" / "python"), "-m",
                                              "probes", "--help"],
                             cwd=home, env=_env(), capture_output=True, text=True, timeout=60,
                             check=False)
        reference = pool.submit(_tw, home, "config-reference")
        written = pool.submit(_tw, home, "config-reference", "--output", str(home / "ref.md"))
        export = _tw(home, "assets", "export", str(out))
        assert export.returncode == 0, export.stderr
        assert {p.name for p in out.iterdir()} == {"rules", "dashboards", "alertmanager",
                                                   "examples", "LICENSE"}
        assert list((out / "dashboards").glob("*.json"))
        assert (out / "alertmanager" / "alertmanager.yml").is_file()
        examples = sorted((out / "examples").glob("*.yaml"))
        assert {p.name for p in examples} >= {"agent.yaml", "mesh.yaml"}
        checked = pool.map(lambda example: _keys_then_check(home, example), examples)
        if PROMTOOL is None:
            pytest.fail("promtool is missing (make setup installs it)")
        rules = sorted(str(p) for p in (out / "rules").glob("*.rules.yaml"))
        promtool = subprocess.run([PROMTOOL, "check", "rules", *rules], capture_output=True,
                                  text=True, timeout=120, check=False)
        assert promtool.returncode == 0, promtool.stdout + promtool.stderr
        assert [(name, error) for name, error in checked if error] == []
        assert helped.result().returncode == 0
        assert module.result().returncode == 0 and "tunnelwatch" in module.result().stdout
        # writing commands write where they are told: nothing into site-packages
        assert reference.result().returncode == 0
        assert "# Configuration reference" in reference.result().stdout
        assert written.result().returncode == 0
    assert (home / "ref.md").read_text() == reference.result().stdout
    site = next((home / "tw" / "lib").glob("python3*/site-packages"))
    assert not list(site.rglob("configuration-reference.md"))
    assert not (site.parent / "docs").exists()
