"""Node telemetry checks against real servers: wireguard-go, OpenVPN and strongSwan on one node.

The agent runs on the node (telemetry read locally: ``wg show``, the OpenVPN management socket,
``swanctl --list-sas``), with a real OpenVPN client connected and its own WireGuard handshake
making a peer active. The node's figures must show up as ``tunnelwatch_node_*`` metrics, a real
client reconnect must count, and no telemetry read may reach the mesh. A second test reads the
same over SSH (an in-process asyncssh server; sshd is not installed here) with key auth.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from probes.agent.runtime import Agent
from probes.checks import telemetry
from probes.checks.base import execute
from probes.lab.keys import wg_keypair, wg_psk
from probes.lab.wireguard import WgPeer
from probes.model import Reason, signing
from tests.sshd import command_server

from .helpers import Receiver, free_port, until, write_config

pytestmark = [pytest.mark.agent, pytest.mark.lab]

AGENT_TUNNEL = "10.202.0.2/32"
TIERS = {"l4": {"interval": 1.0, "timeout": 0.5},
         "functional": {"interval": 1.0, "timeout": 0.8, "fast_interval": 0.5},
         "telemetry": {"interval": 0.5, "timeout": 0.4}}


def _secret(path: Path, text: str) -> str:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


def test_agent_on_the_node_exports_its_telemetry(lab: Any, tmp_path: Path) -> None:
    node, client = lab.add_host("node"), lab.add_host("client")
    keys, psk = wg_keypair(), wg_psk()
    wg = lab.start_wireguard(node, peers=[WgPeer(keys.public, AGENT_TUNNEL, psk)])
    ovpn = lab.start_openvpn(node, proto="udp", wrap="tls-crypt")
    ike = lab.start_strongswan(node)
    vpn_client = client.popen(ovpn.client_argv(), name="openvpn-client")
    target = {
        "id": "n1", "pool": "pool-a", "pop": "pop-1", "region": "eu", "address": node.address,
        "wireguard": {"port": wg.port, "server_public_key": wg.public_key,
                      "private_key_file": _secret(tmp_path / "agent.key", keys.private),
                      "preshared_key_file": _secret(tmp_path / "agent.psk", psk)},
        "telemetry": {"wireguard_interface": wg.interface,
                      "openvpn_management_socket": str(ovpn.management_socket),
                      "ikev2": True, "ikev2_vici_uri": f"unix://{ike.vici_socket}"},
    }
    key = signing.generate_key()
    mesh_port = free_port()
    cfg = write_config(tmp_path / "agent.yaml", listen=f"127.0.0.1:{free_port()}",
                       targets=[target], tiers=TIERS,
                       mesh={"endpoints": [f"http://127.0.0.1:{mesh_port}"],
                             "key_id": "test-vantage",
                             "key_file": _secret(tmp_path / "mesh.key", key),
                             "flush_interval": 0.2})
    labels = {"node": "n1", "pool": "pool-a", "pop": "pop-1", "region": "eu",
              "vantage": "test-vantage"}

    def at(check: str) -> dict[str, str]:
        return {**labels, "check": check}

    async def run() -> tuple[Receiver, dict[str, float | None]]:
        receiver = Receiver(key.encode(), "test-vantage")
        await receiver.start(mesh_port)
        agent = Agent(cfg)
        await agent.start()
        get = agent.registry.get_sample_value
        try:
            await until(lambda: get("tunnelwatch_node_active_peers",
                                    at("telemetry.openvpn")) == 1, 60,
                        "the real OpenVPN client in the node's telemetry")
            await until(lambda: get("tunnelwatch_node_active_peers",
                                    at("telemetry.wireguard")) == 1, 30,
                        "the agent's own WireGuard handshake in the node's telemetry")
            await until(lambda: get("tunnelwatch_node_active_peers",
                                    at("telemetry.ikev2")) == 0, 30, "strongSwan's SA count")
            before = get("tunnelwatch_node_reconnects_total", at("telemetry.openvpn"))
            # the client drops and comes back: a new session of a known client
            lab.stop_process(vpn_client)
            await asyncio.sleep(1.2)  # a new "connected since" second, whatever the poll phase
            client.popen(ovpn.client_argv(), name="openvpn-client-again")
            await until(lambda: (get("tunnelwatch_node_reconnects_total",
                                     at("telemetry.openvpn")) or 0) >= 1, 60,
                        "the reconnect to be counted")
            await until(lambda: "wireguard.handshake" in receiver.checks, 60, "a report")
            return receiver, {
                "before": before,
                "reads": get("tunnelwatch_telemetry_reads_total", at("telemetry.wireguard")),
                "rx": get("tunnelwatch_node_received_bytes_total", at("telemetry.openvpn")),
                "probe_attempts": get("tunnelwatch_probe_attempts_total",
                                      at("telemetry.openvpn")),
                "half_open": get("tunnelwatch_node_half_open_sas", at("telemetry.ikev2")),
            }
        finally:
            await agent.stop(drain_timeout=0)
            await receiver.stop()

    with node.entered():
        receiver, seen = asyncio.run(run())
    assert seen["before"] == 0  # the first sight of a client is not a reconnect
    assert seen["reads"] is not None and seen["reads"] >= 2
    assert seen["rx"] is not None and seen["rx"] > 0
    assert seen["probe_attempts"] is None  # telemetry reads are not probes (SLIs stay clean)
    assert seen["half_open"] == 0
    assert not [c for c in receiver.checks if c.startswith("telemetry.")], receiver.checks


def test_telemetry_over_ssh_with_key_auth(lab: Any, tmp_path: Path) -> None:
    import asyncssh

    node = lab.add_host("node")
    ovpn = lab.start_openvpn(node, proto="udp", wrap="tls-crypt")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    key_file = tmp_path / "id_ed25519"
    client_key.write_private_key(str(key_file))

    async def scenario() -> tuple[list[Any], list[str]]:
        async with command_server(client_key=client_key) as sshd:
            shell = telemetry.NodeShell(host="127.0.0.1", port=sshd.port, username="tw",
                                        key_file=str(key_file), verify_host_key=False)
            stranger = telemetry.NodeShell(host="127.0.0.1", port=sshd.port, username="tw",
                                           key_file=None, verify_host_key=True)
            params = telemetry.OpenVPNTelemetry(node="ssh-node", ssh=shell,
                                                management_socket=str(ovpn.management_socket))
            results = [
                await execute(telemetry.OPENVPN, params, 5.0),
                # host key not in any known_hosts: refused before a command runs
                await execute(telemetry.OPENVPN, telemetry.OpenVPNTelemetry(
                    node="ssh-node", ssh=stranger, management_socket="/x"), 5.0),
                await execute(telemetry.OPENVPN, telemetry.OpenVPNTelemetry(
                    node="ssh-node", ssh=shell, management_socket=str(tmp_path / "none")), 5.0),
            ]
            return results, sshd.commands

    (ok, unverified, missing), commands = asyncio.run(scenario())
    assert ok.ok and ok.facts["node_active_peers"] == 0, ok
    assert ok.facts["node_reconnects_total"] == 0
    assert not unverified.ok and unverified.reason is Reason.PROBE_ERROR, unverified
    assert not missing.ok and missing.reason is Reason.BAD_RESPONSE, missing
    assert len(commands) == 2 and "socat" in commands[0]
