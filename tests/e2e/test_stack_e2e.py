"""The whole stack in the lab: real agents probe real VPN servers, the mesh votes, HAProxy follows.

Expectations are checked with generous bounds (the machine is shared); the detection times are
figures for tests/bench/test_detection_bench.py, not asserted here.
"""

from __future__ import annotations

import time

import pytest

from probes.lab import scenario as sc
from probes.lab.recorder import Recorder
from probes.lab.stack import Stack, StackOptions
from probes.lab.topology import Lab

pytestmark = [pytest.mark.e2e, pytest.mark.publish, pytest.mark.lab]


def haproxy_admin(stack: Stack) -> dict[str, str]:
    return {server: row.admin for (backend, server), row in stack.haproxy.states().items()
            if backend == "vpn"}


def wait_for(pred: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_fault_verdict_balancer_and_haproxy_restart(lab: Lab) -> None:
    stack = Stack(lab, StackOptions(prometheus=False)).build()
    stack.wait_settled(120)
    with Recorder(stack) as rec:
        scenario = sc.Scenario(stack, rec)
        down = scenario.run_step(sc.Step("isolate node1", sc.isolate_node("node1"), "node1",
                                         "DOWN", max_wait=60))
        assert down.met, sc.describe(down)
        assert haproxy_admin(stack)["node1"] == "maint"

        # a restarted HAProxy comes back with every server ready; the publisher reconciles
        stack.haproxy.stop()
        stack.haproxy.start()
        assert wait_for(lambda: haproxy_admin(stack)["node1"] == "maint", 90), \
            "reconcile did not restore node1's maint after the HAProxy restart"

        up = scenario.run_step(sc.Step("reconnect node1", sc.reconnect_node("node1"), "node1",
                                       "UP", max_wait=90))
        assert up.met, sc.describe(up)
        # every verdict reached HAProxy: per node, the mesh's latest state is HAProxy's state
        verdicts = {n["node"]: n["state"] for n in stack.nodes()}
        admin = haproxy_admin(stack)
        expected = {"UP": "ready", "DOWN": "maint", "DRAINING": "drain", "MAINTENANCE": "maint"}
        assert {n: expected[s] for n, s in verdicts.items()} == admin
        node1 = [v.state for v in rec.verdicts if v.node == "node1"]
        assert "DOWN" in node1 and node1[-1] == "UP", node1
