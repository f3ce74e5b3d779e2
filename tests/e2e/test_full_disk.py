"""Chaos in the lab (issue #17): a full disk for the mesh, then for an agent, each restored, while
real verdicts change (an OpenVPN daemon killed and restored on a node of the real fleet).

The mesh's database and one agent's state directory live on small filesystems the test mounts
and fills. At the end the engine, the store, both publishers (HAProxy and the webhook to the
reference receiver) and the receiver agree, no seq is missing, and the agent lost nothing.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from probes.lab.stack import AGENT_PORT, Stack, StackOptions, get
from probes.lab.topology import Lab
from tests.diskfull import fill, free, small_filesystem

pytestmark = [pytest.mark.e2e, pytest.mark.lab]


def until(what: str, cond: Callable[[], bool], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.25)


def health(stack: Stack) -> tuple[int, dict[str, Any]]:
    import urllib.error

    try:
        return 200, json.loads(get(stack.control, stack.mesh_url + "/healthz"))
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def engine_states(stack: Stack) -> dict[str, tuple[str, int]]:
    return {n["node"]: (n["state"], n["seq"]) for n in stack.nodes()}


def stored_states(stack: Stack) -> dict[str, tuple[str, int]]:
    latest: dict[str, tuple[str, int]] = {}
    for entry in stack.log():
        v = entry["verdict"]
        latest[v["node"]] = (v["state"], v["seq"])
    return latest


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def reported_counts(stack: Stack, agent: str) -> tuple[float, float]:
    """(node1's failed probes, batch POSTs the mesh did not take) as one agent counts them."""
    host = stack.fleet.agents[agent].host
    text = get(host, f"http://{host.address}:{AGENT_PORT}/metrics").decode()
    failed = re.findall(r'^tunnelwatch_probe_failures_total\{[^}]*node="node1"[^}]*\} (\S+)$',
                        text, re.M)
    untaken = re.findall(r'^tunnelwatch_report_batches_total\{[^}]*result="(?!ok"|duplicate")'
                         r'[^}]*\} (\S+)$', text, re.M)
    return sum(map(float, failed)), sum(map(float, untaken))


def test_a_full_disk_for_the_mesh_and_for_an_agent(lab: Lab, tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "mesh-disk", 48 * 1024 * 1024) as mesh_disk, \
            small_filesystem(tmp_path / "agent-disk", 8 * 1024 * 1024) as agent_disk:
        options = StackOptions(
            nodes=2, agents=3, prometheus=False, checks=("icmp", "openvpn.tls"),
            interval=1.5, fast_interval=0.25, timeout=1.0, mesh_corroboration=0,
            mesh_database=str(mesh_disk / "mesh.db"),
            agent_state_dirs=(("agent1", str(agent_disk / "state")),), receiver=True)
        stack = Stack(lab, options).build()
        stack.wait_settled(timeout=120)

        # 1. the mesh's disk fills up; a node fails meanwhile
        filler = fill(mesh_disk)
        until("the mesh to refuse inputs", lambda: health(stack)[0] == 503, 30)
        _, doc = health(stack)
        assert doc["store"] == "failing" and doc["engine"] == "as stored", doc
        before = {a: reported_counts(stack, a) for a in stack.fleet.agents}
        stack.kill_openvpn("node1")
        # every agent fails node1 (three times) and then tries to report it: the mesh decides
        # nothing it cannot store (a fixed 6 s wait before, which a busy machine could
        # outrun: then nothing had been reported yet and the check below proved nothing)
        tried: dict[str, float] = {}

        def every_agent_tried_to_report_node1_failing() -> bool:
            for agent, (failed_before, _) in before.items():
                failed, untaken = reported_counts(stack, agent)
                if agent not in tried and failed - failed_before >= 3:
                    tried[agent] = untaken  # node1's failures are in its spool from here
                elif agent in tried and untaken > tried[agent]:
                    tried[agent] = float("inf")  # a POST of them came back refused
            return all(tried.get(agent) == float("inf") for agent in before)

        until("every agent to fail node1 and try to report it",
              every_agent_tried_to_report_node1_failing, 90)
        assert engine_states(stack) == stored_states(stack)
        assert engine_states(stack)["node1"][0] == "UP"
        free(filler)
        until("node1 DOWN once the disk is back",
              lambda: engine_states(stack)["node1"][0] == "DOWN", 90)
        assert health(stack)[0] == 200

        # 2. an agent's disk fills up; the node comes back meanwhile
        filler = fill(agent_disk)
        stack.restore_openvpn("node1")
        until("node1 UP again", lambda: engine_states(stack)["node1"][0] == "UP", 90)
        time.sleep(3)  # agent1 keeps probing; its spool cannot commit
        free(filler)
        agent1 = stack.fleet.agents["agent1"].host
        agent_metrics = f"http://{agent1.address}:{AGENT_PORT}/metrics"

        def agent1_drained() -> bool:
            text = get(agent1, agent_metrics).decode()
            return metric(text, "tunnelwatch_spool_depth_observations") == 0

        until("agent1's spool to drain", agent1_drained, 60)
        text = get(agent1, agent_metrics).decode()
        assert metric(text, "tunnelwatch_spool_dropped_observations_total") == 0

        # 3. everyone agrees, and no seq is missing
        until("the receiver to have the last verdicts",
              lambda: {n: (s["state"], s["seq"]) for n, s in stack.receiver_state().items()}
              == stored_states(stack), 60)
        assert engine_states(stack) == stored_states(stack)
        seqs: dict[str, list[int]] = defaultdict(list)
        for entry in stack.log():
            seqs[entry["verdict"]["node"]].append(entry["verdict"]["seq"])
        assert seqs["node1"][-3:] == [seqs["node1"][-3], seqs["node1"][-3] + 1,
                                      seqs["node1"][-3] + 2]  # UP, DOWN, UP
        for node, got in seqs.items():
            assert got == list(range(1, len(got) + 1)), (node, got)
        receiver = get(stack.control, stack.receiver_url + "/metrics").decode()
        assert metric(receiver, "tunnelwatch_receiver_sequence_gaps_total") == 0
        mesh = get(stack.control, stack.mesh_url + "/metrics").decode()
        assert metric(mesh, "tunnelwatch_mesh_store_up") == 1
        assert metric(mesh, "tunnelwatch_mesh_store_commit_failures_total") >= 1
        assert metric(mesh, "tunnelwatch_mesh_engine_diverged") == 0
        rows = stack.haproxy.states()
        assert rows[("vpn", "node1")].in_rotation and rows[("vpn", "node2")].in_rotation
