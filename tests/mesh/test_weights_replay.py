"""A load trace recorded on real nodes (tests/bench/record_weights_trace.py: three wireguard-go
nodes behind nftlb, one made hot, one stopped and restarted) replayed through the decision and
weight engines gives the same weights, byte for byte, as the committed expected output — and
again on a second run. ``TW_REGENERATE=1`` rewrites the expected output (after a deliberate
policy change; review the diff)."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest
import yaml

from probes.cli import main
from probes.lab.udp_pool import DECISION, WEIGHTS
from probes.mesh.decision import NodeInfo
from probes.mesh.policy import DecisionPolicy
from probes.mesh.replay import parse_lines, replay_weights
from probes.mesh.weight_policy import WeightPolicy
from probes.mesh.weights import WeightNode
from probes.model import WeightChange, encode
from tests.mesh.helpers import write_mesh_config

pytestmark = pytest.mark.mesh

DATA = Path(__file__).parent / "data"
TRACE = DATA / "weights-trace.jsonl"
EXPECTED = DATA / "weights-trace.weights.jsonl"
NODES = ("node1", "node2", "node3")


def replayed() -> bytes:
    with TRACE.open("rb") as f:
        changes = replay_weights(
            msgspec.convert(DECISION, DecisionPolicy), [NodeInfo(n, "udp") for n in NODES],
            msgspec.convert(WEIGHTS, WeightPolicy), [WeightNode(n, "udp") for n in NODES],
            parse_lines(f))
        return b"".join(encode(change) + b"\n" for change in changes)


def test_recorded_trace_replays_to_the_same_weights_byte_for_byte() -> None:
    got = replayed()
    if os.environ.get("TW_REGENERATE"):
        EXPECTED.write_bytes(got)
    assert got == EXPECTED.read_bytes()
    assert replayed() == got  # and again


def test_mesh_replay_weights_prints_the_same_bytes(
        tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """The operator's way in: ``tunnelwatch mesh replay --weights`` with the lab's policies."""
    config = write_mesh_config(
        tmp_path, 0, ["agent"], infos=[NodeInfo(n, "udp", "lab1", "lab") for n in NODES],
        extra=yaml.safe_dump({"tick_seconds": 1.0, "decision": DECISION, "weights": WEIGHTS}))
    argv = ["mesh", "replay", "--weights", "--config", str(config), "--observations", str(TRACE)]
    assert main(argv) == 0
    assert capsysbinary.readouterr().out == EXPECTED.read_bytes()


def test_the_trace_shows_what_was_done_to_the_nodes() -> None:
    changes = [msgspec.json.decode(line, type=WeightChange)
               for line in EXPECTED.read_bytes().splitlines()]
    by_node = {n: [c for c in changes if c.node == n] for n in NODES}
    # node1 carried three heavy clients: over twice the pool's mean effective sessions, -90 %
    hot = min(by_node["node1"], key=lambda c: c.weight)
    assert hot.weight == 10
    assert hot.reasons[0].what == "effective_sessions-share" and hot.reasons[0].value > 2.0
    # node3's WireGuard was stopped: weight 0 with its DOWN verdict, then back through slow start
    node3 = by_node["node3"]
    down = next(i for i, c in enumerate(node3) if c.weight == 0)
    assert node3[down].state.value == "DOWN"
    assert any(r.what == "slow-start" for r in node3[down + 1].reasons)
    assert node3[-1].weight == 100
