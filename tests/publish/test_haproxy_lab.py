"""The HAProxy publisher against a real HAProxy in the lab: every verdict is reflected, reconcile
after a restart restores the right states, and the delivery loop converges a restarted balancer."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from probes.lab.haproxy import Backend, HAProxyServer
from probes.lab.topology import Lab
from probes.mesh.publish.base import PermanentError
from probes.mesh.publish.delivery import DeliveryLoop, RetryPolicy
from probes.mesh.publish.haproxy import HAProxyPublisher, ServerMap, StateMapping
from probes.mesh.publish.metrics import PublisherMetrics
from probes.mesh.publish.outbox import MemoryOutbox
from probes.mesh.publish.runtime_api import RuntimeAPI, ServerState
from probes.model import Verdict, VerdictState

pytestmark = [pytest.mark.publish, pytest.mark.lab]

NODES = ["node1", "node2", "node3"]
S = VerdictState


def start_haproxy(lab: Lab) -> HAProxyServer:
    host = lab.add_host("lb")
    # weight 10 so 50% is visibly 5
    return lab.start_haproxy(host, servers=[Backend(n, f"10.99.0.{i + 1}", 51820, "weight 10")
                                            for i, n in enumerate(NODES)])


def states(hap: HAProxyServer) -> dict[str, ServerState]:
    from probes.mesh.publish.runtime_api import parse_servers_state

    rows = parse_servers_state(hap.command("show servers state vpn"))
    return {server: row for (_, server), row in rows.items()}


def verdict(node: str, state: VerdictState, seq: int) -> Verdict:
    return Verdict(node=node, state=state, previous=S.UNKNOWN, seq=seq, decided_at=time.time())


EXPECTED = {  # verdict -> (effective admin state, user weight of 10)
    S.UP: ("ready", 10),
    S.DEGRADED: ("ready", 5),
    S.DOWN: ("maint", 10),
    S.DRAINING: ("drain", 10),
    S.MAINTENANCE: ("maint", 10),
}


def check_reflects(hap: HAProxyServer, latest: dict[str, VerdictState]) -> None:
    rows = states(hap)
    for node, state in latest.items():
        admin, weight = EXPECTED[state]
        assert (rows[node].admin, rows[node].user_weight) == (admin, weight), \
            f"{node}: verdict {state}, HAProxy {rows[node]}"


async def test_every_verdict_is_reflected_and_restart_reconciles(lab: Lab) -> None:
    hap = start_haproxy(lab)
    pub = HAProxyPublisher("lb", RuntimeAPI(socket_path=str(hap.runtime_socket)))
    # every transition between the five states, on one node, plus the others moving too
    order = [S.DOWN, S.UP, S.DEGRADED, S.DRAINING, S.MAINTENANCE, S.DRAINING, S.DOWN,
             S.DEGRADED, S.MAINTENANCE, S.UP, S.DRAINING, S.UP, S.MAINTENANCE, S.DEGRADED,
             S.DOWN, S.DRAINING, S.DEGRADED, S.UP]
    latest: dict[str, VerdictState] = {}
    for seq, state in enumerate(order, start=1):
        node = NODES[seq % 3] if seq % 4 == 0 else "node1"
        await pub.deliver(verdict(node, state, seq))
        latest[node] = state
        check_reflects(hap, latest)
        # applying the same verdict again is a no-op (at-least-once delivery)
        await pub.deliver(verdict(node, state, seq))
        assert pub.applied[-1][1] == []

    current = {"node1": verdict("node1", S.DOWN, 100), "node2": verdict("node2", S.DEGRADED, 7),
               "node3": verdict("node3", S.DRAINING, 9)}
    for v in current.values():
        await pub.deliver(v)
    hap.stop()
    hap.start()  # a restarted HAProxy forgets every runtime change
    assert all(r.admin == "ready" and r.user_weight == 10 for r in states(hap).values())
    fixed = await pub.reconcile(current)
    assert fixed == 3
    check_reflects(hap, {n: v.state for n, v in current.items()})
    assert await pub.reconcile(current) == 0  # converged: nothing left to fix
    await pub.close()


async def test_down_action_drain_and_unknown_leaves_server_alone(lab: Lab) -> None:
    hap = start_haproxy(lab)
    pub = HAProxyPublisher("lb", RuntimeAPI(socket_path=str(hap.runtime_socket)),
                           mapping=StateMapping(down_action="drain", degraded_weight_percent=20))
    await pub.deliver(verdict("node2", S.DOWN, 1))
    assert states(hap)["node2"].admin == "drain"
    await pub.deliver(verdict("node2", S.UNKNOWN, 2))
    assert states(hap)["node2"].admin == "drain"
    await pub.deliver(verdict("node2", S.DEGRADED, 3))
    assert (states(hap)["node2"].admin, states(hap)["node2"].user_weight) == ("ready", 2)


async def test_mapping_and_unknown_server_is_permanent(lab: Lab) -> None:
    hap = start_haproxy(lab)
    servers = ServerMap(servers={"vpn-a.example": ("vpn", "node3")})
    pub = HAProxyPublisher("lb", RuntimeAPI(socket_path=str(hap.runtime_socket)), servers)
    await pub.deliver(verdict("vpn-a.example", S.MAINTENANCE, 1))
    assert states(hap)["node3"].admin == "maint"
    with pytest.raises(PermanentError):
        await pub.deliver(verdict("no-such-node", S.DOWN, 1))


async def test_delivery_loop_converges_a_restarted_haproxy(lab: Lab) -> None:
    hap = start_haproxy(lab)
    outbox = MemoryOutbox()
    registry = CollectorRegistry()
    pub = HAProxyPublisher("lb", RuntimeAPI(socket_path=str(hap.runtime_socket), timeout=1.0))
    loop = DeliveryLoop(pub, outbox, PublisherMetrics(registry),
                        RetryPolicy(initial_backoff=0.05, max_backoff=0.2, poll_interval=0.02,
                                    reconcile_interval=0.3))
    task = asyncio.create_task(loop.run())
    outbox.append(verdict("node1", S.DOWN, 1))
    outbox.append(verdict("node2", S.DRAINING, 1))

    async def wait_until(pred: object, what: str) -> None:
        deadline = time.monotonic() + 60  # generous: a busy machine is only slower
        while not pred():  # type: ignore[operator]
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.05)

    await wait_until(lambda: states(hap)["node1"].admin == "maint", "node1 to maint")
    hap.stop()
    outbox.append(verdict("node3", S.DEGRADED, 1))  # arrives while HAProxy is down

    def retries() -> float:
        return registry.get_sample_value("tunnelwatch_publisher_retries_total",
                                         {"publisher": "lb"}) or 0.0

    # HAProxy comes back only once the loop has tried (and failed) to deliver to it
    await wait_until(lambda: retries() >= 1, "a failed delivery to the stopped HAProxy")
    hap.start()
    await wait_until(lambda: states(hap)["node3"].user_weight == 5, "node3 degraded")
    await wait_until(lambda: states(hap)["node1"].admin == "maint", "node1 back to maint")
    check_reflects(hap, {"node1": S.DOWN, "node2": S.DRAINING, "node3": S.DEGRADED})
    loop.stop()
    await task
    assert retries() >= 1
    assert registry.get_sample_value("tunnelwatch_publisher_delivered_total",
                                     {"publisher": "lb"}) == 3


class TcpHAProxy(HAProxyServer):
    """The lab HAProxy with a second, TCP runtime API listener on its lab address."""

    def render(self) -> str:
        return super().render().replace(
            "global\n", f"global\n    stats socket ipv4@{self.host.address}:9999 level admin\n", 1)


async def test_tcp_runtime_api(lab: Lab) -> None:
    host = lab.add_host("lb")
    hap = TcpHAProxy(lab, host, servers=[Backend("node1", "10.99.0.1", 51820)])
    hap.start()
    with host.entered():  # the listener lives in the lab namespace
        pub = HAProxyPublisher("tcp-lb", RuntimeAPI(address=(host.address, 9999)))
        await pub.deliver(verdict("node1", S.MAINTENANCE, 1))
        await pub.close()
    assert states(hap)["node1"].admin == "maint"
