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


def test_the_installed_wheel_is_the_whole_product(
        walked: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    home, result = walked
    assert result.returncode == 0, "the walkthrough failed (see the other test)"
    assert _tw(home, "--help").returncode == 0
    module = subprocess.run([str(home / "tw" / "bin" / "python"), "-m", "probes", "--help"],
                            cwd=home, env=_env(), capture_output=True, text=True, timeout=60,
                            check=False)
    assert module.returncode == 0 and "tunnelwatch" in module.stdout
    out = home / "exported"
    export = _tw(home, "assets", "export", str(out))
    assert export.returncode == 0, export.stderr
    assert {p.name for p in out.iterdir()} == {"rules", "dashboards", "alertmanager",
                                               "examples", "LICENSE"}
    assert list((out / "dashboards").glob("*.json"))
    assert (out / "alertmanager" / "alertmanager.yml").is_file()
    examples = sorted((out / "examples").glob("*.yaml"))
    assert {p.name for p in examples} >= {"agent.yaml", "mesh.yaml"}
    for example in examples:
        keys = _tw(home, "keygen", "secrets", str(example))
        assert keys.returncode == 0, keys.stderr
        checked = _tw(home, "check-config", str(example))
        assert checked.returncode == 0, checked.stderr
    if PROMTOOL is not None:
        rules = sorted(str(p) for p in (out / "rules").glob("*.rules.yaml"))
        promtool = subprocess.run([PROMTOOL, "check", "rules", *rules], capture_output=True,
                                  text=True, timeout=120, check=False)
        assert promtool.returncode == 0, promtool.stdout + promtool.stderr
    else:
        pytest.fail("promtool is missing (make setup installs it)")
    # writing commands write where they are told: nothing into site-packages
    site = next((home / "tw" / "lib").glob("python3*/site-packages"))
    reference = _tw(home, "config-reference")
    assert reference.returncode == 0 and "# Configuration reference" in reference.stdout
    assert _tw(home, "config-reference", "--output", str(home / "ref.md")).returncode == 0
    assert (home / "ref.md").read_text() == reference.stdout
    assert not list(site.rglob("configuration-reference.md"))
    assert not (site.parent / "docs").exists()
