"""The whole agent in a lab namespace against a real wireguard-go node.

Plan (wireguard params by convention), scheduler tiers, the cascade from a failing L4 check,
real WireGuard handshake and in-tunnel session checks, and the metrics they produce.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from probes.agent.runtime import Agent
from probes.lab.keys import wg_keypair, wg_psk
from probes.lab.wireguard import WgPeer

from .helpers import until, write_config

pytestmark = [pytest.mark.agent, pytest.mark.lab]

AGENT_TUNNEL = "10.201.0.2/32"


def _secret(path: Path, text: str) -> str:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path.name


def test_agent_runs_wireguard_checks_and_cascades(lab: Any, tmp_path: Path) -> None:
    node, agent_host = lab.add_host("node"), lab.add_host("agent")
    keys, psk = wg_keypair(), wg_psk()
    server = lab.start_wireguard(node, peers=[WgPeer(keys.public, AGENT_TUNNEL, psk)])
    target = {
        "id": "wg-node", "pool": "pool-a", "pop": "pop-1", "region": "eu",
        "address": node.address,
        "wireguard": {"port": server.port, "server_public_key": server.public_key,
                      "private_key_file": _secret(tmp_path / "agent.key", keys.private),
                      "preshared_key_file": _secret(tmp_path / "agent.psk", psk),
                      "tunnel_address": AGENT_TUNNEL, "canary": server.tunnel_address,
                      "echo_count": 5},
        "l4": {"tcp_ports": [9]},  # nothing listens: every L4 run fails and cascades
    }
    cfg = write_config(
        tmp_path / "agent.yaml", listen="127.0.0.1:9470", targets=[target],
        tiers={"l4": {"interval": 0.5, "timeout": 0.4, "fast_interval": 0.25},
               "functional": {"interval": 3.0, "timeout": 2.0, "fast_interval": 1.0},
               "session": {"interval": 4.0, "timeout": 3.0, "fast_interval": 2.0}})
    labels = {"node": "wg-node", "pool": "pool-a", "pop": "pop-1", "region": "eu",
              "vantage": "test-vantage"}

    async def run() -> dict[str, float | None]:
        agent = Agent(cfg)
        await agent.start()
        get = agent.registry.get_sample_value

        def seen() -> bool:
            hs = get("tunnelwatch_probe_attempts_total", {**labels, "check": "wireguard.handshake"})
            ses = get("tunnelwatch_probe_attempts_total", {**labels, "check": "wireguard.session"})
            # a session run can fail on a loaded machine (echo timeouts); the next one, an
            # interval later, must succeed
            ok = get("tunnelwatch_probe_success", {**labels, "check": "wireguard.session"})
            return bool(hs and hs >= 2 and ses and ses >= 1 and ok == 1)

        try:
            await until(seen, 60, "wireguard handshake and session checks")
        finally:
            await agent.stop(drain_timeout=0)
        return {
            "hs_ok": get("tunnelwatch_probe_success", {**labels, "check": "wireguard.handshake"}),
            "session_ok": get("tunnelwatch_probe_success",
                              {**labels, "check": "wireguard.session"}),
            "session_loss": get("tunnelwatch_probe_loss_ratio",
                                {**labels, "check": "wireguard.session"}),
            "session_rtt": get("tunnelwatch_probe_rtt_p50_seconds",
                               {**labels, "check": "wireguard.session"}),
            "tcp_refused": get("tunnelwatch_probe_failures_total",
                               {**labels, "check": "tcp:9", "reason": "refused"}),
            "cascades": get("tunnelwatch_scheduler_cascades_total", {"vantage": "test-vantage"}),
        }

    with agent_host.entered():
        got = asyncio.run(run())
    assert got["hs_ok"] == 1 and got["session_ok"] == 1, got
    assert got["session_loss"] == 0 and (got["session_rtt"] or 0) > 0, got
    assert (got["tcp_refused"] or 0) >= 1 and (got["cascades"] or 0) >= 1, got
