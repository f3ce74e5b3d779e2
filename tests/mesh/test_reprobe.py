"""Corroboration on demand, mesh side: who is asked to re-probe what, and the rate limits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.mesh.decision import DecisionEngine
from probes.mesh.policy import DampingPolicy, DecisionPolicy
from probes.mesh.reprobe import ReprobePlanner, ReprobePolicy, policy_problems
from probes.model import Reason
from tests.mesh.helpers import engine, obs

pytestmark = pytest.mark.mesh

CHECKS = (("icmp", "icmp"), ("wg", "wireguard.handshake"), ("ovpn", "openvpn.tls"))
V3 = ("va", "vb", "vc")
POLICY = DecisionPolicy(damping=DampingPolicy(enabled=False))


def report(eng: DecisionEngine, t: float, vantage: str, failing: set[str] = frozenset(),
           node: str = "n0", checks: tuple[tuple[str, str], ...] = CHECKS) -> None:
    eng.observe([obs(node, vantage, name not in failing, check=name, kind=kind, at=t,
                     reason=None if name not in failing else Reason.TIMEOUT)
                 for name, kind in checks], t)


def up(nodes: int = 1) -> DecisionEngine:
    eng = engine(nodes, POLICY)
    for v in V3:
        for i in range(nodes):
            report(eng, 0.0, v, node=f"n{i}")
    return eng


def asks_of(eng: DecisionEngine, t: float) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for ask in eng.corroboration_asks(t):
        for peer, checks in ask.peers:
            out[peer] = out.get(peer, ()) + checks
    return out


def test_a_functional_failure_asks_the_others_for_the_same_check() -> None:
    eng = up()
    report(eng, 1.0, "va", {"ovpn"})
    assert asks_of(eng, 1.0) == {"vb": ("ovpn",), "vc": ("ovpn",)}


def test_an_l4_failure_asks_for_the_functional_checks_too() -> None:
    eng = up()
    report(eng, 1.0, "va", {"icmp"})
    assert asks_of(eng, 1.0) == {"vb": ("icmp", "wg", "ovpn"), "vc": ("icmp", "wg", "ovpn")}


def test_only_the_first_failure_of_a_run_asks() -> None:
    eng = up()
    report(eng, 1.0, "va", {"ovpn"})
    report(eng, 1.25, "va", {"ovpn"})  # the run goes on: already asked
    assert asks_of(eng, 1.25) == {}
    report(eng, 1.5, "va")
    report(eng, 3.0, "va", {"ovpn"})  # a new run
    assert asks_of(eng, 3.0) == {"vb": ("ovpn",), "vc": ("ovpn",)}


def test_peers_that_already_answered_are_not_asked() -> None:
    eng = up()
    report(eng, 1.0, "vb", {"ovpn"})  # vb fails it already
    report(eng, 2.0, "vc")  # vc passed it after va's failure below began? no: before
    report(eng, 1.5, "va", {"ovpn"})
    got = asks_of(eng, 2.0)
    assert "vb" not in got  # already failing
    eng2 = up()
    report(eng2, 2.0, "vc")  # vc's pass started at 2.0 ...
    eng2.observe([obs("n0", "va", False, check="ovpn", kind="openvpn.tls", at=1.5)], 2.1)
    assert "vc" not in asks_of(eng2, 2.1)  # ... after va's failure began at 1.5: answered


def test_no_asks_for_a_node_already_down_or_drained_or_from_an_impaired_vantage() -> None:
    eng = up()
    for t in (1.0, 1.25, 1.5):
        for v in ("va", "vb"):
            report(eng, t, v, {"icmp", "wg", "ovpn"})
    assert eng.nodes["n0"].state.value == "DOWN"
    report(eng, 5.0, "vc", {"icmp"})
    assert asks_of(eng, 5.0) == {}
    eng = up()
    eng.set_admin("n0", None, 0.5)
    from probes.model import VerdictState

    eng.set_admin("n0", VerdictState.DRAINING, 0.6)
    report(eng, 1.0, "va", {"ovpn"})
    assert asks_of(eng, 1.0) == {}
    eng = up(5)  # va is cut off the fleet: impaired once contradicted for 2 s
    for t in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
        for i in range(5):
            report(eng, t, "va", {"icmp", "wg", "ovpn"}, node=f"n{i}")
            for v in ("vb", "vc"):
                report(eng, t, v, node=f"n{i}")
    assert eng.vantages["va"].impaired
    report(eng, 7.0, "va", {"icmp", "wg"})  # a blip: its OpenVPN check passes once ...
    report(eng, 8.0, "va", {"icmp", "wg", "ovpn"})  # ... and begins failing again
    assert asks_of(eng, 8.0) == {}


def test_planner_delivers_to_each_agent_with_its_next_batch() -> None:
    eng = up()
    planner = ReprobePlanner(ReprobePolicy())
    report(eng, 1.0, "va", {"ovpn"})
    planner.plan(eng, 1.0)
    assert planner.take("va", 1.0) == []
    assert planner.take("vb", 1.1) == [("n0", "ovpn")]
    assert planner.take("vb", 1.2) == []  # delivered once
    assert planner.take("vc", 3.5) == []  # too late: 2.5 s > max_delay 2 s
    assert planner.counts == {"sent": 1, "cooldown": 0, "agent-rate": 0, "expired": 1}


def test_planner_cooldown_per_node_check() -> None:
    eng = up()
    planner = ReprobePlanner(ReprobePolicy(node_cooldown_seconds=5.0))
    report(eng, 1.0, "va", {"ovpn"})
    planner.plan(eng, 1.0)
    report(eng, 1.1, "va")
    report(eng, 2.0, "va", {"ovpn"})  # flapping: a new run 1 s later
    planner.plan(eng, 2.0)
    assert planner.take("vb", 2.0) == [("n0", "ovpn")]
    assert planner.counts["cooldown"] == 2  # vb and vc were not asked again
    report(eng, 2.1, "va")
    report(eng, 7.0, "va", {"ovpn"})  # after the cooldown: asked again
    planner.plan(eng, 7.0)
    assert planner.take("vb", 7.0) == [("n0", "ovpn")]


def test_planner_rate_per_agent_bounds_a_flood() -> None:
    """Half the fleet begins failing at va at once: vb gets at most the burst now, then the
    rate; everything else is counted as dropped."""
    eng = up(100)
    planner = ReprobePlanner(ReprobePolicy(agent_rate=10.0))
    for i in range(100):
        report(eng, 1.0, "va", {"ovpn"}, node=f"n{i}")
        planner.plan(eng, 1.0)
    got = planner.take("vb", 1.0)
    assert len(got) == 20  # burst: twice the rate
    assert planner.counts["agent-rate"] == 2 * 80


def test_disabled_planner_asks_nothing() -> None:
    eng = up()
    planner = ReprobePlanner(ReprobePolicy(enabled=False))
    report(eng, 1.0, "va", {"ovpn"})
    planner.plan(eng, 1.0)
    assert planner.take("vb", 1.0) == []


def test_policy_problems_name_the_field() -> None:
    assert policy_problems(ReprobePolicy(agent_rate=-1)) == [
        ("$.reprobe.agent_rate", "must be a finite number >= 0, got -1")]
    assert policy_problems(ReprobePolicy()) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(V3), st.integers(0, 9),
                          st.sets(st.sampled_from([c for c, _ in CHECKS])),
                          st.floats(0.0, 3.0)), max_size=60),
       st.floats(0.5, 50.0), st.floats(0.0, 10.0))
def test_no_agent_gets_more_than_its_budget(script: list, rate: float, cooldown: float) -> None:
    """Whatever fails where, an agent is never sent more requests than its token bucket allows
    over the run, and no (node, check) twice within the cooldown."""
    eng = up(10)
    planner = ReprobePlanner(ReprobePolicy(agent_rate=rate, node_cooldown_seconds=cooldown,
                                           max_delay_seconds=1e9))
    t = 1.0
    sent: dict[str, list[tuple[float, str, str]]] = {v: [] for v in V3}
    for vantage, node, failing, dt in script:
        t += dt
        report(eng, t, vantage, failing, node=f"n{node}")
        planner.plan(eng, t)
        for v in V3:
            sent[v] += [(t, n, c) for n, c in planner.take(v, t)]
    span = t - 1.0
    for got in sent.values():
        assert len(got) <= 2 * rate + rate * span + 1e-6
        last: dict[tuple[str, str], float] = {}
        for at, n, c in got:
            if (n, c) in last and cooldown > 0:
                assert at - last[(n, c)] >= cooldown - 1e-9
            last[(n, c)] = at
