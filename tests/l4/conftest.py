"""L4 test fixtures: a lab with a node running tiny TCP/UDP servers, and an agent host."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from probes.checks import l4

from .l4env import SERVERS, TCP_PORT, UDP_PORT, L4Lab


@pytest.fixture
def l4lab(lab: Any) -> Iterator[L4Lab]:
    node = lab.add_host("node1")
    agent = lab.add_host("agent1")
    node.popen([sys.executable, str(SERVERS), str(TCP_PORT), str(UDP_PORT)], name="servers")
    env = L4Lab(lab, node, agent)
    probe = l4.TcpParams(host=node.address, port=TCP_PORT)
    for _ in range(100):  # wait for the servers to listen
        if env.run(l4.run_tcp(probe, 0.5)).ok:
            break
        time.sleep(0.05)
    else:
        pytest.fail("test servers did not start")
    yield env
