"""The agent plans path-MTU checks from a target's ``mtu:`` section."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from probes.agent.plan import plan
from probes.config import ConfigError, load_agent_config
from probes.model import Tier

pytestmark = pytest.mark.quic


def _load(tmp_path: Path, mtu: dict[str, object]) -> list:  # type: ignore[type-arg]
    doc = {"agent": {"vantage": "a1", "state_dir": str(tmp_path / "state")},
           "targets": [{"id": "n1", "pool": "p", "pop": "x", "region": "r",
                        "address": "10.77.1.2", "mtu": mtu}]}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    return plan(load_agent_config(path), tmp_path)


def test_udp_with_a_port_icmp_without(tmp_path: Path) -> None:
    udp = _load(tmp_path, {"port": 7003, "required_mtu": 1420})
    assert [(p.kind.name, p.tier) for p in udp] == [("mtu.udp", Tier.SESSION)]
    assert udp[0].params.port == 7003 and udp[0].params.required_mtu == 1420
    icmp = _load(tmp_path, {"max_size": 1500})
    assert [p.kind.name for p in icmp] == ["mtu.icmp"]


def test_bad_sizes_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, {"min_size": 1400, "max_size": 1300, "required_mtu": 40})
    assert {p.path for p in info.value.problems} == {"$.targets[0].mtu.min_size",
                                                     "$.targets[0].mtu.required_mtu"}
