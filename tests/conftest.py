"""Shared pytest fixtures: the lab, and a guard that the session leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Iterator
from types import FrameType

import pytest

REQUIRED_BINARIES = ("ip", "nft", "wireguard-go", "wg", "openvpn", "swanctl", "haproxy")


def lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root"
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        return f"missing binaries: {', '.join(missing)} (run `make test`, which installs them)"
    return None


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[object]:
    """A fresh lab (network namespaces + router); torn down after the test, also on failure."""
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    from probes.lab import Lab

    name = request.node.name.split("[")[0][-12:].strip("_") or "t"
    with Lab(name) as lab_:
        yield lab_


def _interrupted(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (a CI timeout) or SIGHUP (a closed terminal): unwind like Ctrl-C, so fixtures
    and ``with Lab(...)`` blocks tear their labs down; before, the whole lab (namespaces,
    wireguard-go, OpenVPN, charon, HAProxy, mesh, agents) stayed alive with its owner gone."""
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a second one must not cut the teardown short
        signal.signal(sig, signal.SIG_IGN)
    # pytest prints this line ("KeyboardInterrupt: SIGTERM: ...") as the session ends
    raise KeyboardInterrupt(f"{signal.Signals(signum).name}: stopping, tearing labs down")


def pytest_configure(config: pytest.Config) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Whatever is still open when the session ends (interrupted mid-setup, say) goes now."""
    try:
        from probes.lab.topology import close_all
    except ImportError:
        return
    for run_id in close_all():
        print(f"lab {run_id} was still open at the end of the session: torn down",
              file=sys.__stderr__, flush=True)


@pytest.hookimpl(trylast=True)  # after pytest's own teardown of whatever fixtures were still up
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any lab this session created left a namespace, process or socket."""
    try:
        from probes.lab.topology import CREATED_RUN_IDS, leftovers
    except ImportError:
        return
    left = [item for run_id in CREATED_RUN_IDS for item in leftovers(run_id)]
    if left:
        print("\nLAB LEFTOVERS (teardown bug):\n  " + "\n  ".join(left))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
