"""Impairment from fresh contrary evidence, with its own hysteresis (issue 16).

A vantage is impaired only when its peers hold fresh contrary evidence about the nodes it sees
down: they probed the failing checks after this vantage saw them fail, and saw them pass, as a
strict majority of the vantages with such evidence (this one included). Absence of agreement —
peers not yet probed, stale, or failing themselves — is never evidence against it. The judgement
becomes "impaired" only after ``confirm_seconds`` and stops only after ``release_seconds``.

The table tests name the edge cases; the properties keep what the old rule already did right
(the detection benchmark's soak found that a vantage must not confirm itself: a vantage cut off
the fleet plus one flaky peer that saw half the fleet down made "half of three" under the older
rule, and the cut one voted again).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.mesh.decision import DecisionEngine
from probes.mesh.policy import DampingPolicy, DecisionPolicy, ImpairmentPolicy, PoolGuardPolicy
from probes.mesh.state import OP_DOWN
from probes.model import Reason, VerdictState
from tests.mesh.helpers import engine, everyone, obs, round_of

pytestmark = pytest.mark.mesh

NODES = [f"n{i}" for i in range(4)]
IMP = ImpairmentPolicy(confirm_seconds=2.0, release_seconds=4.0)
POLICY = DecisionPolicy(rise=1, fall=1, damping=DampingPolicy(enabled=False),
                        pool_guard=PoolGuardPolicy(max_down_share=1.0), impairment=IMP,
                        min_dwell_seconds=0)
CHECKS = (("icmp", "icmp"), ("ovpn", "openvpn.tls"))


def fleet_up(vantages: list[str], policy: DecisionPolicy = POLICY) -> DecisionEngine:
    eng = engine(len(NODES), policy)
    round_of(eng, 0, everyone(NODES, vantages, True))
    assert all(n.state == VerdictState.UP for n in eng.nodes.values())
    return eng


def see(eng: DecisionEngine, t: float, vantage: str, down: set[str], nodes: list[str] = NODES,
        check: str = "wg") -> None:
    """``vantage`` reports every node in ``nodes`` at ``t``: failing those in ``down``."""
    eng.observe([obs(n, vantage, n not in down, check=check, at=t) for n in nodes], t)


def impaired(eng: DecisionEngine) -> set[str]:
    return {name for name, v in eng.vantages.items() if v.impaired}


# ---------------------------------------------------------------------- the edge cases


def test_a_cut_vantage_is_impaired_after_confirmation_and_released_after_healing() -> None:
    eng = fleet_up(["va", "vb", "cut"])
    for t in (1.0, 2.0, 3.0):
        see(eng, t, "cut", set(NODES))
        see(eng, t, "va", set())
        see(eng, t, "vb", set())
        # contrary evidence from t=1 on (judged at the next input after that): not confirmed
        assert impaired(eng) == set()
    assert eng.vantages["cut"].contradicted
    see(eng, 4.0, "va", set())
    assert impaired(eng) == {"cut"}  # 2 s of contrary evidence
    for t in (5.0, 6.0, 7.0):  # healed: it sees what its peers see
        for v in ("va", "vb", "cut"):
            see(eng, t, v, set())
    assert impaired(eng) == {"cut"}  # not contradicted since 5 or 6: released only after 4 s
    see(eng, 11.0, "va", set())
    assert impaired(eng) == set()
    assert [n.what for n in eng.take_audit() if n.vantage] == ["impaired", "impairment-cleared"]


def test_peers_not_yet_probed_since_are_no_evidence() -> None:
    """A correlated failure: va learns first; vb and vc passed *before* va saw it fail."""
    eng = fleet_up(["va", "vb", "vc"])
    see(eng, 10.0, "va", set(NODES))  # vb, vc have not probed since t=0
    for t in (11.0, 12.0, 13.0, 14.0):
        eng.tick(t)
    assert not eng.vantages["va"].contradicted and impaired(eng) == set()


def test_stale_peers_are_no_evidence() -> None:
    policy = DecisionPolicy(rise=1, fall=1, damping=DampingPolicy(enabled=False),
                            stale_after_seconds=5, impairment=IMP, min_dwell_seconds=0)
    eng = fleet_up(["va", "vb", "vc"], policy)
    see(eng, 1.0, "va", set(NODES))
    see(eng, 1.0, "vb", set())  # a pass after va's failure ...
    see(eng, 1.0, "vc", set())
    for t in (10.0, 11.0, 12.0, 13.0):  # ... that has gone stale: vb and vc stopped reporting
        see(eng, t, "va", set(NODES))
    assert not eng.vantages["va"].contradicted and impaired(eng) == set()


def test_peers_failing_themselves_agree() -> None:
    eng = fleet_up(["va", "vb", "vc"])
    for t in range(1, 8):
        see(eng, t, "va", set(NODES))
        see(eng, t, "vb", set(NODES))
        see(eng, t, "vc", set())
    # vc contradicts both, but va and vb agree: neither is outvoted by vc alone
    assert impaired(eng) == set()
    assert {eng.nodes[n].state for n in NODES} == {VerdictState.DOWN}


@pytest.mark.parametrize("n_vantages", [3, 4, 5, 7])
def test_two_vantages_that_agree_are_never_both_impaired_by_a_third(n_vantages: int) -> None:
    vantages = [f"v{i}" for i in range(n_vantages)]
    eng = fleet_up(vantages)
    for t in range(1, 10):
        # v0 and v1 see the fleet down, v2 sees it up; the others have not probed it since
        for v in ("v0", "v1", "v2"):
            see(eng, t, v, set(NODES) if v != "v2" else set())
    assert impaired(eng) == set()


def test_contrary_evidence_is_per_check() -> None:
    """vb and vc's ICMP passes after va's OpenVPN failure are no evidence against va: only a
    probe of the same check is."""
    eng = fleet_up(["va", "vb", "vc"])
    for t in range(1, 8):
        see(eng, t, "va", set(NODES), check="ovpn")
        see(eng, t, "va", set(), check="icmp")
        for v in ("vb", "vc"):
            see(eng, t, v, set(), check="icmp")  # their OpenVPN probe has not run since t=0
    assert impaired(eng) == set()
    for v in ("vb", "vc"):  # now they probe OpenVPN, and it passes
        see(eng, 8.0, v, set(), check="ovpn")
    for t in (9.0, 10.0, 11.0):
        eng.tick(t)
    assert impaired(eng) == {"va"}


def test_a_vantage_without_peers_is_never_impaired() -> None:
    eng = engine(len(NODES), POLICY)
    for t in range(10):
        see(eng, float(t), "v0", set(NODES))
    assert impaired(eng) == set()


def test_one_path_cut_alone_does_not_impair_and_is_outvoted() -> None:
    """va cannot reach n0 (one path of four): contradicted on one node of four, below
    down_share: it keeps voting, and the vote outnumbers it on n0."""
    eng = fleet_up(["va", "vb", "vc"])
    for t in range(1, 10):
        see(eng, t, "va", {"n0"})
        see(eng, t, "vb", set())
        see(eng, t, "vc", set())
    assert impaired(eng) == set()
    assert eng.nodes["n0"].state == VerdictState.UP and eng.nodes["n0"].votes.down == 1


def test_a_lying_vantage_is_impaired_and_changes_nothing() -> None:
    eng = fleet_up(["va", "vb", "liar"])
    for t in range(1, 6):
        eng.observe([obs(n, "liar", False, reason=Reason.REFUSED, at=t) for n in NODES], t)
        see(eng, t, "va", set())
        see(eng, t, "vb", set())
    assert impaired(eng) == {"liar"}
    assert {eng.nodes[n].state for n in NODES} == {VerdictState.UP}


def test_a_cut_vantage_and_one_flaky_peer_stay_apart() -> None:
    """The soak's case: cut off, and one peer sees half the fleet down from loss. The cut one
    stays impaired (its peers still pass the other half after it failed), the flaky one is not
    impaired, and the flaky one alone cannot take n0, n1 down."""
    eng = fleet_up(["v0", "v1", "cut"])
    for t in range(1, 5):  # cut first, confirmed
        see(eng, t, "cut", set(NODES))
        see(eng, t, "v0", set())
        see(eng, t, "v1", set())
    assert impaired(eng) == {"cut"}
    for t in range(5, 12):
        see(eng, t, "cut", set(NODES))
        see(eng, t, "v0", {"n0", "n1"})
        see(eng, t, "v1", set())
    assert impaired(eng) == {"cut"}
    assert all(n.state == VerdictState.UP for n in eng.nodes.values())
    assert not eng.nodes["n0"].quorum_lost  # v0 and v1 vote: 1 down, 1 up


def test_hysteresis_does_not_flip_within_one_interval() -> None:
    """Contrary evidence that comes and goes every second (a probe in flight when the fault
    hit passes, the next one fails) never makes a vantage impaired."""
    eng = fleet_up(["va", "vb", "vc"])
    for t in range(1, 20):
        see(eng, t, "va", set(NODES))
        passing = t % 2 == 0
        for v in ("vb", "vc"):
            see(eng, t, v, set() if passing else set(NODES))
    assert impaired(eng) == set()
    assert not any(n.what == "impaired" for n in eng.take_audit())


def test_impairment_changes_are_audit_notes() -> None:
    eng = fleet_up(["va", "vb", "cut"])
    eng.take_audit()
    for t in range(1, 5):
        see(eng, t, "cut", set(NODES))
        see(eng, t, "va", set())
        see(eng, t, "vb", set())
    notes = [(n.what, n.vantage) for n in eng.take_audit() if n.vantage]
    assert notes == [("impaired", "cut")]
    assert eng.audit_totals["impaired"] == 1


# ---------------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sets(st.sampled_from(NODES), max_size=2),
                          st.sets(st.sampled_from(NODES), max_size=1)), max_size=25))
def test_a_cut_vantage_never_helps_take_a_node_down(
        script: list[tuple[set[str], set[str]]]) -> None:
    """``cut`` sees the whole fleet down (and is judged impaired first); ``v0`` fails up to half
    the fleet at a time, ``v1`` at most one node. A node goes DOWN only when both v0 and v1 see
    it down."""
    eng = fleet_up(["v0", "v1", "cut"])
    for t in range(1, 5):
        see(eng, t, "cut", set(NODES))
        see(eng, t, "v0", set())
        see(eng, t, "v1", set())
    assert impaired(eng) == {"cut"}
    for t, (v0_down, v1_down) in enumerate(script, start=5):
        see(eng, t, "cut", set(NODES))  # its own batch
        picture = everyone(NODES, ["v0", "v1"], True)
        picture.update({(n, "v0"): False for n in v0_down})
        picture.update({(n, "v1"): False for n in v1_down})
        for change in round_of(eng, t, picture):
            if change.state == VerdictState.DOWN and change.previous != VerdictState.DOWN:
                nvs = eng.nodes[change.node].nvs
                assert nvs["v0"].opinion == OP_DOWN and nvs["v1"].opinion == OP_DOWN
        assert "cut" in impaired(eng)


# ---------------------------------------------------------------------- docs/mesh.md's timeline


def test_the_worked_timeline_in_the_docs() -> None:
    """docs/mesh.md, "Impairment": a pool of 10, the daemons of n0..n5 die at t=0; A learns at
    0.2/0.45, B at 0.9/1.15, C at 1.6/1.85 (two unreachable answers each, fastinter 0.25)."""
    nodes = [f"n{i}" for i in range(10)]
    eng = engine(10, DecisionPolicy(damping=DampingPolicy(enabled=False)))
    dead = set(nodes[:6])

    def probe(t: float, vantage: str, failing: set[str]) -> list:
        return eng.observe([obs(n, vantage, n not in failing, reason=None if n not in failing
                                else Reason.ICMP_UNREACHABLE, check="ovpn", kind="openvpn.tls",
                                at=t) for n in nodes], t)

    for t, v in ((-1.8, "A"), (-1.4, "B"), (-1.1, "C")):
        probe(t, v, set())
    changes = []
    for t, v in ((0.2, "A"), (0.45, "A")):
        changes += probe(t, v, dead)
    # A sees 6 of 10 DOWN; B and C passed before A's failures began: no evidence against A
    assert eng.vantages["A"].down == 6 and not eng.vantages["A"].contradicted
    for t, v in ((0.9, "B"), (1.15, "B")):
        changes += probe(t, v, dead)
    # A and B agree: 2 of 3 vote DOWN; the guard lets 5 of 10 go, n5 is held
    assert [(c.node, c.state) for c in changes] == [(n, VerdictState.DOWN) for n in nodes[:5]]
    assert eng.nodes["n5"].guard_hold and eng.nodes["n5"].state == VerdictState.UP
    for t, v in ((1.6, "C"), (1.85, "C")):
        changes += probe(t, v, dead)
    for t in (3.0, 5.0, 7.0):
        eng.tick(t)
    assert not any(v.impaired or v.contradicted for v in eng.vantages.values())
    assert not any(n.quorum_lost for n in eng.nodes.values())
    assert len(changes) == 5 and all(c.state != c.previous for c in changes)
