"""A UDP VPN pool behind a real balancer, weighted by the mesh from the nodes' real load.

```
 client   wireguard-go clients + loadgen ----> VIP 10.77.250.1 (nftlb, router namespace)
                                               |  farm wg  (udp 51820, weight scheduler)
                                               |  farm ike (udp 500,4500, sticky by source)
 node1..N wireguard-go (one shared server key, every client's peer), strongSwan, OpenVPN-TCP
 agent    tunnelwatch agent: WireGuard handshakes to each node, telemetry.load inside each
          node's namespace (ip netns exec) every second
 control  tunnelwatch mesh (weights on) --nftlb publisher--> nftlb REST API
                                        --haproxy publisher--> HAProxy backend "vpn" (OpenVPN-TCP)
          agent-check responder <----------------- HAProxy backend "pulled" (same nodes)
```

Built by :meth:`UdpPool.build`; used by the weights lab tests, the drain test and the weights
benchmark. Everything runs in lab namespaces and stops with the lab.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from probes.checks.load_telemetry import parse_net_dev
from probes.lab.haproxy import Backend, HAProxyServer
from probes.lab.keys import WgKeyPair, wg_keypair
from probes.lab.netns import LabError
from probes.lab.nftlb import FarmBackend, NftlbServer
from probes.lab.openvpn import OpenVPNServer
from probes.lab.stack import get
from probes.lab.strongswan import StrongSwanServer
from probes.lab.topology import Host, Lab, wait_for
from probes.lab.wgclients import INNER_SERVER, WgClient
from probes.lab.wireguard import WgPeer, WireGuardServer
from probes.model import signing

VIP = "10.77.250.1"
WG_PORT = 51820
MESH_PORT = 9480
AGENT_CHECK_PORT = 9481
AGENT_PORT = 9470
SINK = f"{INNER_SERVER}:9"  # where the loadgen's datagrams go, through a tunnel
# the pool mesh's policies (one agent votes; a short slow start for tests), as config sections
DECISION: dict[str, Any] = {"rise": 2, "fall": 3, "quorum": {"min_voters": 1}}
WEIGHTS: dict[str, Any] = {"enabled": True, "slow_start_seconds": 10.0,
                           "load_stale_after_seconds": 5.0}


@dataclass(frozen=True)
class PoolOptions:
    nodes: int = 3
    ikev2: bool = False  # strongSwan on every node behind the farm "ike"
    openvpn_tcp: bool = True  # OpenVPN-TCP on every node behind HAProxy (push and pull)
    weights: dict[str, Any] = field(default_factory=dict)  # overrides of the mesh's weights:
    effective_window_seconds: float = 10.0
    session_unit_bytes_per_second: float = 125_000.0  # one effective session's worth
    max_clients: int = 40  # every node gets a peer for each


@dataclass
class PoolNode:
    name: str
    host: Host
    wireguard: WireGuardServer
    agent_keys: WgKeyPair
    ikev2: StrongSwanServer | None = None
    openvpn: OpenVPNServer | None = None


@dataclass
class UdpPool:
    lab: Lab
    options: PoolOptions = field(default_factory=PoolOptions)
    nodes: dict[str, PoolNode] = field(default_factory=dict)
    clients: dict[int, WgClient] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)  # client address -> bytes/s

    def build(self) -> UdpPool:
        o = self.options
        self.dir = self.lab.dir / "pool"
        self.dir.mkdir(exist_ok=True)
        self.control = self.lab.add_host("control")
        self.agent = self.lab.add_host("agent")
        self.client = self.lab.add_host("client")
        self.server_keys = wg_keypair()
        self.client_keys = [wg_keypair() for _ in range(o.max_clients)]
        for i in range(o.nodes):
            self._add_node(f"node{i + 1}")
        self.nftlb = NftlbServer(self.lab, self.control)
        self.nftlb.start()
        self.nftlb.add_farm("wg", VIP, str(WG_PORT),
                            [FarmBackend(n.name, n.host.address) for n in self.nodes.values()])
        if o.ikev2:
            self.nftlb.add_farm("ike", VIP, "500,4500",
                                [FarmBackend(n.name, n.host.address) for n in self.nodes.values()],
                                persistence="srcip")
        self.nftlb.count_new_flows(VIP, [n.host.address for n in self.nodes.values()])
        if o.openvpn_tcp:
            self._start_haproxy()
        self._start_mesh()
        self._start_agent()
        self.rates_file = self.dir / "rates.json"
        self._write_rates()
        self.loadgen = self.client.popen([sys.executable, "-m", "probes.lab.loadgen",
                                          str(self.rates_file)], name="loadgen")
        return self

    # ------------------------------------------------------------------ building

    def _add_node(self, name: str) -> None:
        host = self.lab.add_host(name)
        agent_keys = wg_keypair()
        peers = [WgPeer(agent_keys.public, "10.201.0.10/32")]
        peers += [WgPeer(k.public, f"10.201.0.{100 + i}/32")
                  for i, k in enumerate(self.client_keys)]
        wg = WireGuardServer(self.lab, host, port=WG_PORT, tunnel_address=f"{INNER_SERVER}/24",
                             keys=self.server_keys)
        wg.start(peers)
        node = PoolNode(name, host, wg, agent_keys)
        if self.options.ikev2:
            node.ikev2 = self.lab.start_strongswan(host, psk="pool-test-psk-0123456789",
                                                   local_id="pool.lab", remote_id="%any")
        if self.options.openvpn_tcp:
            node.openvpn = self.lab.start_openvpn(host, proto="tcp", port=1194)
        self.nodes[name] = node

    def _start_haproxy(self) -> None:
        agent = (f"agent-check agent-addr {self.control.address} agent-port {AGENT_CHECK_PORT} "
                 "agent-inter 500ms agent-send ")
        pushed = [Backend(n.name, n.host.address, 1194, "weight 20") for n in self.nodes.values()]
        pulled = [Backend(n.name, n.host.address, 1194, f'weight 20 {agent}"{n.name}\\n"')
                  for n in self.nodes.values()]
        self.haproxy = PooledHAProxy(self.lab, self.control, pushed, pulled)
        self.haproxy.start()

    @property
    def mesh_url(self) -> str:
        return f"http://{self.control.address}:{MESH_PORT}"

    def restart_mesh(self, *, weights: bool) -> None:
        """Restart the mesh with weights on or off (off: every UP node at weight 100 — the
        equal-weights run of the benchmark, on the same pool)."""
        self.lab.stop_process(self.mesh_proc)
        self._start_mesh(weights_on=weights)

    def _start_mesh(self, *, weights_on: bool = True) -> None:
        for name in ("agent-mesh.key", "operator.token"):
            if not (self.dir / name).exists():
                signing.write_key_file(self.dir / name, signing.generate_key() + "\n")
        weights = {**WEIGHTS, **self.options.weights, "enabled": weights_on}
        publishers: list[dict[str, Any]] = [{
            "type": "nftlb", "name": "nftlb", "url": self.nftlb.url,
            "key_file": str(self.nftlb.key_file),
            "farms": ["wg", "ike"] if self.options.ikev2 else ["wg"],
            "retry": {"initial_backoff": 0.1, "max_backoff": 2.0, "poll_interval": 0.05}}]
        if self.options.openvpn_tcp:
            publishers.append({
                "type": "haproxy", "name": "haproxy", "socket": str(self.haproxy.runtime_socket),
                "backend": "vpn",
                "retry": {"initial_backoff": 0.1, "max_backoff": 2.0, "poll_interval": 0.05}})
        config = {
            "listen": f"{self.control.address}:{MESH_PORT}",
            "database": "mesh.db",
            "operator_token_file": "operator.token",
            "agents": [{"name": "agent", "key_file": "agent-mesh.key"}],
            "nodes": [{"id": n, "pool": "udp", "pop": "lab1", "region": "lab"}
                      for n in self.nodes],
            "tick_seconds": 0.5,
            "decision": DECISION,
            "weights": weights,
            "publishers": publishers,
            "agent_check": {"listen": f"{self.control.address}:{AGENT_CHECK_PORT}"},
        }
        path = self.dir / "mesh.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.mesh_config = path
        self.mesh_proc = self.control.popen(
            [sys.executable, "-m", "probes.cli", "mesh", "--config", str(path)], name="mesh")
        self._wait_http(self.control, self.mesh_url + "/healthz", self.mesh_proc, "mesh")

    def _start_agent(self) -> None:
        targets = []
        for node in self.nodes.values():
            key_file = node.agent_keys.write_private(self.dir / f"agent-{node.name}-wg.key")
            pid_file = self.dir / f"{node.name}-wg.pid"
            assert node.wireguard.proc is not None
            pid_file.write_text(f"{node.wireguard.proc.pid}\n")
            targets.append({
                "id": node.name, "pool": "udp", "pop": "lab1", "region": "lab",
                "address": node.host.address,
                "wireguard": {"port": WG_PORT, "server_public_key": self.server_keys.public,
                              "private_key_file": str(key_file)},
                "telemetry": {"wireguard_interface": node.wireguard.interface,
                              "load": {"netns": node.host.ns, "interfaces": ["eth0"],
                                       "daemon_pid_file": str(pid_file), "daemon_cores": 2.0,
                                       "cpu": "daemon", "effective_window_seconds":
                                           self.options.effective_window_seconds,
                                       "session_unit_bytes_per_second":
                                           self.options.session_unit_bytes_per_second}},
                "checks": ["wireguard.handshake", "telemetry.load"],
            })
        fast = {"interval": 1.0, "timeout": 0.8, "fast_interval": 0.5, "rise": 2, "fall": 3}
        config = {
            "agent": {"vantage": "agent", "region": "lab", "state_dir": str(self.dir / "state"),
                      "listen": f"{self.agent.address}:{AGENT_PORT}"},
            "targets": targets,
            "tiers": {"l4": fast, "functional": fast,
                      "load": {"interval": 1.0, "timeout": 0.9}},
            "mesh": {"endpoints": [self.mesh_url], "key_id": "agent",
                     "key_file": str(self.dir / "agent-mesh.key"), "flush_interval": 0.1},
        }
        path = self.dir / "agent.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.agent_proc = self.agent.popen([sys.executable, "-m", "probes.cli", "agent",
                                            "--config", str(path), "--log-level", "warning"],
                                           name="agent")
        self._wait_http(self.agent, f"http://{self.agent.address}:{AGENT_PORT}/healthz",
                        self.agent_proc, "agent")

    def _wait_http(self, host: Host, url: str, proc: Any, what: str, timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"{what} exited with {proc.returncode} (logs in {self.lab.dir})")
            try:
                get(host, url, timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise LabError(f"{what} did not answer {url} within {timeout:g} s")

    # ------------------------------------------------------------------ clients and load

    def add_client(self, index: int, *, via: str | None = None) -> WgClient:
        """Start client ``index`` (0-based): through the balancer, or straight to node ``via``."""
        endpoint = f"{self.nodes[via].host.address if via else VIP}:{WG_PORT}"
        client = WgClient(self.lab, self.client, index, self.server_keys.public, endpoint,
                          keys=self.client_keys[index])
        client.start()
        self.clients[index] = client
        return client

    def remove_client(self, index: int) -> None:
        client = self.clients.pop(index)
        self.set_rate(index, 0.0)
        client.stop()

    def set_rate(self, index: int, bytes_per_second: float) -> None:
        address = f"10.201.0.{100 + index}"
        if bytes_per_second > 0:
            self.rates[address] = bytes_per_second
        else:
            self.rates.pop(address, None)
        self._write_rates()

    def _write_rates(self) -> None:
        spec = {"flows": [{"source": a, "target": SINK, "bytes_per_second": r}
                          for a, r in sorted(self.rates.items())]}
        tmp = self.rates_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(spec))
        tmp.replace(self.rates_file)

    # ------------------------------------------------------------------ looking at it

    def node_of(self, client: WgClient) -> str | None:
        """The node serving a client: the one whose WireGuard saw its handshake last."""
        placed = self.placements().get(client.keys.public)
        return placed[1] if placed else None

    def placements(self) -> dict[str, tuple[int, str]]:
        """Client public key -> (its latest handshake, epoch seconds; the node that saw it), one
        ``wg show dump`` per node: where the balancer put each client's flow."""
        out: dict[str, tuple[int, str]] = {}
        for node in self.nodes.values():
            for line in node.wireguard.dump().splitlines()[1:]:
                cols = line.split("\t")
                stamp = int(cols[4])
                if stamp and (cols[0] not in out or stamp > out[cols[0]][0]):
                    out[cols[0]] = (stamp, node.name)
        return out

    def node_bytes(self) -> dict[str, int]:
        """Bytes each node's network interface moved so far (both ways): its traffic load."""
        out = {}
        for name, node in self.nodes.items():
            text = node.host.run(["cat", "/proc/net/dev"]).stdout
            counters = parse_net_dev(text)["eth0"]
            out[name] = counters.rx_bytes + counters.tx_bytes
        return out

    def mesh_nodes(self) -> dict[str, dict[str, Any]]:
        got = json.loads(get(self.control, self.mesh_url + "/v1/nodes"))
        return {n["node"]: n for n in got["nodes"]}

    def nftlb_weights(self) -> dict[str, tuple[str, int]]:
        return {name: (b["state"], int(b["weight"]))
                for name, b in self.nftlb.backends("wg").items()}

    def wait_all_up(self, timeout: float = 60.0) -> None:
        def up() -> bool:
            try:
                nodes = self.mesh_nodes()
            except (OSError, ValueError):
                return False
            return all(n["state"] == "UP" and n.get("weight") == 100 for n in nodes.values())

        wait_for(up, timeout, "every pool node UP at weight 100", interval=0.2)


class PooledHAProxy(HAProxyServer):
    """HAProxy for the pool's OpenVPN-TCP: backend ``vpn`` takes the mesh's runtime API pushes,
    backend ``pulled`` asks the mesh's agent-check responder itself."""

    def __init__(self, lab: Lab, host: Host, pushed: list[Backend],
                 pulled: list[Backend]) -> None:
        super().__init__(lab, host, servers=pushed)
        self.pulled = pulled

    def render(self) -> str:
        return super().render() + "backend pulled\n" + "".join(
            f"    server {s.name} {s.address}:{s.port} {s.check}\n" for s in self.pulled)
