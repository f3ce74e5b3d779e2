"""Shared pytest fixtures: the lab, and a guard that the session leaves nothing behind."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

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
