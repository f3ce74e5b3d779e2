"""The whole tunnelwatch stack in the lab: VPN nodes, agents, one mesh, HAProxy, Prometheus.

```
 node1..N   WireGuard + OpenVPN + IKEv2 (real servers)        agent1..M  tunnelwatch agent
     ^                                                           |  (own namespace each)
     +-------------------- probes ------------------------------+
                                                                 | signed batches
 control    tunnelwatch mesh (SQLite) --haproxy publisher--> HAProxy (backend "vpn")
            Prometheus (scrapes agents and mesh)              backend "native": HAProxy's own
                                                                checks on the same nodes
```

Every process runs inside a lab namespace through ``host.popen`` (the lab stops it at teardown).
Agents reach the mesh at the control host's lab address; the test process reaches the runtime
socket through the file system and HTTP endpoints by entering the control namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from probes.lab.bgp import BirdPeer, GoBgpDaemon
from probes.lab.egress import enable_egress
from probes.lab.fleet import Fleet
from probes.lab.haproxy import Backend, HAProxyServer
from probes.lab.netns import LabError
from probes.lab.openvpn import OpenVPNServer
from probes.lab.topology import Host, Lab, wait_for
from probes.mesh.publish.runtime_api import ServerState, parse_servers_state
from probes.model import signing

MESH_PORT = 9480
RECEIVER_PORT = 9490
AGENT_PORT = 9470
PROMETHEUS_PORT = 9090
NATIVE_CHECK = "check inter 2s fall 3 rise 2"
WG_CLIENT_SUBNET = "10.201.0.0/24"  # the fleet's agents' WireGuard tunnel addresses


@dataclass(frozen=True)
class StackOptions:
    nodes: int = 3
    agents: int = 3
    interval: float = 2.0  # base interval of the L4 and functional tiers
    fast_interval: float = 0.5  # fastinter: re-probe on a change until rise/fall settle it
    timeout: float = 1.5
    native_checks: bool = False  # a second backend with HAProxy's own checks on the same nodes
    prometheus: bool = True
    mesh_fall: int = 3
    mesh_rise: int = 2
    # distinct failing checks of a node, from one vantage, that take it down at once (0: off)
    mesh_corroboration: int = 3
    # per node and agent: one real handshake per protocol plus ICMP; the session tier (TLS +
    # PUSH_REPLY, CHILD_SA, in-tunnel echoes) is heavier and this machine is shared
    # (ikev2.init would leave a half-open SA per probe: at a 2 s interval the check's own limiter
    # runs out of slots; auth completes and deletes the SA)
    checks: tuple[str, ...] = ("icmp", "wireguard.handshake", "openvpn.tls", "ikev2.auth")
    max_start_lag: float = 0.5  # a probe starting later than this is "overloaded", not run
    # anycast: each node is its own PoP with a gobgpd speaker in its namespace, all peering with
    # a BIRD "upstream"; the mesh drives announcements (docs/anycast.md)
    anycast: bool = False
    anycast_prefix: str = "192.0.2.0/24"
    anycast_up_after: float = 4.0
    # where the mesh keeps its database and the agents their state (e.g. on a filesystem a
    # chaos test fills up); default: in the lab's directory
    mesh_database: str = "mesh.db"
    agent_state_dirs: tuple[tuple[str, str], ...] = ()  # (agent, directory)
    # a webhook publisher to the reference receiver (tunnelwatch receiver) on the control host
    receiver: bool = False
    # the user's path (docs/probes/user-path.md): every node forwards and masquerades its
    # WireGuard clients; the agents' targets get an egress check to an "internet" host through
    # WireGuard (add "wireguard.egress" to ``checks``), the session tier at ``session_interval``
    user_path: bool = False
    session_interval: float = 30.0


class DualHAProxy(HAProxyServer):
    """HAProxy with our backend ``vpn`` (no checks: the mesh decides) and, optionally, a backend
    ``native`` whose servers are checked by HAProxy itself (the anchor of the benchmark)."""

    def __init__(self, lab: Lab, host: Host, servers: list[Backend],
                 native: list[Backend]) -> None:
        super().__init__(lab, host, servers=servers)
        self.native = native

    def render(self) -> str:
        text = super().render()
        if self.native:
            text += "backend native\n" + "".join(
                f"    server {s.name} {s.address}:{s.port} {s.check}\n" for s in self.native)
        return text

    def states(self) -> dict[tuple[str, str], ServerState]:
        return parse_servers_state(self.command("show servers state"))


@dataclass
class Stack:
    lab: Lab
    options: StackOptions = field(default_factory=StackOptions)
    fleet: Fleet = field(init=False)
    control: Host = field(init=False)
    haproxy: DualHAProxy = field(init=False)
    dir: Path = field(init=False)
    mesh_proc: Any = None
    agent_procs: dict[str, Any] = field(default_factory=dict)
    prometheus_proc: Any = None
    native_ovpn: dict[str, OpenVPNServer] = field(default_factory=dict)  # TCP twins, per node
    upstream: BirdPeer | None = None
    speakers: dict[str, GoBgpDaemon] = field(default_factory=dict)  # per PoP (= per node)
    receiver_proc: Any = None
    internet: Host | None = None  # user_path: the host beyond the nodes

    # ------------------------------------------------------------------ building

    def build(self) -> Stack:
        o = self.options
        self.dir = self.lab.dir / "stack"
        self.dir.mkdir(exist_ok=True)
        nodes = [f"node{i + 1}" for i in range(o.nodes)]
        agents = [f"agent{i + 1}" for i in range(o.agents)]
        self.fleet = Fleet.build(self.lab, nodes, agents)
        self.control = self.lab.add_host("control")
        native: list[Backend] = []
        if o.native_checks:
            # HAProxy cannot check UDP: its anchor checks an OpenVPN TCP twin on each node,
            # and the "kill OpenVPN" fault stops both
            for name, node in self.fleet.nodes.items():
                twin = self.lab.start_openvpn(node.host, proto="tcp", port=1194)
                self.native_ovpn[name] = twin
                native.append(Backend(name, node.host.address, 1194, NATIVE_CHECK))
        servers = [Backend(n.name, n.host.address, n.openvpn.port)
                   for n in self.fleet.nodes.values()]
        if o.user_path:
            self.internet = self.lab.add_host("internet")
            for node in self.fleet.nodes.values():
                enable_egress(node.host, [WG_CLIENT_SUBNET])
        self.haproxy = DualHAProxy(self.lab, self.control, servers, native)
        self.haproxy.start()
        if o.anycast:
            self._start_bgp()
        if o.receiver:
            self._start_receiver()
        self._start_mesh()
        for name in agents:
            self._start_agent(name)
        if o.prometheus:
            self._start_prometheus()
        return self

    @property
    def mesh_url(self) -> str:
        return f"http://{self.control.address}:{MESH_PORT}"

    def _start_mesh(self) -> None:
        o = self.options
        agents = []
        for name in self.fleet.agents:
            signing.write_key_file(self.dir / f"{name}-mesh.key", signing.generate_key() + "\n")
            agents.append({"name": name, "key_file": f"{name}-mesh.key"})
        config: dict[str, Any] = {
            "listen": f"{self.control.address}:{MESH_PORT}",
            "database": o.mesh_database,
            "agents": agents,
            "nodes": [{"id": n.name, "pool": n.pool, "pop": n.pop, "region": n.region}
                      for n in self.fleet.nodes.values()],
            "tick_seconds": 0.5,
            "decision": {"rise": o.mesh_rise, "fall": o.mesh_fall,
                         "corroboration": o.mesh_corroboration},
            **({"anycast": self._anycast_section()} if o.anycast else {}),
            "publishers": [{
                "type": "haproxy", "name": "haproxy", "socket": str(self.haproxy.runtime_socket),
                "backend": "vpn",
                "retry": {"initial_backoff": 0.1, "max_backoff": 2.0, "poll_interval": 0.05,
                          "reconcile_interval": 5.0}}],
        }
        if o.receiver:
            config["publishers"].append({
                "type": "webhook", "name": "receiver", "url": f"{self.receiver_url}/v1/verdicts",
                "key_id": "mesh", "key_file": "webhook.key",
                "retry": {"initial_backoff": 0.1, "max_backoff": 2.0, "poll_interval": 0.05}})
        path = self.dir / "mesh.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.mesh_proc = self.control.popen(
            [sys.executable, "-m", "probes.cli", "mesh", "--config", str(path)], name="mesh")
        self._wait_http(self.control, self.mesh_url + "/healthz", self.mesh_proc, "mesh")

    @property
    def receiver_url(self) -> str:
        return f"http://{self.control.address}:{RECEIVER_PORT}"

    def _start_receiver(self) -> None:
        """The reference receiver, verifying and recording (no HAProxy of its own)."""
        signing.write_key_file(self.dir / "webhook.key", signing.generate_key() + "\n")
        path = self.dir / "receiver.yaml"
        path.write_text(yaml.safe_dump({
            "listen": f"{self.control.address}:{RECEIVER_PORT}",
            "keys": [{"key_id": "mesh", "key_file": "webhook.key"}],
            "state_file": "receiver-state.json"}, sort_keys=False))
        self.receiver_proc = self.control.popen(
            [sys.executable, "-m", "probes.cli", "receiver", "--config", str(path)],
            name="receiver")
        self._wait_http(self.control, self.receiver_url + "/healthz", self.receiver_proc,
                        "receiver")

    def receiver_state(self) -> dict[str, Any]:
        """What the reference receiver applied last per node (``{node: {seq, state, ...}}``)."""
        got: dict[str, Any] = json.loads(get(self.control, self.receiver_url + "/v1/state"))
        return got

    def _start_bgp(self) -> None:
        self.upstream = BirdPeer(self.lab, self.lab.add_host("upstream"))
        for i, node in enumerate(self.fleet.nodes.values()):
            self.upstream.add_neighbor(node.pop, node.host.address, 65101 + i)
        self.upstream.start()
        for i, node in enumerate(self.fleet.nodes.values()):
            speaker = GoBgpDaemon(self.lab, node.host, asn=65101 + i, peer=self.upstream)
            speaker.start()
            self.speakers[node.pop] = speaker
        upstream = self.upstream
        wait_for(lambda: all(upstream.established(p) for p in self.speakers), 60,
                 "BGP sessions to the upstream")

    def _anycast_section(self) -> dict[str, Any]:
        o = self.options
        return {"pops": [{"pop": pop, "api_host": s.api_host, "api_port": s.api_port,
                          "asn": s.asn, "prefixes": [o.anycast_prefix]}
                         for pop, s in self.speakers.items()],
                "policy": {"up_after_seconds": o.anycast_up_after, "max_withdrawn": 1},
                "reconcile_interval_seconds": 5.0}

    def announcing_pops(self) -> dict[str, int | None]:
        """PoP -> MED of its path for the anycast prefix, as the upstream sees it."""
        assert self.upstream is not None
        return {r.neighbor: r.med for r in self.upstream.routes(self.options.anycast_prefix)}

    def _start_agent(self, name: str) -> None:
        o = self.options
        agent = self.fleet.agents[name]
        mesh = {"endpoints": [self.mesh_url], "key_id": name,
                "key_file": str(self.dir / f"{name}-mesh.key"), "flush_interval": 0.1}
        path = self.fleet.agent_config(name, self.dir, mesh=mesh)
        config = yaml.safe_load(path.read_text())
        tier = {"interval": o.interval, "timeout": o.timeout, "fast_interval": o.fast_interval,
                "rise": 2, "fall": 3}
        config["tiers"] = {"l4": tier, "functional": tier,
                           "session": {**tier, "interval": o.session_interval,
                                       "timeout": min(10.0, o.session_interval / 2),
                                       "fast_interval": 5.0}}
        config["agent"]["listen"] = f"{agent.host.address}:{AGENT_PORT}"
        config["agent"]["max_start_lag"] = o.max_start_lag
        state_dirs = dict(o.agent_state_dirs)
        if name in state_dirs:
            config["agent"]["state_dir"] = state_dirs[name]
        for target in config["targets"]:
            target["checks"] = list(o.checks)
            if self.internet is not None:
                target["user_path"] = {"via": ["wireguard"], "egress": {"targets": [
                    {"name": "internet", "address": self.internet.address}]}}
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        proc = agent.host.popen([sys.executable, "-m", "probes.cli", "agent", "--config",
                                 str(path), "--log-level", "warning"], name="agent")
        self.agent_procs[name] = proc
        self._wait_http(agent.host, f"http://{agent.host.address}:{AGENT_PORT}/healthz", proc,
                        name)

    def _start_prometheus(self) -> None:
        config = {
            "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
            "scrape_configs": [
                {"job_name": "tunnelwatch-agent",
                 "static_configs": [{"targets": [f"{a.host.address}:{AGENT_PORT}"
                                                 for a in self.fleet.agents.values()]}]},
                {"job_name": "tunnelwatch-mesh",
                 "static_configs": [{"targets": [f"{self.control.address}:{MESH_PORT}"]}]},
            ],
        }
        path = self.dir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.prometheus_proc = self.control.popen(
            ["prometheus", f"--config.file={path}", f"--storage.tsdb.path={self.dir / 'tsdb'}",
             f"--web.listen-address={self.control.address}:{PROMETHEUS_PORT}",
             "--log.level=warn"], name="prometheus")
        self._wait_http(self.control, f"http://{self.control.address}:{PROMETHEUS_PORT}/-/ready",
                        self.prometheus_proc, "prometheus")

    def _wait_http(self, host: Host, url: str, proc: Any, what: str, timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"{what} exited with {proc.returncode} (logs in {self.lab.dir})")
            with contextlib.suppress(OSError):
                get(host, url, timeout=1)
                return
            time.sleep(0.1)
        raise LabError(f"{what} did not answer {url} within {timeout:g} s")

    # ------------------------------------------------------------------ looking at it

    def nodes(self) -> list[dict[str, Any]]:
        """Every node's verdict, with each vantage's opinion (UP/DEGRADED/DOWN/STALE/IMPAIRED)."""
        got = json.loads(get(self.control, self.mesh_url + "/v1/verdicts?vantages=1"))
        return list(got["nodes"])

    def log(self, after: int = 0) -> list[dict[str, Any]]:
        """Verdict log entries after id ``after``: ``{"id": .., "verdict": {..}}``."""
        got = json.loads(get(self.control, f"{self.mesh_url}/v1/verdicts?after={after}"
                                           "&limit=100000"))
        return list(got["log"])

    def node_view(self, node: str) -> dict[str, Any]:
        got: dict[str, Any] = json.loads(get(self.control, f"{self.mesh_url}/v1/nodes/{node}"))
        return got

    def planned_checks(self) -> list[str]:
        """The checks the first agent reports for the first node (what the mesh has seen)."""
        node = next(iter(self.fleet.nodes))
        vantages = self.node_view(node).get("vantages", {})
        checks: set[str] = set()
        for view in vantages.values():
            checks.update(view.get("checks", {}))
        return sorted(checks)

    def prometheus_query(self, expr: str) -> list[dict[str, Any]]:
        from urllib.parse import quote  # noqa: PLC0415

        url = (f"http://{self.control.address}:{PROMETHEUS_PORT}/api/v1/query?query="
               + quote(expr))
        return list(json.loads(get(self.control, url))["data"]["result"])

    def wait_settled(self, timeout: float = 120.0) -> float:
        """Wait until every vantage sees every node UP, every verdict is UP and HAProxy has every
        node in rotation; return the time taken."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            with contextlib.suppress(OSError, ValueError, KeyError):
                view = self.nodes()
                nodes = {n["node"]: n["state"] for n in view}
                every_vantage_up = all(
                    n.get("vantages", {}).get(a) == "UP" for n in view for a in self.fleet.agents)
                rows = self.haproxy.states()
                if (len(nodes) == len(self.fleet.nodes) and set(nodes.values()) == {"UP"}
                        and every_vantage_up
                        and all(rows[("vpn", n)].in_rotation for n in nodes)):
                    return time.monotonic() - start
            time.sleep(0.25)
        raise LabError(f"the fleet did not settle UP within {timeout:g} s (logs in {self.lab.dir})")

    # ------------------------------------------------------------------ faults used by scenarios

    def kill_openvpn(self, node: str) -> None:
        self.fleet.nodes[node].openvpn.stop()
        if node in self.native_ovpn:
            self.native_ovpn[node].stop()

    def restore_openvpn(self, node: str) -> None:
        self.fleet.nodes[node].openvpn.start()
        if node in self.native_ovpn:
            self.native_ovpn[node].start()

    def kill_vpn(self, node: str) -> None:
        """The node's VPN daemons crash (OpenVPN, its TCP twin, strongSwan); the host stays up."""
        self.kill_openvpn(node)
        self.fleet.nodes[node].ikev2.stop()

    def restore_vpn(self, node: str) -> None:
        self.fleet.nodes[node].ikev2.start()
        self.restore_openvpn(node)

    # ------------------------------------------------------------------ agents

    def set_reprobe(self, enabled: bool) -> None:
        """Let the agents honour the mesh's re-probe requests (corroboration on demand), or not:
        their configs' ``mesh.reprobe``, applied by a reload (SIGHUP keeps every schedule)."""
        for name, proc in self.agent_procs.items():
            path = self.dir / f"{name}.yaml"
            config = yaml.safe_load(path.read_text())
            config["mesh"]["reprobe"] = enabled
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            os.kill(proc.pid, signal.SIGHUP)

    def agent_counter(self, name: str, label: str = "") -> float:
        """A counter summed over every agent's /metrics, every label combination
        (``tunnelwatch_scheduler_started_total``, say), or only the series with ``label``
        (``result="honoured"``, say)."""
        total = 0.0
        for agent in self.fleet.agents.values():
            text = get(agent.host, f"http://{agent.host.address}:{AGENT_PORT}/metrics").decode()
            total += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith(name) and line[len(name):len(name) + 1] in "{ "
                         and label in line)
        return total


def get(host: Host, url: str, timeout: float = 5.0) -> bytes:
    """HTTP GET from inside ``host``'s namespace (lab addresses are not routed from the host)."""
    with host.entered(), urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
        body: bytes = resp.read()
        return body


@contextlib.contextmanager
def running_stack(name: str = "e2e", options: StackOptions | None = None) -> Iterator[Stack]:
    with Lab(name) as lab:
        yield Stack(lab, options or StackOptions()).build()
