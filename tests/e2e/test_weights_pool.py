"""Least load on a real UDP pool (probes/lab/udp_pool.py): wireguard-go nodes behind a real
nftlb, a real agent reading each node's load, the mesh weighing them and publishing to nftlb
and HAProxy (runtime API and agent-check). A node made hot gets less new traffic; a stopped node
leaves nftlb and new flows avoid it; a drain lets its clients keep their tunnels while no new
flow lands there, ``tunnelwatch drain --wait`` returns once they left, and ``ready`` brings the
node back through slow start.

One pool for the module (building it takes seconds; the tests reset what they change).
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from probes.lab import netns
from probes.lab.strongswan import StrongSwanServer, render_connection
from probes.lab.topology import Lab, wait_for
from probes.lab.udp_pool import VIP, WG_PORT, PoolOptions, UdpPool
from probes.mesh.publish.runtime_api import parse_servers_state
from tests.conftest import lab_unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.publish, pytest.mark.lab]

SOURCE_PORTS = itertools.count(20_000)
HEAVY = 300_000  # bytes/s through one tunnel: ~2.4 effective sessions at 1 Mbit/s per session
LIGHT = 20_000


@pytest.fixture(scope="module")
def pool() -> Iterator[UdpPool]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    with Lab("weights") as lab:
        built = UdpPool(lab, PoolOptions(ikev2=True)).build()
        built.wait_all_up()
        yield built


def reset(pool: UdpPool) -> None:
    """No clients, every node UP at full weight (load lapses within the effective window)."""
    for index in list(pool.clients):
        pool.remove_client(index)
    wait_for(lambda: all(n.get("weight") == 100 and n["state"] == "UP"
                         for n in pool.mesh_nodes().values()), SETTLE_SECONDS,
             "every node back at weight 100", interval=0.25)


def new_udp_flows(pool: UdpPool, count: int) -> dict[str, int]:
    """``count`` new flows to the VIP (a socket, so a source port, each): per node, how many
    nftlb sent there (counted in the kernel after its DNAT)."""
    before = pool.nftlb.new_flows()
    with pool.client.entered():
        for _ in range(count):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                # a port never used before: a reused one is a 5-tuple conntrack still holds,
                # the old flow (with its old backend), not a new one
                s.bind(("0.0.0.0", next(SOURCE_PORTS)))
                s.sendto(b"not a handshake", (VIP, WG_PORT))
    wait_for(lambda: sum(pool.nftlb.new_flows().values()) - sum(before.values()) >= count, 30,
             "the flows to pass nftlb")
    after = pool.nftlb.new_flows()
    return {name: after[n.host.address] - before[n.host.address]
            for name, n in pool.nodes.items()}


def haproxy_weights(pool: UdpPool, backend: str) -> dict[str, int]:
    rows = parse_servers_state(pool.haproxy.command(f"show servers state {backend}"))
    return {server: row.user_weight for (_, server), row in rows.items()}


def haproxy_admin(pool: UdpPool, backend: str) -> dict[str, str]:
    rows = parse_servers_state(pool.haproxy.command(f"show servers state {backend}"))
    return {server: row.admin for (_, server), row in rows.items()}


def drain_argv(pool: UdpPool, node: str, *flags: str) -> list[str]:
    """``tunnelwatch drain`` run from the mesh's host (lab addresses are not routed from here)."""
    return netns.exec_argv(pool.control.ns, [
        sys.executable, "-m", "probes.cli", "drain", node, *flags,
        "--config", str(pool.mesh_config)])


# deadlines for conditions that do come true (they return as soon as they hold): generous, so a
# busy machine (CI, or six engineers on two cores) only makes a test slower, never red
SETTLE_SECONDS = 90.0
CLI_SECONDS = 120.0  # a `tunnelwatch` command from the mesh's host: a Python start under load


def settle(what: str, check: Callable[[], bool], timeout: float = SETTLE_SECONDS) -> float:
    started = time.monotonic()
    wait_for(check, timeout, what, interval=0.2)
    return time.monotonic() - started


def test_a_hot_node_gets_less_new_traffic_on_every_balancer(pool: UdpPool) -> None:
    reset(pool)
    for i in range(3):  # three heavy clients straight at node1, one light one through the VIP
        pool.add_client(i, via="node1")
        pool.set_rate(i, HEAVY)
    pool.add_client(3)
    pool.set_rate(3, LIGHT)
    # node1 carries ~3x the pool's mean effective sessions: the default steps cut it by 90 %
    settle("node1 cut to 10 % in nftlb", lambda: pool.nftlb_weights()["node1"] == ("up", 10))
    view = pool.mesh_nodes()["node1"]
    assert view["weight"] == 10
    assert view["weight_reasons"][0]["what"] == "effective_sessions-share"
    assert view["weight_reasons"][0]["value"] >= 2.0
    # the kernel draws node1 for 10 of every 210 new flows
    assert pool.nftlb.numgen("wg") == {"node1": 10, "node2": 100, "node3": 100}
    counts = new_udp_flows(pool, 150)
    share = counts["node1"] / sum(counts.values())
    assert share < 0.15, counts  # expected 0.048 (sd 0.017); equal weights would give 0.33
    # HAProxy follows too, pushed (runtime API) and pulled (agent-check): 10 % of 20
    settle("HAProxy weights", lambda: haproxy_weights(pool, "vpn")["node1"] == 2
           and haproxy_weights(pool, "pulled")["node1"] == 2)
    assert haproxy_weights(pool, "vpn")["node2"] == 20


