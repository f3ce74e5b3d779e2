"""`tunnelwatch lab up|status|down` and `tunnelwatch demo` through the real CLI."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys

import pytest

from probes.lab import leftovers
from probes.lab.showcase import run as run_demo
from tests.conftest import lab_unavailable

pytestmark = pytest.mark.lab


@pytest.fixture(autouse=True)
def _needs_lab() -> None:
    if reason := lab_unavailable():
        pytest.skip(reason)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "probes.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_lab_up_status_down() -> None:
    up = _cli("lab", "up", "--nodes", "1", "--agents", "1")
    run_id = re.search(r"lab (\w+) is up", up.stdout)
    assert up.returncode == 0 and run_id, up.stderr
    rid = run_id.group(1)
    try:
        status = _cli("lab", "status")
        assert f"lab {rid}" in status.stdout and "3/3 processes alive" in status.stdout
        config = re.search(r"agent config: (\S+)", up.stdout)
        assert config
        assert _cli("check-config", config.group(1)).returncode == 0
    finally:
        down = _cli("lab", "down", rid)
    assert down.returncode == 0
    assert list(leftovers(rid)) == []


def test_demo_shows_every_real_client_succeeding() -> None:
    out = io.StringIO()
    assert run_demo(out), out.getvalue()
    text = out.getvalue()
    for what in ("WireGuard", "OpenVPN", "IKEv2", "HAProxy"):
        assert re.search(rf"OK\s+{what}", text), text
    # each client's own evidence, not words the demo prints whatever happened ("?" stands for
    # what was not found)
    assert re.search(r"through the tunnel, loss 0%, avg rtt [\d.]+ ms", text), text
    assert re.search(r"PUSH_REPLY ifconfig 10\.8\.\d+\.\d+, data cipher [A-Z]", text), text
    assert re.search(r"IKE SA established [^?\s]+ -> [^?\s]+, AES", text), text


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_still_tears_down(sig: signal.Signals) -> None:
    proc = subprocess.Popen([sys.executable, "-u", "-m", "probes.cli", "demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    run_id = None
    for line in proc.stdout:  # the lab exists once it prints its run id
        if m := re.search(r"lab (\w{5}):", line):
            run_id = m.group(1)
            break
    assert run_id, "demo never reported its lab"
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert list(leftovers(run_id)) == []


def test_lab_down_of_an_unknown_run_id_is_an_error() -> None:
    """It used to say "removed 0 item(s)" and exit 0: a typo looked like a clean teardown."""
    down = _cli("lab", "down", "nosuch-run-id")
    assert down.returncode == 2, down.stdout + down.stderr
    assert "no lab 'nosuch-run-id'" in down.stderr and "removed" not in down.stdout
