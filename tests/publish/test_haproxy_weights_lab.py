"""Weights into a real HAProxy, both ways: pushed through the runtime API (the HAProxy publisher
with the mesh's weights) and pulled by HAProxy's own agent-check from the mesh's responder."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from probes.lab.haproxy import Backend, HAProxyServer
from probes.lab.topology import Lab
from probes.mesh.publish.agentcheck import AgentCheckServer, agent_reply
from probes.mesh.publish.haproxy import HAProxyPublisher
from probes.mesh.publish.runtime_api import RuntimeAPI, ServerState, parse_servers_state
from probes.model import Verdict, VerdictState, WeightChange

pytestmark = [pytest.mark.publish, pytest.mark.lab]

S = VerdictState
NODES = ("node1", "node2", "node3")


def rows(hap: HAProxyServer) -> dict[str, ServerState]:
    return {server: row for (_, server), row in
            parse_servers_state(hap.command("show servers state vpn")).items()}


def verdict(node: str, state: VerdictState, seq: int) -> Verdict:
    return Verdict(node=node, state=state, previous=S.UNKNOWN, seq=seq, decided_at=time.time())


async def until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_runtime_api_carries_the_mesh_weights(lab: Lab) -> None:
    host = lab.add_host("lb")
    hap = lab.start_haproxy(host, servers=[Backend(n, f"10.99.0.{i + 1}", 51820, "weight 20")
                                           for i, n in enumerate(NODES)])
    weights = {"node1": 100, "node2": 100, "node3": 100}
    pub = HAProxyPublisher("lb", RuntimeAPI(socket_path=str(hap.runtime_socket)))
    pub.weight_of = weights.get
    for node in NODES:
        await pub.deliver(verdict(node, S.UP, 1))
    weights["node1"] = 75
    await pub.deliver_weights([WeightChange(node="node1", weight=75, previous=100, seq=2,
                                            decided_at=time.time(), state=S.UP)])
    assert rows(hap)["node1"].user_weight == 15  # 75 % of 20
    # a DEGRADED verdict takes the engine's weight (the cap is in it), not the table's 50 %
    weights["node2"] = 40
    await pub.deliver(verdict("node2", S.DEGRADED, 2))
    assert (rows(hap)["node2"].admin, rows(hap)["node2"].user_weight) == ("ready", 8)
    # slow start after DOWN: the verdict brings it back at the engine's current 10 %
    weights["node3"] = 0
    await pub.deliver(verdict("node3", S.DOWN, 2))
    assert (rows(hap)["node3"].admin, rows(hap)["node3"].user_weight) == ("maint", 0)
    weights["node3"] = 10
    await pub.deliver(verdict("node3", S.UP, 3))
    assert (rows(hap)["node3"].admin, rows(hap)["node3"].user_weight) == ("ready", 2)
    # a restarted HAProxy comes back at its configured weights; reconcile restores the mesh's
    hap.stop()
    hap.start()
    assert {n: r.user_weight for n, r in rows(hap).items()} == dict.fromkeys(NODES, 20)
    fixed = await pub.reconcile({"node1": verdict("node1", S.UP, 1),
                                 "node2": verdict("node2", S.DEGRADED, 2),
                                 "node3": verdict("node3", S.UP, 3)})
    assert fixed == 3
    assert {n: r.user_weight for n, r in rows(hap).items()} == {"node1": 15, "node2": 8,
                                                                "node3": 2}
    await pub.close()


def test_agent_replies() -> None:
    assert agent_reply(S.UP, 75) == "up ready 75%"
    assert agent_reply(S.UP, None) == "up ready 100%"
    assert agent_reply(S.DEGRADED, None, 40) == "up ready 40%"
    assert agent_reply(S.DRAINING, 0) == "drain"
    assert agent_reply(S.MAINTENANCE, 0) == "maint"
    assert agent_reply(S.DOWN, 0) == "down"
    assert agent_reply(S.UNKNOWN, None) == ""
    known: dict[str, tuple[VerdictState, int | None]] = {"node1": (S.UP, 30)}
    server = AgentCheckServer(known.get, servers={"srv-a": "node1"})
    assert server.answer("srv-a\n") == "up ready 30%"
    assert server.answer("node1\r\n") == "up ready 30%"
    assert server.answer("ghost\n") == "" and server.answer("\n") == ""
    assert server.answered == {"ok": 2, "unknown": 1, "bad": 1}


async def test_haproxy_pulls_states_and_weights_through_agent_check(lab: Lab) -> None:
    host = lab.add_host("lb")
    status: dict[str, tuple[VerdictState, int | None]] = {n: (S.UP, 100) for n in NODES}
    responder = AgentCheckServer(status.get)
    with host.entered():  # the listening socket lives in HAProxy's namespace
        port = await responder.start("127.0.0.1", 0)
    agent = (f"weight 20 agent-check agent-addr 127.0.0.1 agent-port {port} agent-inter 200ms "
             "agent-send {}")
    servers = [Backend(n, f"10.99.0.{i + 1}", 51820, agent.format(f'"{n}\\n"'))
               for i, n in enumerate(NODES)]
    hap: Any = lab.start_haproxy(host, servers=servers)
    try:
        status["node1"] = (S.UP, 60)
        status["node2"] = (S.DRAINING, 0)
        await until(lambda: rows(hap)["node1"].user_weight == 12, "node1 at 60 % (12 of 20)")
        await until(lambda: rows(hap)["node2"].admin == "drain", "node2 draining")
        status["node3"] = (S.DOWN, 0)
        await until(lambda: rows(hap)["node3"].op_state == 0, "node3 down")
        status["node1"] = (S.MAINTENANCE, 0)
        await until(lambda: rows(hap)["node1"].admin == "maint", "node1 in maintenance")
        for node in NODES:  # all back: ready, operational, full weight
            status[node] = (S.UP, 100)
        await until(lambda: all(r.in_rotation and r.user_weight == 20
                                for r in rows(hap).values()), "every node back at 100 %")
        assert responder.answered["ok"] > 0 and responder.answered["unknown"] == 0
    finally:
        await responder.stop()
