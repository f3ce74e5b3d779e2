"""Labs never outlive their owner (issue #17, item 9): a test run killed with SIGTERM (as a CI
timeout does) or SIGHUP left its whole lab running — namespaces and every server in them — with
its owner gone. Now the session unwinds and tears labs down, and ``tunnelwatch lab`` finds and
removes the labs of an owner that died without a chance to (SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import lab_unavailable

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]

SLEEPER = '''
import time
from pathlib import Path


def test_sleeps(lab):
    host = lab.add_host("h")
    host.popen(["sleep", "600"])
    Path({marker!r}).write_text(lab.run_id)
    time.sleep(600)
'''

OWNER = '''
import os, sys
from probes.lab import Lab
lab = Lab("orphan")
lab.add_host("h").popen(["sleep", "600"])
print(lab.run_id, flush=True)
os._exit(0)  # as SIGKILL would: no teardown at all
'''


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")[-3000:]
        assert time.monotonic() < deadline, "the lab did not come up"
        time.sleep(0.05)
    return path.read_text()


@pytest.fixture(autouse=True)
def _needs_a_lab() -> None:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signalled_test_session_tears_its_lab_down(tmp_path: Path, sig: int) -> None:
    from probes.lab.topology import STATE_DIR, destroy, leftovers

    marker = tmp_path / "run_id"
    test = tmp_path / "test_sleeper.py"
    test.write_text(SLEEPER.format(marker=str(marker)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q",
         "--rootdir", str(tmp_path), str(test)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run_id = ""
    try:
        run_id = _wait_for(marker, proc)
        assert any(x.startswith("process") for x in leftovers(run_id))  # up and running
        proc.send_signal(sig)
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
        assert list(leftovers(run_id)) == [], out[-3000:]
        assert not (STATE_DIR / f"{run_id}.json").exists()
        assert "tearing labs down" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if run_id:
            destroy(run_id)  # whatever the outcome, this test leaves nothing behind


def test_lab_finds_and_removes_labs_whose_owner_is_gone(tmp_path: Path) -> None:
    from probes.lab import Lab
    from probes.lab.topology import destroy, leftovers, orphans

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "probes.cli", "lab", *args],
                              capture_output=True, text=True, timeout=120, check=True)
        return done.stdout

    owner = subprocess.run([sys.executable, "-c", OWNER], capture_output=True, text=True,
                           timeout=120, check=True, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    dead = owner.stdout.strip()
    try:
        with Lab("alive") as alive:  # a lab whose owner (this process) runs: left alone
            assert dead in orphans() and alive.run_id not in orphans()
            status = cli("status")
            assert f"lab {dead} (orphan)" in status and "GONE" in status
            assert f"lab {alive.run_id} (alive), owner pid {os.getpid()} running" in status
            removed = cli("down", "--orphans", dead, alive.run_id)
            assert f"lab {dead}: removed" in removed and alive.run_id not in removed
            assert list(leftovers(dead)) == []
            assert list(leftovers(alive.run_id))  # untouched
    finally:
        destroy(dead)
