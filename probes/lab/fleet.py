"""A small VPN fleet in the lab: nodes serving WireGuard, OpenVPN and IKEv2, and agent hosts
with their own probe identities on every node.

Each agent gets, per node, its own WireGuard key with its own /32 AllowedIPs address, its own
OpenVPN client certificate and its own IKE identity: shared probe identities break handshakes
(see docs/lab.md). :meth:`Fleet.agent_config` renders a ready agent config for one agent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from probes.lab.keys import WgKeyPair, wg_keypair
from probes.lab.openvpn import OpenVPNServer
from probes.lab.pki import CertFiles
from probes.lab.strongswan import StrongSwanServer
from probes.lab.topology import Host, Lab
from probes.lab.wireguard import WgPeer, WireGuardServer


@dataclass
class FleetNode:
    name: str
    host: Host
    wireguard: WireGuardServer
    openvpn: OpenVPNServer
    ikev2: StrongSwanServer
    pop: str
    pool: str = "pool-a"
    region: str = "lab"


@dataclass
class FleetAgent:
    name: str
    host: Host
    index: int
    wg_keys: dict[str, WgKeyPair] = field(default_factory=dict)  # per node
    ovpn_certs: dict[str, CertFiles] = field(default_factory=dict)  # per node

    @property
    def tunnel_address(self) -> str:
        return f"10.201.0.{10 + self.index}"

    @property
    def ike_id(self) -> str:
        return f"{self.name}.agents.lab"


@dataclass
class Fleet:
    lab: Lab
    nodes: dict[str, FleetNode] = field(default_factory=dict)
    agents: dict[str, FleetAgent] = field(default_factory=dict)

    @classmethod
    def build(cls, lab: Lab, node_names: list[str], agent_names: list[str],
              pops: list[str] | None = None, openvpn_wrap: str = "tls-crypt") -> Fleet:
        fleet = cls(lab)
        agent_hosts = [lab.add_host(a) for a in agent_names]
        for i, name in enumerate(agent_names):
            fleet.agents[name] = FleetAgent(name, agent_hosts[i], i)
        for i, name in enumerate(node_names):
            host = lab.add_host(name)
            peers = []
            for agent in fleet.agents.values():
                keys = wg_keypair()
                agent.wg_keys[name] = keys
                peers.append(WgPeer(keys.public, f"{agent.tunnel_address}/32"))
            wg = lab.start_wireguard(host, peers=peers)
            ovpn = lab.start_openvpn(host, proto="udp", wrap=openvpn_wrap)
            for agent in fleet.agents.values():
                agent.ovpn_certs[name] = ovpn.issue_client(agent.name)
            ike = lab.start_strongswan(host, remote_id="%any")
            pop = (pops or [f"pop{i + 1}" for i in range(len(node_names))])[i]
            fleet.nodes[name] = FleetNode(name, host, wg, ovpn, ike, pop=pop)
        return fleet

    def agent_config(self, agent_name: str, directory: Path,
                     mesh: dict[str, Any] | None = None) -> Path:
        """Write ``directory/<agent>.yaml`` (and its key files) for one agent; return its path."""
        agent = self.agents[agent_name]
        directory.mkdir(parents=True, exist_ok=True)
        targets = []
        for node in self.nodes.values():
            key_file = agent.wg_keys[node.name].write_private(
                directory / f"{agent.name}-{node.name}-wg.key")
            cert = agent.ovpn_certs[node.name]
            targets.append({
                "id": node.name, "pool": node.pool, "pop": node.pop, "region": node.region,
                "address": node.host.address,
                "wireguard": {"port": node.wireguard.port,
                              "server_public_key": node.wireguard.public_key,
                              "private_key_file": str(key_file),
                              "tunnel_address": f"{agent.tunnel_address}/32",
                              "canary": node.wireguard.tunnel_address},
                "openvpn": {"port": node.openvpn.port, "proto": node.openvpn.proto,
                            "ca_file": str(node.openvpn.ca_file), "cert_file": str(cert.cert),
                            "key_file": str(cert.key),
                            **_wrap_fields(node.openvpn)},
                "ikev2": {"local_id": agent.ike_id, "remote_id": node.ikev2.local_id,
                          "psk_file": str(node.ikev2.psk_file),
                          "ping": node.ikev2.inner_address},
                "l4": {"tcp_ports": [], "icmp": True},
            })
        config: dict[str, Any] = {
            "agent": {"vantage": agent.name, "region": "lab",
                      "state_dir": str(directory / f"{agent.name}-state")},
            "targets": targets,
        }
        if mesh:
            config["mesh"] = mesh
        path = directory / f"{agent.name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path


def _wrap_fields(server: OpenVPNServer) -> dict[str, Any]:
    key = str(server.wrap_key_file) if server.wrap_key_file else None
    if server.wrap == "tls-crypt":
        return {"tls_crypt_file": key}
    if server.wrap == "tls-auth":
        return {"tls_auth_file": key, "key_direction": 1}
    if server.wrap == "tls-crypt-v2":
        return {"tls_crypt_v2_file": key}
    return {}
