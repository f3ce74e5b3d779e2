"""Probe cost of the user-path checks: bytes on the wire and CPU per egress, DNS and TCP
transaction probe, beside a real WireGuard client doing the same work (slow, lab; run under the
bench lock).

One lab: a node running wireguard-go that forwards and masquerades to an "internet" host with
unbound and an HTTPS server. Per probe, both sides do one fresh handshake and then the same
exchange:

* tunnelwatch: ``wireguard.egress`` (3 ICMP echoes to the node's tunnel address and 3 to the
  target, interleaved), ``wireguard.dns`` (one A query) and ``wireguard.transaction`` (TCP on
  the agent's user-space stack, TLS 1.3 verified, ``HEAD /``, FIN), each a whole check run
  through :func:`probes.checks.base.execute` in this process;
* the peer: a wireguard-go client interface in the agent's namespace whose peer is removed and
  re-added before each probe (so the first packet makes a fresh handshake), then ``ping -c 3``
  to the node's tunnel address and to the target, the same DNS query sent through the kernel
  route over the interface, or ``curl --head`` over the kernel's TCP.

Bytes: the agent link's rx+tx bytes (everything on the wire, encapsulation included). CPU: every
process involved — this process (tunnelwatch's check, or the peer's DNS query and its driving),
its child processes (``wg``, ``ping``), the client's wireguard-go, and the node's wireguard-go
and unbound — per probe. Prints the figures side by side as ratios; asserts only that every
probe succeeded.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgspec
import pytest

from probes.agent.plan import PlannedCheck, plan_target
from probes.checks.base import execute
from probes.config import Target
from probes.lab import Host, Lab, WgPeer, wg_keypair, wg_psk
from probes.lab.egress import Resolver, enable_egress, start_https
from probes.lab.wireguard import WireGuardServer
from probes.protocols import dns
from tests.conftest import lab_unavailable

pytestmark = [pytest.mark.slow, pytest.mark.lab, pytest.mark.wireguard]

PROBES = 100
NAME = "probe.user.lab"
WWW = "www.user.lab"
TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _self_cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _link_bytes(host: Host) -> int:
    stats = json.loads(host.run(["ip", "-s", "-j", "link", "show", "eth0"]).stdout)[0]
    return int(stats["stats64"]["rx"]["bytes"]) + int(stats["stats64"]["tx"]["bytes"])


@dataclass
class World:
    lab: Lab
    agent: Host
    node: Host
    internet: Host
    server: WireGuardServer
    resolver: Resolver
    egress: PlannedCheck
    dns: PlannedCheck
    transaction: PlannedCheck
    client: WireGuardServer  # the peer: a wireguard-go client interface in the agent namespace
    https_pid: int
    ca_file: str


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    with Lab("upbench") as lab:
        node, agent, internet = (lab.add_host(n) for n in ("node", "agent", "internet"))
        resolver = Resolver(lab, internet, "user.lab", {NAME: internet.address})
        resolver.start()
        www = lab.pki().issue(WWW, server=True)
        https = start_https(internet, str(www.cert), str(www.key))
        ours, theirs, psk = wg_keypair(), wg_keypair(), wg_psk()
        server = lab.start_wireguard(node, peers=[WgPeer(ours.public, "10.201.0.2/32", psk),
                                                  WgPeer(theirs.public, "10.201.0.3/32")])
        enable_egress(node, ["10.201.0.0/24"])
        key, psk_file = lab.dir / "agent.key", lab.dir / "agent.psk"
        key.write_text(ours.private + "\n")
        psk_file.write_text(psk + "\n")
        target = msgspec.convert({
            "id": "n", "pool": "p", "pop": "lab", "region": "r", "address": node.address,
            "wireguard": {"port": server.port, "server_public_key": server.public_key,
                          "private_key_file": str(key), "preshared_key_file": str(psk_file),
                          "tunnel_address": "10.201.0.2/32", "canary": server.tunnel_address,
                          "dns_resolver": internet.address, "echo_interval": 0.02},
            "user_path": {"egress": {"targets": [{"name": "internet",
                                                  "address": internet.address}],
                                     "echo_interval": 0.02},
                          "dns": {"name": NAME, "expect": [internet.address]},
                          "transaction": {"address": internet.address, "server_name": WWW,
                                          "ca_file": str(lab.pki().ca_file),
                                          "expect_status": [200]}},
        }, Target)
        planned = {c.check: c for c in plan_target(target, lab.dir, lab.dir / "state")}
        client = WireGuardServer(lab, agent, port=51821, tunnel_address="10.201.0.3/32",
                                 keys=theirs)
        client.start()
        for dst in (server.tunnel_address, internet.address):
            agent.run(["ip", "route", "add", f"{dst}/32", "dev", client.interface])
        yield World(lab, agent, node, internet, server, resolver, planned["wireguard.egress"],
                    planned["wireguard.dns"], planned["wireguard.transaction"], client,
                    https.pid, str(lab.pki().ca_file))


def _peer_fresh(w: World) -> None:
    """Forget the client's session: the next packet makes a new handshake."""
    host, iface = w.agent, w.client.interface
    host.run(["wg", "set", iface, "peer", w.server.public_key, "remove"])
    host.run(["wg", "set", iface, "peer", w.server.public_key, "endpoint",
              f"{w.node.address}:{w.server.port}", "allowed-ips",
              f"{w.server.tunnel_address}/32,{w.internet.address}/32"])


