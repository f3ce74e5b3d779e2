"""The nftlb publisher against a real nftlb (router namespace, REST API): verdicts become backend
states, weights become backend weights — read back through nftlb's API and in the nftables
ruleset it generated — and UDP flows follow them: new flows avoid a drained or down backend,
flows already in conntrack keep theirs, a backend gets new flows in proportion to its weight.
A restarted nftlb is put right by reconcile."""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import pytest

from probes.lab.nftlb import FarmBackend, NftlbServer
from probes.lab.topology import wait_for
from probes.mesh.publish.base import PermanentError
from probes.mesh.publish.nftlb import BackendMap, NftlbAPI, NftlbPublisher
from probes.model import Verdict, VerdictState, WeightChange

pytestmark = [pytest.mark.publish, pytest.mark.lab]

ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(sys.argv[1].encode() + b":" + data, peer)
"""
VIP = "10.77.250.1"
PORT = 51820
UP, DEGRADED, DOWN = VerdictState.UP, VerdictState.DEGRADED, VerdictState.DOWN
DRAINING, MAINT = VerdictState.DRAINING, VerdictState.MAINTENANCE


def verdict(node: str, state: VerdictState, seq: int) -> Verdict:
    return Verdict(node=node, state=state, previous=VerdictState.UNKNOWN, seq=seq,
                   decided_at=float(seq))


def change(node: str, weight: int, seq: int, state: VerdictState = UP) -> WeightChange:
    return WeightChange(node=node, weight=weight, previous=None, seq=seq, decided_at=0.0,
                        state=state)


@pytest.fixture
def pool(lab: Any) -> Any:
    control = lab.add_host("control")
    nodes = [lab.add_host(f"node{i}") for i in (1, 2, 3)]
    client = lab.add_host("client")
    for node in nodes:  # a UDP echo stands in for the VPN daemon: replies name the node
        node.popen([sys.executable, "-c", ECHO, node.name, str(PORT)], name="echo")
    for node in nodes:
        wait_for(lambda n=node: f":{PORT} " in n.run(["ss", "-Hunl"]).stdout, 60, "echo")
    nftlb = NftlbServer(lab, control)
    nftlb.start()
    nftlb.add_farm("wg", VIP, str(PORT), [FarmBackend(n.name, n.address) for n in nodes])
    nftlb.count_new_flows(VIP, [n.address for n in nodes])
    return lab, control, nodes, client, nftlb


def publisher(nftlb: NftlbServer, weights: dict[str, int] | None = None) -> NftlbPublisher:
    pub = NftlbPublisher("lb", NftlbAPI(nftlb.url, nftlb.key), BackendMap(("wg",)))
    if weights is not None:
        pub.weight_of = weights.get
    return pub


def run(host: Any, coro: Any, pub: NftlbPublisher | None = None) -> Any:
    """Run ``coro`` from inside ``host`` (the API listens on a lab address); closes ``pub``'s
    HTTP session within the same event loop."""
    async def whole() -> Any:
        try:
            return await coro
        finally:
            if pub is not None:
                await pub.close()

    with host.entered():
        return asyncio.run(whole())


def ask(s: socket.socket, data: bytes) -> str:
    """Send on a flow; the node that answered it."""
    s.send(data)
    node, _, echoed = s.recv(256).partition(b":")
    assert echoed == data
    return node.decode()


def flows(client: Any, count: int) -> list[tuple[socket.socket, str]]:
    """``count`` new UDP flows to the VIP (one socket, one source port each), each answered:
    (socket, the node that answered)."""
    out = []
    with client.entered():
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(3)
            s.connect((VIP, PORT))
            out.append((s, ask(s, b"hello")))
    return out


def close(held: list[tuple[socket.socket, str]]) -> None:
    for s, _ in held:
        s.close()


def new_flows_during(nftlb: NftlbServer, nodes: list[Any], fn: Any) -> dict[str, int]:
    """New flows per node (nftlb's DNAT, counted in the kernel) while ``fn`` runs."""
    before = nftlb.new_flows()
    fn()
    after = nftlb.new_flows()
    return {n.name: after[n.address] - before[n.address] for n in nodes}


def test_states_and_weights_reach_nftlb_and_the_kernel(pool: Any) -> None:
    _lab, control, _nodes, _client, nftlb = pool
    weights = {"node1": 100, "node2": 100, "node3": 100}
    pub = publisher(nftlb, weights)

    async def script() -> None:
        await pub.deliver(verdict("node1", UP, 1))
        weights["node1"] = 25
        await pub.deliver_weights([change("node1", 25, 1)])
        await pub.deliver(verdict("node2", DRAINING, 1))
        await pub.deliver(verdict("node3", DOWN, 1))
        await pub.close()

    run(control, script())
    got = nftlb.backends("wg")
    assert {n: (b["state"], b["weight"]) for n, b in got.items()} == {
        "node1": ("up", "25"), "node2": ("off", "100"), "node3": ("down", "100")}
    assert nftlb.numgen("wg") == {"node1": 25}  # only node1 takes new flows
    assert "numgen random mod 25" in nftlb.ruleset()

    async def back() -> None:
        weights.update(node2=100, node3=40)
        await pub.deliver(verdict("node2", UP, 2))
        await pub.deliver(verdict("node3", DEGRADED, 2))
        await pub.close()

    run(control, back())
    assert nftlb.numgen("wg") == {"node1": 25, "node2": 100, "node3": 40}


def test_weights_off_maps_degraded_and_maintenance(pool: Any) -> None:
    _lab, control, _nodes, _client, nftlb = pool
    pub = publisher(nftlb)  # no weight source: the state table alone

    async def script() -> None:
        await pub.deliver(verdict("node1", DEGRADED, 1))
        await pub.deliver(verdict("node2", MAINT, 1))
        await pub.close()

    run(control, script())
    got = nftlb.backends("wg")
    assert (got["node1"]["state"], got["node1"]["weight"]) == ("up", "50")
    assert got["node2"]["state"] == "off"


def test_new_flows_follow_weights_and_avoid_a_drained_node_which_keeps_its_flows(
        pool: Any) -> None:
    _lab, control, nodes, client, nftlb = pool
    weights = {"node1": 100, "node2": 100, "node3": 100}
    pub = publisher(nftlb, weights)
    held = flows(client, 30)  # flows that exist before the drain
    mine = [s for s, node in held if node == "node1"]
    assert mine, "no flow landed on node1 at equal weights"

    async def drain() -> None:
        await pub.deliver(verdict("node1", DRAINING, 1))
        weights.update(node2=100, node3=20)
        await pub.deliver_weights([change("node3", 20, 1)])
        await pub.close()

    run(control, drain())
    fresh: list[tuple[socket.socket, str]] = []
    counts = new_flows_during(nftlb, nodes, lambda: fresh.extend(flows(client, 120)))
    answered = {n.name: sum(1 for _, node in fresh if node == n.name) for n in nodes}
    assert counts == answered  # the kernel's count of new flows is who answered them
    assert counts["node1"] == 0
    # node2 at 100 vs node3 at 20: expect 100 and 20 of 120 (binomial, sd ~4)
    assert counts["node2"] >= 80 and counts["node3"] <= 40
    with client.entered():  # the drained node's flows still reach it, through nftlb's DNAT
        for s in mine:
            assert ask(s, b"still") == "node1"
    close(held)
    close(fresh)


def test_reconcile_puts_a_restarted_nftlb_right_and_never_creates_backends(pool: Any) -> None:
    _lab, control, _nodes, _client, nftlb = pool
    weights = {"node1": 30, "node2": 100, "node3": 100}
    pub = publisher(nftlb, weights)
    current = {"node1": verdict("node1", UP, 3), "node2": verdict("node2", DRAINING, 2),
               "node3": verdict("node3", UP, 1)}
    nftlb.restart()  # back with every backend up at weight 100
    assert nftlb.numgen("wg") == {"node1": 100, "node2": 100, "node3": 100}
    fixed = run(control, pub.reconcile(current), pub)
    assert fixed == 2
    assert nftlb.numgen("wg") == {"node1": 30, "node3": 100}
    assert run(control, pub.reconcile(current), pub) == 0  # converged: nothing more to send
    with pytest.raises(PermanentError, match="no backend node9"):
        run(control, pub.deliver(verdict("node9", UP, 1)), pub)
    assert "node9" not in nftlb.backends("wg")
