"""The path-evidence lab: three vantages in three provider ASes reach one VPN node's PoP through
transit ASes over real eBGP (docs/paths.md, docs/lab.md).

```
 va ── pa(64501) ─┐                   ┌─ t2a(64520) ─┐
                  ├─ t1(64510) ═ECMP═╡              ├─ pop(64500) ── node1 (WireGuard)
 vb ── pb(64502) ─┘                   └─ t2b(64520) ─┘      │
        └──────── t3(64530) ── t4(64540) ── t5(64550) ───────┤
 vc ── pc(64503) ─────────────────────────── t5 ────────────┘
```

* ``va`` and ``vb`` reach the node through t1 and the ECMP pair t2a/t2b (t1 hashes flows on
  their ports); ``vb`` has a longer way (t3, t4, t5) when its session to t1 goes down; ``vc``
  goes through t5 only;
* the control namespace, on a management network of its own, runs the mesh (with the ASN
  table ``pop`` dumped from its BGP RIB as MRT) and the reference webhook receiver; each
  vantage runs a real agent (WireGuard handshakes and an ICMP path-MTU check against the node,
  path tracing on);
* faults: :meth:`PathLab.black_hole_t1`, :meth:`PathLab.longer_route_for_vb`,
  :meth:`PathLab.drop_vpn_port_on_t2b`, :meth:`PathLab.mtu_drop_at_t1`, each undone by
  :meth:`PathLab.heal`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from probes.agent.tracer import TraceTarget
from probes.config import TracingConfig
from probes.lab import netns
from probes.lab.asnet import AsNet, StubHost
from probes.lab.keys import wg_keypair
from probes.lab.netns import LabError
from probes.lab.topology import Lab, wait_for
from probes.lab.wireguard import WgPeer, WireGuardServer
from probes.model import TraceProtocol, signing
from probes.paths.asn import load_table

MESH_PORT = 9480
RECEIVER_PORT = 9490
POP_ASN = 64500
VANTAGES = {"va": "pa", "vb": "pb", "vc": "pc"}
AS_NAMES = {64500: "pop", 64501: "provider-a", 64502: "provider-b", 64503: "provider-c",
            64510: "transit-1", 64520: "transit-2", 64530: "transit-3", 64540: "transit-4",
            64550: "transit-5"}
ROUTERS = (("pa", 64501, False), ("pb", 64502, False), ("pc", 64503, False),
           ("t1", 64510, True), ("t2a", 64520, False), ("t2b", 64520, False),
           ("t3", 64530, False), ("t4", 64540, False), ("t5", 64550, False),
           ("pop", POP_ASN, False))
# (a, b, owner): each link is numbered from the AS nearer the node
LINKS = (("pa", "t1", "t1"), ("pb", "t1", "t1"), ("t1", "t2a", "t2a"), ("t1", "t2b", "t2b"),
         ("t2a", "pop", "pop"), ("t2b", "pop", "pop"), ("pb", "t3", "t3"), ("t3", "t4", "t4"),
         ("t4", "t5", "t5"), ("pc", "t5", "t5"), ("t5", "pop", "pop"))
REQUIRED_MTU = 1400
LOWERED_MTU = 1280


@dataclass(frozen=True)
class PathLabOptions:
    interval: float = 1.0  # functional tier (WireGuard handshakes)
    mtu_interval: float = 2.0  # session tier (path MTU)
    baseline_interval: float = 6.0  # agents' baseline traces
    failing_interval: float = 4.0
    probe_timeout: float = 0.25


@dataclass
class PathLab:
    lab: Lab
    options: PathLabOptions = field(default_factory=PathLabOptions)
    net: AsNet = field(init=False)
    node: StubHost = field(init=False)
    wireguard: WireGuardServer = field(init=False)
    agents: dict[str, Any] = field(default_factory=dict)
    mesh_proc: Any = None
    receiver_proc: Any = None

    @property
    def dir(self) -> Path:
        return self.lab.dir / "pathlab"

    @property
    def control(self) -> StubHost:
        assert self.net.control is not None
        return self.net.control

    @property
    def node_prefix(self) -> str:
        return f"{self.node.address.rsplit('.', 1)[0]}.0/24"

    def build(self) -> PathLab:
        self.dir.mkdir(exist_ok=True)
        self.net = AsNet(self.lab, mrt_router="pop")
        for name, asn, ecmp in ROUTERS:
            self.net.router(name, asn, ecmp=ecmp)
        for a, b, owner in LINKS:
            self.net.connect(a, b, owner=owner)
        vantages = {v: self.net.host(v, router, mgmt=True) for v, router in VANTAGES.items()}
        self.node = self.net.host("node1", "pop")
        self.net.start()
        keys = {v: wg_keypair() for v in vantages}
        self.wireguard = self.lab.start_wireguard(
            self.node, peers=[WgPeer(k.public, f"10.201.0.{10 + i}/32")
                              for i, k in enumerate(keys.values())])
        self._wait_for_table()
        self._pin_ecmp_hash(vantages)
        self._start_receiver()
        self._start_mesh()
        for name, host in vantages.items():
            key_file = keys[name].write_private(self.dir / f"{name}-wg.key")
            self._start_agent(name, host, key_file)
        return self

    # ------------------------------------------------------------------ processes

    def _wait_for_table(self) -> None:
        """pop dumps its RIB every second: wait for a dump that maps every announced prefix."""
        wanted = self.net.prefixes()

        def complete() -> bool:
            if not self.net.mrt_file.exists():
                return False
            table = load_table(self.net.mrt_file, local_asn=POP_ASN)
            return all(table.lookup(p.split("/")[0]).asn is not None for p in wanted)

        wait_for(complete, 60, "an MRT dump with every prefix", interval=0.2)

    def _pin_ecmp_hash(self, vantages: dict[str, StubHost]) -> None:
        """Key t1's flow hash with a fixed seed under which the trace flows of each vantage
        behind it take both branches of the pair (a random seed sends all of one vantage's
        four flows down one branch one build in eight: no branch to name). Kernels without
        ``fib_multipath_hash_seed`` (before 6.11) keep their random one."""
        t1 = self.net.routers["t1"]
        sports = [TraceTarget("node1", "", TraceProtocol.UDP, 0).sport + i
                  for i in range(TracingConfig().flows)]
        behind = {v: host for v, host in vantages.items() if VANTAGES[v] in ("pa", "pb")}

        def branch(vantage: str, sport: int) -> str:
            iface = next(i.name for i in t1.interfaces if i.peer_router == VANTAGES[vantage])
            out = netns.run(netns.exec_argv(t1.ns, [
                "ip", "-o", "route", "get", self.node.address, "from", behind[vantage].address,
                "iif", iface, "ipproto", "udp", "sport", str(sport), "dport",
                str(self.wireguard.port)])).stdout
            return out.split(" dev ", 1)[1].split()[0]

        for seed in range(1, 256):
            if netns.run(netns.exec_argv(t1.ns, [
                    "sysctl", "-qw", f"net.ipv4.fib_multipath_hash_seed={seed}"]),
                    check=False).returncode != 0:
                return
            if all(len({branch(v, sport) for sport in sports}) == 2 for v in behind):
                return
        raise LabError("no hash seed splits every vantage's trace flows across the ECMP pair")

    def _start_receiver(self) -> None:
        key = self.dir / "webhook.key"
        signing.write_key_file(key, signing.generate_key() + "\n")
        config = {"listen": f"127.0.0.1:{RECEIVER_PORT}",
                  "keys": [{"key_id": "mesh", "key_file": str(key)}],
                  "state_file": str(self.dir / "receiver-state.json")}
        path = self.dir / "receiver.yaml"
        path.write_text(yaml.safe_dump(config))
        self.receiver_proc = self.control.popen(
            [sys.executable, "-m", "probes.cli", "receiver", "--config", str(path)],
            name="receiver")
        self._wait_http(f"http://127.0.0.1:{RECEIVER_PORT}/healthz", self.receiver_proc,
                        "receiver")

    def _start_mesh(self) -> None:
        names = self.dir / "asnames.txt"
        names.write_text("".join(f"{asn} {name}\n" for asn, name in AS_NAMES.items()))
        agents = []
        for name in VANTAGES:
            signing.write_key_file(self.dir / f"{name}-mesh.key", signing.generate_key() + "\n")
            agents.append({"name": name, "key_file": f"{name}-mesh.key"})
        config = {
            "listen": f"0.0.0.0:{MESH_PORT}",
            "database": "mesh.db",
            "agents": agents,
            "nodes": [{"id": "node1", "pool": "lab", "pop": "pop1", "region": "lab"}],
            "tick_seconds": 0.5,
            # fall 3 (the default): an agent traces at a check's first failure and the trace
            # is in before the third failure makes the verdict, whose evidence it becomes.
            # Damping on, as shipped, on the lab's time scale: an ECMP branch losing the VPN
            # port fails each handshake whose (random) source port hashes onto it, so a
            # vantage's check flaps; two flaps within a half-life hold it down, which is how
            # that fault becomes a steady DOWN verdict (and its evidence reaches the webhook);
            # a single fault's one flap is never held, and a hold ends within max_hold
            "decision": {"rise": 2, "fall": 3, "pool_guard": {"max_down_share": 1.0},
                         "damping": {"enabled": True, "penalty": 1000, "half_life_seconds": 30,
                                     "suppress": 1500, "reuse": 1000,
                                     "max_hold_seconds": 20}},
            "paths": {"asn_table": str(self.net.mrt_file), "asn_names": str(names),
                      "local_asn": POP_ASN},
            "publishers": [{
                "type": "webhook", "name": "hook",
                "url": f"http://127.0.0.1:{RECEIVER_PORT}/v1/verdicts", "key_id": "mesh",
                "key_file": str(self.dir / "webhook.key"),
                "retry": {"initial_backoff": 0.1, "max_backoff": 1.0, "poll_interval": 0.05}}],
        }
        path = self.dir / "mesh.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.mesh_proc = self.control.popen(
            [sys.executable, "-m", "probes.cli", "mesh", "--config", str(path)], name="mesh")
        self._wait_http(f"{self.mesh_url}/healthz", self.mesh_proc, "mesh")

    def _start_agent(self, name: str, host: StubHost, wg_key: Path) -> None:
        o = self.options
        functional = {"interval": o.interval, "timeout": 0.8, "fast_interval": 0.25,
                      "rise": 2, "fall": 2}
        config = {
            "agent": {"vantage": name, "state_dir": str(self.dir / f"{name}-state"),
                      "listen": "127.0.0.1:9470", "max_start_lag": 0.5},
            "mesh": {"endpoints": [f"http://{host.mgmt}:{MESH_PORT}"], "key_id": name,
                     "key_file": str(self.dir / f"{name}-mesh.key"), "flush_interval": 0.1},
            "tiers": {"functional": functional,
                      "session": {**functional, "interval": o.mtu_interval, "timeout": 1.5,
                                  "fast_interval": 0.5}},
            "paths": {"baseline_interval": o.baseline_interval,
                      "failing_interval": o.failing_interval, "min_interval": 1.0,
                      "max_per_minute": 600, "probe_timeout": o.probe_timeout,
                      "gap_limit": 2, "packets_per_second": 2000},
            "targets": [{
                "id": "node1", "pool": "lab", "pop": "pop1", "region": "lab",
                "address": self.node.address,
                "wireguard": {"port": self.wireguard.port,
                              "server_public_key": self.wireguard.public_key,
                              "private_key_file": str(wg_key)},
                "mtu": {"required_mtu": REQUIRED_MTU, "max_size": 1500},
                "checks": ["wireguard.handshake", "mtu.icmp"],
            }],
        }
        path = self.dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        proc = host.popen([sys.executable, "-m", "probes.cli", "agent", "--config", str(path),
                           "--log-level", "warning"], name="agent")
        self.agents[name] = proc
        wait_for(lambda: proc.poll() is not None or self._agent_up(host), 60, f"agent {name}")
        if proc.poll() is not None:
            raise LabError(f"agent {name} exited with {proc.returncode} (logs in {self.lab.dir})")

    def _agent_up(self, host: StubHost) -> bool:
        with contextlib.suppress(OSError):
            self._get(host, "http://127.0.0.1:9470/healthz")
            return True
        return False

    def _wait_http(self, url: str, proc: Any, what: str, timeout: float = 30) -> None:
        def up() -> bool:
            if proc.poll() is not None:
                raise LabError(f"{what} exited with {proc.returncode} (logs in {self.lab.dir})")
            with contextlib.suppress(OSError):
                self._get(self.control, url)
                return True
            return False

        wait_for(up, timeout, what, interval=0.1)

    @staticmethod
    def _get(host: StubHost, url: str) -> bytes:
        with host.entered(), urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310
            body: bytes = resp.read()
            return body

    # ------------------------------------------------------------------ looking at it

    @property
    def mesh_url(self) -> str:
        return f"http://127.0.0.1:{MESH_PORT}"

    def api(self, path: str) -> Any:
        return json.loads(self._get(self.control, self.mesh_url + path))

    def node_view(self) -> dict[str, Any]:
        view: dict[str, Any] = self.api("/v1/nodes/node1")
        return view

    def metrics(self) -> str:
        return self._get(self.control, self.mesh_url + "/metrics").decode()

    def received(self) -> dict[str, Any]:
        """The latest verdict per node the webhook receiver applied (with its reasons)."""
        path = self.dir / "receiver-state.json"
        if not path.exists():
            return {}
        got: dict[str, Any] = json.loads(path.read_text())
        return got

    def wait_for(self, predicate: Any, timeout: float, what: str) -> Any:
        """Poll ``predicate`` (returning something truthy when done) through API hiccups; a
        timeout says what the mesh's path view was last."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                last = predicate()
                if last:
                    return last
            time.sleep(0.2)
        with contextlib.suppress(OSError, ValueError):
            last = json.dumps(self.node_view().get("paths"))[:3000]
        raise LabError(f"timed out after {timeout:g} s waiting for {what} "
                       f"(paths: {last}; logs in {self.lab.dir})")

    # ------------------------------------------------------------------ faults

    def black_hole_t1(self) -> None:
        """t1 drops what it would forward to the node (it still answers expiring probes)."""
        self.net.black_hole("t1", self.node_prefix)

    def drop_vpn_port_on_t2b(self) -> None:
        """One branch of the ECMP pair loses the WireGuard port, nothing else."""
        self.net.drop_port("t2b", self.node_prefix, self.wireguard.port)

    def mtu_drop_at_t1(self) -> None:
        """t1's links into the ECMP pair get a smaller MTU (t1 answers frag-needed)."""
        for peer in ("t2a", "t2b"):
            self.net.set_link_mtu("t1", peer, LOWERED_MTU)

    def longer_route_for_vb(self) -> None:
        """vb's provider loses its session to t1: its routes move to t3-t4-t5 (longer)."""
        self.net.disable("pb", "t1")

    def heal(self) -> None:
        for router in ("t1", "t2b"):
            self.net.clear_faults(router)
        for peer in ("t2a", "t2b"):
            self.net.set_link_mtu("t1", peer, 1500)
        if "t1" in self.net.routers["pb"].disabled:
            self.net.enable("pb", "t1")
