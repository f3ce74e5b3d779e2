"""Impairment is judged by a vantage's peers: its own alarm does not confirm itself.

The detection benchmark's soak found the hole: three vantages, one cut off the fleet (it sees
every node down), 5% loss on the others. When one of those saw two of three nodes down at once,
"fewer than half of the vantages alarmed" no longer held (two of three, counting the cut one),
the cut vantage voted again and took nodes down together with the flaky one.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.mesh.decision import DecisionEngine
from probes.mesh.policy import DampingPolicy, DecisionPolicy, PoolGuardPolicy
from probes.mesh.state import OP_DOWN
from probes.model import VerdictState
from tests.mesh.helpers import engine, everyone, round_of

pytestmark = pytest.mark.mesh

NODES = [f"n{i}" for i in range(4)]
POLICY = DecisionPolicy(rise=1, fall=1, damping=DampingPolicy(enabled=False),
                        pool_guard=PoolGuardPolicy(max_down_share=1.0))


def fleet_up(vantages: list[str]) -> DecisionEngine:
    eng = engine(len(NODES), POLICY)
    round_of(eng, 0, everyone(NODES, vantages, True))
    assert all(n.state == VerdictState.UP for n in eng.nodes.values())
    return eng


def test_a_cut_vantage_and_one_flaky_peer_are_both_left_out() -> None:
    eng = fleet_up(["v0", "v1", "cut"])
    picture = everyone(NODES, ["v0", "v1"], True)
    picture.update({("n0", "v0"): False, ("n1", "v0"): False})  # v0: half the fleet down
    picture.update({(n, "cut"): False for n in NODES})
    changes = round_of(eng, 1, picture)
    assert eng.vantages["cut"].impaired and eng.vantages["v0"].impaired
    assert not eng.vantages["v1"].impaired
    assert all(c.state != VerdictState.DOWN for c in changes)
    assert all(n.state == VerdictState.UP for n in eng.nodes.values())
    assert eng.nodes["n0"].quorum_lost  # one voter left: the verdict is held


def test_most_peers_agreeing_is_the_fleet_not_the_vantage() -> None:
    eng = fleet_up(["v0", "v1", "v2"])
    picture = everyone(NODES, ["v0", "v1", "v2"], True)
    for v in ("v0", "v1", "v2"):
        picture.update({("n0", v): False, ("n1", v): False})
    round_of(eng, 1, picture)
    assert not any(v.impaired for v in eng.vantages.values())
    assert {eng.nodes["n0"].state, eng.nodes["n1"].state} == {VerdictState.DOWN}


def test_a_lone_vantage_is_never_impaired() -> None:
    eng = engine(len(NODES), DecisionPolicy(damping=DampingPolicy(enabled=False)))
    round_of(eng, 0, everyone(NODES, ["v0"], False))
    assert not eng.vantages["v0"].impaired


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sets(st.sampled_from(NODES)),
                          st.sets(st.sampled_from(NODES), max_size=1)), max_size=25))
def test_a_cut_vantage_never_helps_take_a_node_down(
        script: list[tuple[set[str], set[str]]]) -> None:
    """``cut`` sees the whole fleet down; ``v0`` fails anything; ``v1`` at most one node (it is
    never alarmed). A node goes DOWN only when both v0 and v1 see it down."""
    eng = fleet_up(["v0", "v1", "cut"])
    for t, (v0_down, v1_down) in enumerate(script, start=1):
        round_of(eng, t, everyone(NODES, ["cut"], False))  # its own batch
        picture = everyone(NODES, ["v0", "v1"], True)
        picture.update({(n, "v0"): False for n in v0_down})
        picture.update({(n, "v1"): False for n in v1_down})
        for change in round_of(eng, t, picture):
            if change.state == VerdictState.DOWN and change.previous != VerdictState.DOWN:
                nvs = eng.nodes[change.node].nvs
                assert nvs["v0"].opinion == OP_DOWN and nvs["v1"].opinion == OP_DOWN
