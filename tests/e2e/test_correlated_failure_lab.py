"""60 % of a pool fails at once, on real servers with three real agents (issue 16).

Five VPN nodes in one pool (WireGuard, OpenVPN, strongSwan each), three agents probing ICMP, the
OpenVPN TLS handshake and IKEv2, the mesh publishing to HAProxy. The VPN daemons of three nodes
are stopped at once. The pool guard allows max(1, floor(0.5 x 5)) = 2 nodes DOWN: HAProxy must
see exactly two of the three leave, none of them come back while they fail, no node flap, and
no vantage judged impaired (every vantage sees the same failure). Corroboration on demand is on
(the default): the agents' re-probes are counted. Afterwards the mesh's journal, replayed
through ``tunnelwatch mesh replay``, gives the live verdict log byte for byte (the mesh's
weights and path evidence included).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import msgspec
import pytest

from probes.cli import main
from probes.lab.recorder import Recorder
from probes.lab.stack import Stack, StackOptions, get
from probes.lab.topology import Lab, wait_for
from probes.mesh.replay import journal_record
from probes.model import Verdict, encode

pytestmark = [pytest.mark.e2e, pytest.mark.publish, pytest.mark.lab]

FAILING = ["node1", "node2", "node3"]
CHECKS = ("icmp", "openvpn.tls", "ikev2.auth")


def metric(text: str, series: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(series))


def test_sixty_percent_of_a_pool_at_once(lab: Lab, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    stack = Stack(lab, StackOptions(nodes=5, prometheus=False, timeout=1.0, fast_interval=0.25,
                                    checks=CHECKS)).build()
    stack.wait_settled(180)
    with Recorder(stack, journal=True) as rec:
        fault_at = time.time()
        for node in FAILING:
            stack.kill_vpn(node)

        def out_of_rotation() -> list[str]:
            return [n for n in stack.fleet.nodes if rec.in_rotation("vpn", n) is False]

        wait_for(lambda: len(out_of_rotation()) >= 2, 60, "two nodes out of HAProxy")
        held_at = time.monotonic()
        # hold: the third failing node stays held by the guard, nothing comes back or flaps
        wait_for(lambda: time.monotonic() - held_at > 20, 30, "20 s of holding")
        view = {n["node"]: n for n in stack.nodes()}
        during = rec.verdicts_between(fault_at, time.time())
        audit = json.loads(get(stack.control, stack.mesh_url + "/v1/audit?limit=1000"))["audit"]
        mesh_metrics = get(stack.control, stack.mesh_url + "/metrics").decode()
        reprobes = stack.agent_counter("tunnelwatch_scheduler_reprobes_total")
        honoured = stack.agent_counter("tunnelwatch_scheduler_reprobe_requests_total",
                                       'result="honoured"')
        out = out_of_rotation()

        repair_at = time.time()
        for node in FAILING:
            stack.restore_vpn(node)
        stack.wait_settled(120)
        rec.catch_up()  # the last journal rows and log entries (a fixed 1 s wait before)
    # exactly the guard-allowed nodes left, all of them failing, each once and for good
    assert len(out) == 2 and set(out) <= set(FAILING), out
    assert sorted((v.node, v.state) for v in during) == [(n, "DOWN") for n in sorted(out)], during
    held = [n for n in FAILING if n not in out]
    assert view[held[0]]["guard_hold"] and view[held[0]]["state"] == "UP"
    for node in stack.fleet.nodes:  # HAProxy: out once and for good, nobody else moved
        moves = [b.in_rotation for b in rec.balancer
                 if b.backend == "vpn" and b.server == node and fault_at <= b.at < repair_at]
        assert moves == ([False] if node in out else []), (node, moves)
    # every vantage saw the same failure: none judged impaired, no quorum lost
    assert not [a for a in audit if a["what"] in ("impaired", "quorum-lost")], audit
    # corroboration on demand ran through the real agents
    # (requests sent by the mesh, honoured by the agents, probes they started)
    assert metric(mesh_metrics, 'tunnelwatch_mesh_reprobe_requests_total{result="sent"}') > 0
    assert honoured > 0 and reprobes > 0

    # the live mesh's journal replays to its verdict log, byte for byte
    log = [msgspec.convert(e["verdict"], Verdict) for e in stack.log()]
    # (on repair the held node may go DOWN for a moment too: when the first two come back UP,
    # room frees in the guard while its own checks still wait for their rise)
    assert {v.node for v in log if v.state.value == "UP" and v.previous.value == "DOWN"} >= set(
        out)
    journal = tmp_path / "journal.jsonl"
    # the verdicts carry the epoch of the mesh store's history (one mesh run: one epoch); the
    # journal does not, so the records are given it
    [epoch] = {v.epoch for v in log}
    journal.write_bytes(b"".join(journal_record(e, epoch) + b"\n" for e in rec.journal_entries))
    assert rec.journal_entries[0].id == 1  # from the mesh's start
    assert main(["mesh", "replay", "--config", str(stack.dir / "mesh.yaml"),
                 "--observations", str(journal)]) == 0
    replayed = capsys.readouterr().out.splitlines()
    assert [line.encode() for line in replayed] == [encode(v) for v in log]
