"""Corroboration: distinct checks of a node failing at once from one vantage take them all down.

A silent node fails every check at once; with ``corroboration`` n, n distinct failing checks are
as strong as one check failing ``fall`` times in a row. Per vantage only: a single vantage still
cannot take a node down alone, and coming back still takes ``rise`` successes per check.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.mesh.decision import CHECK_DOWN, CHECK_UP, DecisionEngine
from probes.mesh.policy import DampingPolicy, DecisionPolicy, PolicyError, validate_policy
from probes.mesh.state import OP_DOWN
from probes.model import VerdictState
from tests.mesh.helpers import engine, obs

pytestmark = pytest.mark.mesh

CHECKS = (("icmp", "icmp"), ("wg", "wireguard.handshake"), ("ovpn", "openvpn.tls"),
          ("ike", "ikev2.auth"))
V3 = ("va", "vb", "vc")
# no dwell: these tests take a node down and back within a second (tests/mesh/test_dwell.py)
POLICY = DecisionPolicy(corroboration=3, damping=DampingPolicy(enabled=False),
                        min_dwell_seconds=0)


def report(eng: DecisionEngine, now: float, vantage: str, failing: set[str]) -> None:
    eng.observe([obs("n0", vantage, name not in failing, check=name, kind=kind, at=now)
                 for name, kind in CHECKS], now)


def settled_up(policy: DecisionPolicy = POLICY) -> DecisionEngine:
    eng = engine(1, policy)
    for v in V3:
        report(eng, 0.0, v, set())
    assert eng.nodes["n0"].state == VerdictState.UP
    return eng


def test_three_distinct_failing_checks_take_the_vantage_down_at_once() -> None:
    eng = settled_up()
    for v in ("va", "vb"):
        report(eng, 1.0, v, {"icmp", "wg", "ovpn"})  # one failure each
    assert eng.nodes["n0"].state == VerdictState.DOWN
    states = {c.name: c.state for c in eng.nodes["n0"].nvs["va"].checks}
    assert states == {"icmp": CHECK_DOWN, "wg": CHECK_DOWN, "ovpn": CHECK_DOWN, "ike": CHECK_UP}


def test_without_corroboration_one_failure_each_is_not_enough() -> None:
    eng = settled_up(DecisionPolicy(damping=DampingPolicy(enabled=False)))
    for v in ("va", "vb"):
        report(eng, 1.0, v, {"icmp", "wg", "ovpn"})
    assert eng.nodes["n0"].state == VerdictState.UP


def test_two_failing_checks_or_old_failures_do_not_corroborate() -> None:
    eng = settled_up()
    for v in ("va", "vb"):
        report(eng, 1.0, v, {"icmp", "wg"})  # two of the needed three
    assert eng.nodes["n0"].state == VerdictState.UP
    eng2 = settled_up()
    for v in ("va", "vb"):  # one failure 10 s ago (its check not re-run since) is not "at once"
        eng2.observe([obs("n0", v, False, check="ike", kind="ikev2.auth", at=1.0)], 1.0)
        eng2.observe([obs("n0", v, False, check=n, kind=k, at=11.0) for n, k in CHECKS[:2]],
                     11.0)
    assert eng2.nodes["n0"].state == VerdictState.UP


def test_single_vantage_cannot_take_a_node_down_and_recovery_needs_rise() -> None:
    eng = settled_up()
    report(eng, 1.0, "va", {"icmp", "wg", "ovpn", "ike"})
    assert eng.nodes["n0"].state == VerdictState.UP  # one vantage of three: no majority
    report(eng, 1.5, "vb", {"icmp", "wg", "ovpn", "ike"})
    assert eng.nodes["n0"].state == VerdictState.DOWN
    for v in ("va", "vb"):  # one success each: rise is 2, still down
        report(eng, 2.0, v, set())
    assert eng.nodes["n0"].state == VerdictState.DOWN
    for v in ("va", "vb"):
        report(eng, 2.5, v, set())
    assert eng.nodes["n0"].state == VerdictState.UP


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(V3), st.sets(st.sampled_from([c for c, _ in CHECKS]))),
                max_size=40))
def test_no_node_down_unless_a_majority_of_vantages_sees_it_down(
        script: list[tuple[str, set[str]]]) -> None:
    eng = settled_up()
    for i, (vantage, failing) in enumerate(script):
        report(eng, 1.0 + i * 0.25, vantage, failing)
        down = sum(nv.opinion == OP_DOWN for nv in eng.nodes["n0"].nvs.values())
        if eng.nodes["n0"].state == VerdictState.DOWN:
            assert down * 2 > len(V3)


@pytest.mark.parametrize("value", [1, -1])
def test_corroboration_of_one_check_is_rejected(value: int) -> None:
    with pytest.raises(PolicyError) as err:
        validate_policy(DecisionPolicy(corroboration=value))
    assert err.value.path == "decision.corroboration"
