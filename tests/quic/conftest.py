"""QUIC / MTU lab fixtures: one lab per module with the MASQUE server variants and a UDP echo.

A module-scoped lab keeps the suite fast: every reason test reuses the same namespaces and
servers instead of building a lab each (the failure tests do not change shared state, except
``gone``, a host of its own that one test partitions).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import lab_unavailable
from tests.labenv import AgentLab

SERVER_NAME = "masque.lab"
QUIC_PORT, REFUSE_PORT, ALPN_PORT, DEAD_PORT = 4433, 4434, 4435, 4436
ECHO_PORT = 7003


@dataclass
class QuicLab(AgentLab):
    gone: Any  # a host whose link the tests may cut
    far: Any  # a second UDP echo target, behind a link the tests may make lossy
    ca_file: Path
    other_ca_file: Path  # a CA that did not sign the server certificate


def _wait_ready(log: Path, proc: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and "ready" in log.read_text():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    text = log.read_text() if log.exists() else "(no log)"
    pytest.fail(f"MASQUE server did not start:\n{text}")


def start_masque(lab: Any, host: Any, name: str, *extra: str) -> Any:
    keys = lab.pki()
    cert = keys.dir / f"{SERVER_NAME}.crt"
    if not cert.exists():
        keys.issue(SERVER_NAME, server=True)
    argv = [sys.executable, "-m", "probes.lab.masque", "--cert", str(cert),
            "--key", str(keys.dir / f"{SERVER_NAME}.key"), *extra]
    proc = host.popen(argv, name=name)
    _wait_ready(lab.dir / f"{host.name}-{name}.log", proc)
    return proc


@pytest.fixture(scope="module")
def quiclab() -> Iterator[QuicLab]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    from probes.lab import Lab
    from probes.lab.pki import PKI

    with Lab("quic") as lab:
        node, agent, gone = lab.add_host("node1"), lab.add_host("agent1"), lab.add_host("gone")
        far = lab.add_host("far")
        start_masque(lab, far, "echo", "--echo", f"0.0.0.0:{ECHO_PORT}")
        start_masque(lab, node, "masque", "--listen", f"0.0.0.0:{QUIC_PORT}",
                     "--echo", f"0.0.0.0:{ECHO_PORT}")
        start_masque(lab, node, "masque-refuse", "--listen", f"0.0.0.0:{REFUSE_PORT}",
                     "--refuse", "403")
        start_masque(lab, node, "masque-alpn", "--listen", f"0.0.0.0:{ALPN_PORT}",
                     "--alpn", "hq-interop")
        start_masque(lab, gone, "masque", "--listen", f"0.0.0.0:{QUIC_PORT}")
        other = PKI(lab.dir / "other-pki", name="some-other-ca")
        yield QuicLab(lab, node, agent, gone, far, lab.pki().ca_file, other.ca_file)


class MtuLab(AgentLab):
    """The node runs a UDP echo on ECHO_PORT; tests lower the path MTU or black-hole it."""


@pytest.fixture(scope="module")
def mtulab_module() -> Iterator[MtuLab]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    from probes.lab import Lab

    with Lab("mtu") as lab:
        node, agent = lab.add_host("node1"), lab.add_host("agent1")
        proc = node.popen([sys.executable, "-m", "probes.lab.masque",
                           "--echo", f"0.0.0.0:{ECHO_PORT}"], name="echo")
        _wait_ready(lab.dir / f"{node.name}-echo.log", proc)
        yield MtuLab(lab, node, agent)


@pytest.fixture
def mtulab(mtulab_module: MtuLab) -> Iterator[MtuLab]:
    """The module's MTU lab, with the path restored (MTU 1500, no black hole, no delay) after
    each test."""
    yield mtulab_module
    mtulab_module.lab.set_mtu(mtulab_module.node, 1500)
    mtulab_module.lab.black_hole_pmtu(mtulab_module.agent, on=False)
    mtulab_module.lab.set_delay(mtulab_module.agent, 0)