def test_a_stopped_node_leaves_nftlb_and_comes_back_through_slow_start(pool: UdpPool) -> None:
    reset(pool)
    node = pool.nodes["node3"]
    node.wireguard.stop()
    settle("node3 down in nftlb", lambda: pool.nftlb_weights()["node3"][0] == "down")
    assert pool.mesh_nodes()["node3"]["state"] == "DOWN"
    counts = new_udp_flows(pool, 60)
    assert counts["node3"] == 0 and counts["node1"] + counts["node2"] == 60
    node.wireguard.start()
    assert node.wireguard.proc is not None
    (pool.dir / "node3-wg.pid").write_text(f"{node.wireguard.proc.pid}\n")
    settle("node3 back up", lambda: pool.nftlb_weights()["node3"][0] == "up")
    first = pool.nftlb_weights()["node3"][1]
    assert first <= 40, first  # slow start: 10 % rising over 10 s (lab setting)
    settle("node3 at full weight", lambda: pool.nftlb_weights()["node3"] == ("up", 100))


def test_drain_keeps_tunnels_takes_no_new_flows_and_waits_for_clients_to_leave(
        pool: UdpPool) -> None:
    reset(pool)
    for i in range(2):  # two clients that live on node2
        pool.add_client(i, via="node2")
        pool.set_rate(i, LIGHT)
    settle("node2's clients counted", lambda: (pool.mesh_nodes()["node2"]
                                               .get("effective_sessions") or 0) >= 2)
    # while its clients are there, --wait gives up at its timeout and says what is left
    early = subprocess.run(drain_argv(pool, "node2", "--wait", "--timeout", "4"),
                           capture_output=True, text=True, timeout=CLI_SECONDS, check=False)
    assert early.returncode == 1, early.stdout + early.stderr
    assert "node2: not drained after 4 s" in early.stdout, early.stdout
    assert "effective sessions (done at <= 0)" in early.stdout, early.stdout
    assert pool.mesh_nodes()["node2"]["state"] == "DRAINING"  # the timeout ends no drain
    # --wait's own deadline runs from here through every step below until the clients leave:
    # generous, as it returns as soon as the node is drained
    drain = subprocess.Popen(drain_argv(pool, "node2", "--wait", "--timeout", "600"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        settle("node2 off in nftlb", lambda: pool.nftlb_weights()["node2"][0] == "off")
        # every balancer stops choosing it: HAProxy pushed (runtime API) and pulled (agent-check)
        settle("node2 draining in HAProxy", lambda: all(
            haproxy_admin(pool, backend)["node2"] == "drain" for backend in ("vpn", "pulled")))
        # no new flow lands on the draining node, ...
        counts = new_udp_flows(pool, 60)
        assert counts["node2"] == 0, counts
        # ... its clients keep their tunnels, and the drain is not done while they are there
        assert all(c.ping() for c in pool.clients.values())
        assert pool.node_of(pool.clients[0]) == "node2"
        assert drain.poll() is None, "drain --wait returned while clients were still there"
        for index in list(pool.clients):
            pool.remove_client(index)
        out, _ = drain.communicate(timeout=600 + CLI_SECONDS)
    finally:
        if drain.poll() is None:
            drain.kill()
    assert drain.returncode == 0, out
    assert "drained, safe to restart" in out
    admin(pool, "node2", "ready")
    settle("node2 back in nftlb", lambda: pool.nftlb_weights()["node2"][0] == "up")
    assert pool.nftlb_weights()["node2"][1] <= 40  # through slow start
    settle("node2 at full weight", lambda: pool.nftlb_weights()["node2"] == ("up", 100))


def test_ikev2_through_the_balancer_lands_only_on_a_node_it_may(pool: UdpPool) -> None:
    """strongSwan behind nftlb's IKE farm (500 and 4500, sticky by source: NAT-T moves the
    exchange to 4500 and it must stay on one node): with two nodes drained, an initiator through
    the virtual address gets its SA from the third."""
    reset(pool)
    for name in ("node1", "node2"):
        admin(pool, name, "drain")
    try:
        settle("node1 and node2 off in the IKE farm", lambda: {
            n: b["state"] for n, b in pool.nftlb.backends("ike").items()} == {
                "node1": "off", "node2": "off", "node3": "up"})
        responder = pool.nodes["node3"].ikev2
        assert responder is not None
        conf = render_connection(
            "pool", local_addrs=pool.client.address, remote_addrs=VIP, local_id="client.lab",
            remote_id="pool.lab", proposals=responder.proposals, local_ts="10.211.0.5/32",
            remote_ts="10.210.0.0/16", esp_proposals=["aes256gcm16"], psk=responder.psk)
        initiator = StrongSwanServer(pool.lab, pool.client, swanctl_conf=conf)
        initiator.start()
        try:
            # the IKE SA is the balancer's business (its CHILD_SA's traffic selectors are the
            # lab's, not under test here)
            out = initiator.swanctl(["--initiate", "--child", "net", "--ike", "pool",
                                     "--timeout", "45"], check=False, timeout=60).stdout
            assert "IKE_SA pool[1] established" in out, out
            established = {name: "ESTABLISHED" in (n.ikev2.list_sas() if n.ikev2 else "")
                           for name, n in pool.nodes.items()}
            assert established == {"node1": False, "node2": False, "node3": True}
        finally:
            initiator.stop()
    finally:
        for name in ("node1", "node2"):
            admin(pool, name, "ready")


def admin(pool: UdpPool, node: str, action: str) -> None:
    done = subprocess.run(netns.exec_argv(pool.control.ns, [
        sys.executable, "-m", "probes.cli", action, node, "--config", str(pool.mesh_config)]),
        capture_output=True, text=True, timeout=CLI_SECONDS, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
