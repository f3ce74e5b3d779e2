"""docs/examples/agent.yaml stays valid and plans the checks its comments promise."""

from __future__ import annotations

from pathlib import Path

import pytest

from probes.agent.plan import plan
from probes.config import load_agent_config

pytestmark = pytest.mark.agent

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "agent.yaml"


def test_example_config_is_valid_and_plans_l4_checks() -> None:
    config = load_agent_config(EXAMPLE)
    checks = plan(config, EXAMPLE.parent)
    assert [c.key for c in checks] == [
        "fra1-node1/tcp:443", "fra1-node1/tcp:1194", "fra1-node1/udp:53", "fra1-node1/icmp",
        "fra1-node2/tcp:443", "fra1-node2/icmp"]
