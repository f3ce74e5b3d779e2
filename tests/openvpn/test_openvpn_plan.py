"""The agent plans OpenVPN checks from the config's ``openvpn:`` section and its ``level``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from probes.agent.plan import plan
from probes.checks.openvpn import OpenVPNParams
from probes.config import load_agent_config

pytestmark = pytest.mark.openvpn


def _config(tmp_path: Path, level: str, **extra: object) -> Path:
    for name in ("ca.crt", "agent.crt", "agent.key", "tc.key"):
        (tmp_path / name).write_text("x\n")
    section = {"port": 1195, "proto": "tcp", "ca_file": "ca.crt", "cert_file": "agent.crt",
               "key_file": "agent.key", "tls_crypt_file": "tc.key", "level": level, **extra}
    doc = {"agent": {"vantage": "a1", "state_dir": str(tmp_path / "state")},
           "targets": [{"id": "n1", "pool": "p", "pop": "x", "region": "r",
                        "address": "10.77.1.2", "openvpn": section}]}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(("level", "kinds"), [
    ("reset", {"openvpn.reset"}),
    ("tls", {"openvpn.tls"}),
    ("session", {"openvpn.tls", "openvpn.session"}),
    ("tunnel", {"openvpn.tls", "openvpn.tunnel"}),
])
def test_level_selects_the_checks(tmp_path: Path, level: str, kinds: set[str]) -> None:
    path = _config(tmp_path, level, compression="comp-lzo")
    planned = plan(load_agent_config(path), tmp_path)
    assert {p.kind.name for p in planned} == kinds
    params = planned[0].params
    assert isinstance(params, OpenVPNParams)
    assert params.host == "10.77.1.2" and params.port == 1195 and params.proto == "tcp"
    assert params.ca_file == str(tmp_path / "ca.crt")
    assert params.compression == "comp-lzo"
