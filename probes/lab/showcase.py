"""What ``make demo`` shows, in two acts.

1. Real clients: a lab node serving every protocol, probed by each protocol's real client
   (wireguard-go, openvpn, strongSwan) and HAProxy's runtime API, printed as a table.
2. The story (:func:`story`): 3 VPN nodes, 3 agents in their own namespaces, one mesh (SQLite),
   HAProxy receiving verdicts, Prometheus scraping agents and mesh. A live table of nodes x
   vantages, then a script of faults (see docs/demo.md), then a summary with timings.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from probes.lab.fleet import Fleet, FleetAgent, FleetNode
from probes.lab.haproxy import Backend
from probes.lab.strongswan import StrongSwanServer, render_connection
from probes.lab.topology import Lab, wait_for
from probes.lab.wireguard import WgPeer, WireGuardServer


@dataclass
class Seen:
    what: str
    ok: bool
    took: float
    detail: str


def _timed(what: str, fn: Callable[[], str]) -> Seen:
    start = time.monotonic()
    try:
        detail = fn()
        ok = True
    except Exception as exc:  # the demo reports failures, it does not stop at the first
        detail, ok = f"{type(exc).__name__}: {exc}"[:200], False
    return Seen(what, ok, time.monotonic() - start, detail)


def wireguard_client(lab: Lab, node: FleetNode, agent: FleetAgent) -> str:
    keys = agent.wg_keys[node.name]
    client = WireGuardServer(lab, agent.host, port=51899,
                             tunnel_address=f"{agent.tunnel_address}/24", keys=keys)
    client.start([WgPeer(node.wireguard.public_key, "10.201.0.0/24")])
    agent.host.run(["wg", "set", client.interface, "peer", node.wireguard.public_key,
                    "endpoint", f"{node.host.address}:{node.wireguard.port}"])
    out = agent.host.run(["ping", "-n", "-q", "-c", "5", "-i", "0.05", "-W", "2",
                          node.wireguard.tunnel_address]).stdout
    client.stop()
    rtt = re.search(r"= [\d.]+/([\d.]+)/", out)
    loss = re.search(r"(\d+)% packet loss", out)
    return (f"wireguard-go client: 5 pings through the tunnel, "
            f"loss {loss.group(1) if loss else '?'}%, avg rtt {rtt.group(1) if rtt else '?'} ms")


def openvpn_client(lab: Lab, node: FleetNode, agent: FleetAgent) -> str:
    cert = agent.ovpn_certs[node.name]
    proc = agent.host.popen(node.openvpn.client_argv(cert=cert), name="demo-openvpn")
    log = lab.dir / f"{agent.host.name}-demo-openvpn.log"
    try:
        wait_for(lambda: "Initialization Sequence Completed" in log.read_text(), 60,
                 "openvpn client")
        push = re.search(r"ifconfig ([\d.]+) ([\d.]+)", log.read_text())
        cipher = re.search(r"Data Channel: cipher '([^']+)'", log.read_text())
    finally:
        lab.stop_process(proc)
    return (f"openvpn client ({node.openvpn.proto}, {node.openvpn.wrap}): PUSH_REPLY "
            f"ifconfig {push.group(1) if push else '?'}, data cipher "
            f"{cipher.group(1) if cipher else '?'}")


def ikev2_client(lab: Lab, node: FleetNode, agent: FleetAgent) -> str:
    conf = render_connection("demo", local_addrs=agent.host.address,
                             remote_addrs=node.host.address, local_id=agent.ike_id,
                             remote_id=node.ikev2.local_id, proposals=node.ikev2.proposals,
                             local_ts=f"{agent.tunnel_address}/32",
                             remote_ts=node.ikev2.local_ts, esp_proposals=["aes256gcm16"],
                             psk=node.ikev2.psk)
    initiator = StrongSwanServer(lab, agent.host, swanctl_conf=conf)
    initiator.start()
    try:
        out = initiator.swanctl(["--initiate", "--ike", "demo", "--timeout", "10"]).stdout
        est = re.search(r"IKE_SA demo\[\d+\] established between (\S+)\.\.\.(\S+)", out)
        sas = node.ikev2.list_sas()
        algo = re.search(r"^\s+(AES\S+)", sas, re.MULTILINE)
    finally:
        initiator.stop()
    return (f"strongSwan initiator: IKE SA established {est.group(1) if est else '?'} -> "
            f"{est.group(2) if est else '?'}, {algo.group(1) if algo else '?'}")


def haproxy_state(lab: Lab, fleet: Fleet) -> str:
    node = next(iter(fleet.nodes.values()))
    backends = [Backend(n.name, n.host.address, n.wireguard.port) for n in fleet.nodes.values()]
    hap = lab.start_haproxy(node.host, servers=backends)
    state = hap.command("show servers state vpn")
    rows = [line.split() for line in state.splitlines() if line[:1].isdigit() and " vpn " in line]
    return "HAProxy runtime API: " + ", ".join(f"{r[3]} op_state={r[5]} admin={r[6]}"
                                               for r in rows)


def real_clients(out: TextIO) -> bool:
    """Act 1: every protocol's real client against one lab node."""
    started = time.monotonic()
    print("tunnelwatch demo: building the lab (namespaces, router, real servers)...", file=out)
    with Lab("demo") as lab:
        fleet = Fleet.build(lab, ["node1"], ["agent1"])
        node, agent = fleet.nodes["node1"], fleet.agents["agent1"]
        print(f"  lab {lab.run_id}: node1 at {node.host.address} serves WireGuard "
              f":{node.wireguard.port}, OpenVPN udp:{node.openvpn.port} ({node.openvpn.wrap}), "
              f"IKEv2 :500; agent1 at {agent.host.address} "
              f"(built in {time.monotonic() - started:.2f} s)", file=out, flush=True)
        seen = [
            _timed("WireGuard", lambda: wireguard_client(lab, node, agent)),
            _timed("OpenVPN", lambda: openvpn_client(lab, node, agent)),
            _timed("IKEv2", lambda: ikev2_client(lab, node, agent)),
            _timed("HAProxy", lambda: haproxy_state(lab, fleet)),
        ]
        print("\nwhat each real client saw:", file=out)
        for s in seen:
            print(f"  {'OK  ' if s.ok else 'FAIL'} {s.what:<10} {s.took * 1000:8.1f} ms  "
                  f"{s.detail}", file=out)
    print(f"\nlab torn down; demo took {time.monotonic() - started:.1f} s", file=out)
    return all(s.ok for s in seen)


def run(out: TextIO, *, story_seconds: float = 0.0) -> bool:
    """Act 1, then (when ``story_seconds`` > 0) act 2 bounded by that many seconds."""
    ok = real_clients(out)
    if story_seconds > 0:
        from probes.lab.story import story  # noqa: PLC0415 - the big act has its own module

        ok = story(out, story_seconds) and ok
    return ok