def _peer_egress(w: World) -> bool:
    _peer_fresh(w)
    ok = True
    for dst in (w.server.tunnel_address, w.internet.address):
        done = w.agent.run(["ping", "-n", "-q", "-c", "3", "-i", "0.02", "-W", "2", dst],
                           check=False)
        ok = ok and done.returncode == 0
    return ok


def _peer_dns(w: World) -> bool:
    _peer_fresh(w)
    with w.agent.entered(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        s.sendto(dns.build_query(NAME, dns.RecordType.A, 7), (w.internet.address, 53))
        answer = dns.parse_response(s.recv(1500))
    return answer.addresses(dns.RecordType.A) == [w.internet.address]


def _peer_transaction(w: World) -> bool:
    _peer_fresh(w)
    done = w.agent.run(["curl", "-s", "-o", "/dev/null", "--head", "--max-time", "5",
                        "--cacert", w.ca_file, "--resolve", f"{WWW}:443:{w.internet.address}",
                        "-w", "%{http_code}", f"https://{WWW}/"], check=False)
    return done.returncode == 0 and done.stdout.strip() == "200"


def _ours(w: World, check: PlannedCheck) -> Callable[[], bool]:
    def run() -> bool:
        with w.agent.entered():
            return asyncio.run(execute(check.kind, check.params, 5.0)).ok
    return run


@dataclass
class Cost:
    bytes: float
    cpu_ms: float
    wall_ms: float


def _measure(w: World, probe: Callable[[], bool]) -> Cost:
    pids = [w.server.proc.pid, w.client.proc.pid,  # type: ignore[union-attr]
            w.resolver.proc.pid, w.https_pid]  # type: ignore[union-attr]
    probe()  # warm-up (imports, first routes)
    time.sleep(0.05)
    link, cpu = _link_bytes(w.agent), _self_cpu() + sum(_proc_cpu(p) for p in pids)
    walls = []
    for _ in range(PROBES):
        start = time.monotonic()
        assert probe()
        walls.append(time.monotonic() - start)
        time.sleep(0.025)  # wireguard-go drops initiations < 20 ms apart from one peer
    used = _self_cpu() + sum(_proc_cpu(p) for p in pids) - cpu
    return Cost((_link_bytes(w.agent) - link) / PROBES, used / PROBES * 1e3,
                statistics.median(walls) * 1e3)


def test_bytes_and_cpu_per_egress_dns_and_transaction_probe(world: World) -> None:
    rows = []
    for what, ours, peer in (("egress", _ours(world, world.egress), lambda: _peer_egress(world)),
                             ("dns", _ours(world, world.dns), lambda: _peer_dns(world)),
                             ("https", _ours(world, world.transaction),
                              lambda: _peer_transaction(world))):
        load_before = os.getloadavg()
        mine, theirs = _measure(world, ours), _measure(world, peer)
        rows.append((what, mine, theirs, load_before, os.getloadavg()))
    print(f"\nuser-path probe cost, {PROBES} probes each, one fresh handshake per probe")
    for what, mine, theirs, before, after in rows:
        print(f"{what:6} tunnelwatch: {mine.bytes:7.0f} B/probe  {mine.cpu_ms:6.2f} ms CPU/probe  "
              f"median wall {mine.wall_ms:6.1f} ms")
        print(f"{'':6} wireguard-go + ping/socket/curl: {theirs.bytes:7.0f} B/probe  "
              f"{theirs.cpu_ms:6.2f} ms CPU/probe  median wall {theirs.wall_ms:6.1f} ms")
        print(f"{'':6} ratio tunnelwatch/peer: bytes {mine.bytes / theirs.bytes:.2f}, "
              f"CPU {mine.cpu_ms / theirs.cpu_ms:.2f}; load average "
              f"{before[0]:.2f}/{before[1]:.2f}/{before[2]:.2f} -> "
              f"{after[0]:.2f}/{after[1]:.2f}/{after[2]:.2f}")
