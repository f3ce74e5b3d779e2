"""Table-driven tests of the decision engine, layer by layer."""

from __future__ import annotations

import math
import pickle

import msgspec
import pytest

from probes.mesh.decision import CHECK_DOWN, CHECK_UNKNOWN, CHECK_UP, DecisionEngine
from probes.mesh.policy import (
    DampingPolicy,
    DecisionPolicy,
    ImpairmentPolicy,
    PolicyError,
    PoolGuardPolicy,
    QuorumPolicy,
    policy_from_mapping,
)
from probes.model import Quality, Reason, VerdictState
from tests.mesh.helpers import engine, everyone, fleet, obs, round_of, states

pytestmark = pytest.mark.mesh

UP, DOWN, DEGRADED = VerdictState.UP, VerdictState.DOWN, VerdictState.DEGRADED
V3 = ("va", "vb", "vc")
# no damping and no dwell: the tables go down and back within seconds (the dwell has its own
# tests in tests/mesh/test_dwell.py)
NO_DAMPING = DecisionPolicy(damping=DampingPolicy(enabled=False), min_dwell_seconds=0)

# (results in order, check state after each) with rise 2 / fall 3
RISE_FALL_TABLE = [
    ("ok", "U"),
    ("ok ok", "UU"),
    ("x", "?"),
    ("x x x", "??D"),
    ("ok x x x", "UUUD"),
    ("ok x x ok x x", "UUUUUU"),
    ("ok x x x ok", "UUUDD"),
    ("ok x x x ok ok", "UUUDDU"),
    ("ok x x x ok x ok ok", "UUUDDDDU"),
]
LETTER = {"U": CHECK_UP, "D": CHECK_DOWN, "?": CHECK_UNKNOWN}


@pytest.mark.parametrize(("results", "expected"), RISE_FALL_TABLE)
def test_rise_fall_table(results: str, expected: str) -> None:
    eng = engine(1, NO_DAMPING)
    seen = ""
    for i, r in enumerate(results.split()):
        eng.observe([obs("n0", "va", r == "ok", at=float(i))], float(i))
        check = eng.check_state("n0", "va", "wg")
        seen += next(k for k, v in LETTER.items() if v == check.state)
    assert seen == expected


# k-of-n: down when 3 of the last 5 failed, rise 2
WINDOW_TABLE = [
    ("ok x ok x ok x", "UUUUUD"),
    ("ok x ok ok ok x ok x", "UUUUUUUU"),
    ("ok x x x", "UUUD"),
]


@pytest.mark.parametrize(("results", "expected"), WINDOW_TABLE)
def test_k_of_n_window(results: str, expected: str) -> None:
    policy = DecisionPolicy(window=5, window_failures=3, damping=DampingPolicy(enabled=False))
    eng = engine(1, policy)
    seen = ""
    for i, r in enumerate(results.split()):
        eng.observe([obs("n0", "va", r == "ok")], float(i))
        seen += next(k for k, v in LETTER.items() if v == eng.check_state("n0", "va", "wg").state)
    assert seen == expected


def test_node_goes_down_on_majority_and_back_with_reasons() -> None:
    eng = engine(1, NO_DAMPING)
    changes = round_of(eng, 0, everyone(["n0"], V3, True))
    assert [(c.previous, c.state, c.seq) for c in changes] == [(VerdictState.UNKNOWN, UP, 1)]
    changes = []
    for t in range(1, 4):
        changes += round_of(eng, t, {("n0", "va"): False, ("n0", "vb"): False, ("n0", "vc"): True})
    assert [(c.state, c.seq) for c in changes] == [(DOWN, 2)]
    down = changes[0]
    assert down.votes.down == 2 and down.votes.up == 1
    assert down.reasons[0].what == "vote"
    assert {(r.what, r.vantage) for r in down.reasons[1:]} == {
        ("check-down", "va"),
        ("check-down", "vb"),
    }
    back = []
    for t in range(4, 6):
        back += round_of(eng, t, everyone(["n0"], V3, True))
    assert [(c.previous, c.state, c.seq) for c in back] == [(DOWN, UP, 3)]


def test_alive_but_useless_is_down() -> None:
    eng = engine(1, NO_DAMPING)
    changes = []
    for t in range(4):
        batch = []
        for v in V3:
            batch.append(obs("n0", v, True, check="udp", kind="udp", at=t))
            batch.append(obs("n0", v, t == 0, check="hs", kind="wireguard.handshake", at=t))
        changes = eng.observe(batch, float(t))
    assert eng.nodes["n0"].state == DOWN
    cascade = [r for r in changes[0].reasons if r.what == "tier-cascade"]
    assert len(cascade) == 3
    assert "alive but useless" in cascade[0].note and cascade[0].check == "hs"


def test_quality_bounds_give_degraded_not_down() -> None:
    eng = engine(1, NO_DAMPING)
    lossy = Quality(sent=1000, received=990, loss_ratio=0.01, rtt_p99_seconds=0.02)
    slow = Quality(sent=100, received=100, loss_ratio=0.0, rtt_p99_seconds=0.3)
    changes = eng.observe(
        [
            obs("n0", "va", True, quality=lossy),
            obs("n0", "vb", False, reason=Reason.TUNNEL_RTT, quality=slow),
            obs("n0", "vc", True),
        ],
        0.0,
    )
    assert [c.state for c in changes] == [DEGRADED]
    bounds = {
        (r.vantage, r.reason, r.value, r.bound)
        for r in changes[0].reasons
        if r.what == "quality-bound"
    }
    assert bounds == {("va", "loss", 0.01, 0.001), ("vb", "rtt-p99", 0.3, 0.15)}


def test_percent_mode_route53() -> None:
    # healthy if more than 18 % of voters see it healthy: 1 of 5 up (20 %) keeps it UP
    policy = DecisionPolicy(
        quorum=QuorumPolicy(mode="percent", healthy_percent=18),
        damping=DampingPolicy(enabled=False),
    )
    vantages = [f"v{i}" for i in range(5)]
    eng = engine(1, policy)
    round_of(eng, 0, everyone(["n0"], vantages, True))
    for t in range(1, 4):
        round_of(eng, t, {("n0", v): v == "v0" for v in vantages})
    assert eng.nodes["n0"].state == UP
    for t in range(4, 7):
        round_of(eng, t, everyone(["n0"], vantages, False))
    assert eng.nodes["n0"].state == DOWN


def test_stale_vantages_lose_quorum_and_keep_verdict() -> None:
    eng = engine(1, DecisionPolicy(stale_after_seconds=10))
    round_of(eng, 0, everyone(["n0"], V3, True))
    round_of(eng, 5, {("n0", "va"): True})
    eng.take_audit()
    # vb, vc are stale; va alone is below min_voters 2: the verdict is kept, and the loss of
    # quorum changes no published state, so it is an audit note, not a verdict record
    assert eng.tick(12.0) == []
    assert eng.nodes["n0"].quorum_lost
    assert [(n.what, n.node, n.state) for n in eng.take_audit()] == [("quorum-lost", "n0", "UP")]
    for t in range(13, 20):  # va alone says down: no change without quorum
        assert round_of(eng, t, {("n0", "va"): False}) == []
    assert eng.nodes["n0"].state == UP and eng.nodes["n0"].quorum_lost
    assert round_of(eng, 20, everyone(["n0"], V3, True)) == []
    assert not eng.nodes["n0"].quorum_lost
    assert [n.what for n in eng.take_audit()] == ["quorum-regained"]
    assert eng.nodes["n0"].seq == 1  # the seq moved only with the one change of state


def test_never_decided_without_quorum_is_unknown() -> None:
    eng = engine(1)
    assert round_of(eng, 0, {("n0", "va"): True}) == []
    assert eng.nodes["n0"].state == VerdictState.UNKNOWN and eng.nodes["n0"].quorum_lost


def test_impaired_vantage_is_excluded() -> None:
    vantages = [f"v{i}" for i in range(5)]
    nodes = [f"n{i}" for i in range(10)]
    for exclude in (True, False):
        # with down_share 1.01 no vantage can ever be impaired: the control run
        imp = ImpairmentPolicy(
            down_share=0.5 if exclude else 1.0, min_nodes=3 if exclude else 10**6
        )
        eng = engine(10, DecisionPolicy(impairment=imp, damping=DampingPolicy(enabled=False)))
        round_of(eng, 0, everyone(nodes, vantages, True))
        # v4 is cut off: it sees the whole fleet down (its checks from t=3) while the others
        # pass; it is impaired once contradicted for confirm_seconds
        for t in range(1, 7):
            picture = everyone(nodes, vantages, True)
            picture.update({(n, "v4"): False for n in nodes})
            round_of(eng, t, picture)
        assert eng.vantages["v4"].impaired is exclude
        for t in range(7, 10):
            picture = everyone(nodes, vantages, True)
            picture[("n3", "v0")] = picture[("n3", "v1")] = False  # two honest vantages see n3 down
            picture.update({(n, "v4"): False for n in nodes})  # v4 still sees everything down
            round_of(eng, t, picture)
        assert eng.vantages["v4"].impaired is exclude
        expected_n3 = UP if exclude else DOWN  # 2 of 4 voters vs 3 of 5
        assert eng.nodes["n3"].state == expected_n3
        assert all(s == UP for n, s in states(eng).items() if n != "n3")


def test_fleet_wide_outage_is_not_impairment() -> None:
    nodes = [f"n{i}" for i in range(6)]
    eng = engine(
        6,
        DecisionPolicy(
            pool_guard=PoolGuardPolicy(max_down_share=1.0), damping=DampingPolicy(enabled=False)
        ),
    )
    round_of(eng, 0, everyone(nodes, V3, True))
    for t in range(1, 4):
        round_of(eng, t, everyone(nodes, V3, False))
    assert not any(v.impaired for v in eng.vantages.values())
    assert set(states(eng).values()) == {DOWN}


def test_pool_guard_holds_and_releases() -> None:
    nodes = [f"n{i}" for i in range(10)]
    eng = engine(
        10,
        DecisionPolicy(
            pool_guard=PoolGuardPolicy(max_down_share=0.3), damping=DampingPolicy(enabled=False),
            min_dwell_seconds=0,
        ),
    )
    round_of(eng, 0, everyone(nodes, V3, True))
    for t in range(1, 4):
        round_of(eng, t, everyone(nodes, V3, False))
    down = [n for n, s in states(eng).items() if s == DOWN]
    assert len(down) == 3
    assert sum(node.guard_hold for node in eng.nodes.values()) == 7
    assert eng.guard_holds_total == 7
    # one of the DOWN nodes recovers: exactly one held node takes its place
    for t in range(4, 6):
        picture = everyone(nodes, V3, False)
        picture.update({(down[0], v): True for v in V3})
        round_of(eng, t, picture)
    now_down = [n for n, s in states(eng).items() if s == DOWN]
    assert len(now_down) == 3 and down[0] not in now_down


def test_flap_damping_suppresses_then_releases() -> None:
    damping = DampingPolicy(
        penalty=1000, half_life_seconds=60, suppress=2000, reuse=750, max_hold_seconds=600
    )
    eng = engine(1, DecisionPolicy(damping=damping))
    round_of(eng, 0, everyone(["n0"], V3, True))
    t = 2.0
    flaps = 0
    # every vantage flaps: 3 failures (down), 2 successes (up), every 10 s; the third flap
    # brings the penalty to 1000 + 1000 * 2^(-1/6) + 1000 * 2^(-2/6) > 2000
    while flaps < 3:
        for ok in (False, False, False, True, True):
            round_of(eng, t, everyone(["n0"], V3, ok))
            t += 2
        flaps += 1
    node = eng.nodes["n0"]
    check = eng.check_state("n0", "va", "wg")
    assert check.state == CHECK_UP and check.effective(t) == CHECK_DOWN
    assert node.state == DOWN  # held down although every check passes
    assert any(r.what == "flap-damping" for r in (node.last.reasons if node.last else []))
    release = check.suppressed_until
    # still suppressed just before release even though every vantage keeps passing
    while t < release - 1:
        round_of(eng, t, everyone(["n0"], V3, True))
        t += 5
    assert node.state == DOWN
    eng.tick(release - 0.5)
    assert node.state == DOWN
    changes = eng.tick(release)
    assert [(c.previous, c.state) for c in changes] == [(DOWN, UP)]
    # the release time is where the penalty decays to reuse
    decayed = check.penalty * 2 ** (-(release - check.penalty_at) / 60)
    assert decayed == pytest.approx(750, rel=1e-6)


def test_damping_max_hold_caps_suppression() -> None:
    damping = DampingPolicy(
        penalty=5000, half_life_seconds=10, suppress=2000, reuse=750, max_hold_seconds=30
    )
    eng = engine(1, DecisionPolicy(damping=damping))
    round_of(eng, 0, everyone(["n0"], V3, True))
    for t in (1, 2, 3):  # flap 1 at t=3: penalty 5000, suppressed from 3
        round_of(eng, t, everyone(["n0"], V3, False))
    check = eng.check_state("n0", "va", "wg")
    assert check.suppressed_until == pytest.approx(3 + 10 * math.log2(5000 / 750))
    for t in (4, 5, 6, 7, 8):  # flap 2 at t=8 while suppressed: penalty at the ceiling 6000
        round_of(eng, t, everyone(["n0"], V3, t > 5))
    for t in (9, 10, 11):
        round_of(eng, t, everyone(["n0"], V3, False))
    assert check.penalty == pytest.approx(6000)
    assert check.suppressed_until == pytest.approx(3 + 30)  # 11 + 30 capped by max hold


def test_damping_that_could_never_suppress_is_rejected() -> None:
    with pytest.raises(PolicyError) as info:
        policy_from_mapping({"damping": {"half_life_seconds": 600, "max_hold_seconds": 30}})
    assert info.value.path == "decision.damping.max_hold_seconds"


def test_admin_drain_is_respected_and_ready_restores_probe_verdict() -> None:
    eng = engine(1, NO_DAMPING)
    round_of(eng, 0, everyone(["n0"], V3, True))
    changes = eng.set_admin("n0", VerdictState.DRAINING, 1.0, actor="alice")
    assert [(c.previous, c.state) for c in changes] == [(UP, VerdictState.DRAINING)]
    assert changes[0].reasons[0].what == "admin" and "alice" in changes[0].reasons[0].note
    for t in range(2, 6):
        assert round_of(eng, t, everyone(["n0"], V3, False)) == []
    assert eng.nodes["n0"].probe_state == DOWN
    changes = eng.set_admin("n0", None, 7.0)
    assert [(c.previous, c.state) for c in changes] == [(VerdictState.DRAINING, DOWN)]
    with pytest.raises(KeyError):
        eng.set_admin("nope", VerdictState.MAINTENANCE, 8.0)
    with pytest.raises(ValueError, match="admin state"):
        eng.set_admin("n0", VerdictState.UP, 8.0)


def test_unknown_nodes_and_duplicates_are_counted_not_applied() -> None:
    eng = engine(1)
    eng.observe([obs("ghost", "va", False)], 0)
    first = obs("n0", "va", True, seq=5)
    eng.observe([first, obs("n0", "va", False, seq=5), obs("n0", "va", False, seq=4)], 0)
    assert eng.unknown_node_total == 1 and eng.duplicate_total == 2
    assert eng.check_state("n0", "va", "wg").count == 0


def test_node_view_and_pickle_round_trip() -> None:
    eng = engine(2, NO_DAMPING)
    round_of(eng, 0, everyone(["n0", "n1"], V3, True))
    view = eng.node_view("n0", 1.0)
    assert view["state"] == "UP" and set(view["vantages"]) == set(V3)
    assert view["vantages"]["va"]["checks"]["wg"]["effective"] == "UP"
    copy: DecisionEngine = pickle.loads(pickle.dumps(eng))
    a = [
        msgspec.json.encode(c)
        for t in range(1, 5)
        for c in round_of(eng, t, everyone(["n0"], V3, False))
    ]
    b = [
        msgspec.json.encode(c)
        for t in range(1, 5)
        for c in round_of(copy, t, everyone(["n0"], V3, False))
    ]
    assert a == b and len(a) == 1


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"rise": 0}, "decision.rise"),
        ({"window": 5}, "decision.window_failures"),
        ({"window_failures": 2}, "decision.window_failures"),
        ({"damping": {"suppress": 100}}, "decision.damping.suppress"),
        ({"quorum": {"mode": "plurality"}}, "decision.quorum.mode"),
        ({"quorum": {"min_voters": 0}}, "decision.quorum.min_voters"),
        ({"pool_guard": {"max_down_share": 1.5}}, "decision.pool_guard.max_down_share"),
        ({"stale_after_seconds": "soon"}, "decision.stale_after_seconds"),
        ({"tiers": {"tcp": "l7"}}, "decision.tiers"),
        ({"bogus": 1}, "decision"),
        ({"damping": {"suppress": float("nan")}}, "decision.damping.suppress"),
        ({"max_age_seconds": float("inf")}, "decision.max_age_seconds"),
    ],
)
def test_policy_errors_name_the_field(data: dict[str, object], path: str) -> None:
    with pytest.raises(PolicyError) as info:
        policy_from_mapping(data)
    assert info.value.path.startswith(path)


def test_policy_defaults_and_tiers() -> None:
    policy = policy_from_mapping(None)
    assert (policy.rise, policy.fall, policy.quality.max_loss_ratio) == (2, 3, 0.001)
    assert policy.tier_of("tcp").value == "l4"
    assert policy.tier_of("wireguard.handshake").value == "functional"
    assert policy.tier_of("wireguard.session").value == "session"
    assert policy.tier_of("something-new").value == "functional"
    assert len(fleet(4, 2)) == 4


def test_late_observations_are_not_evidence_of_the_present() -> None:
    eng = engine(1, DecisionPolicy(max_age_seconds=60))
    eng.observe([obs("n0", v, True, at=1000.0) for v in V3], 1000.0)
    spooled = [obs("n0", v, False, at=900.0) for v in V3 for _ in range(3)]
    assert eng.observe(spooled, 1001.0) == []
    assert eng.late_total == 9 and eng.nodes["n0"].state == UP
    keep_all = engine(1, DecisionPolicy(max_age_seconds=0))
    keep_all.observe([obs("n0", "va", True, at=0.0)], 1e9)
    assert keep_all.late_total == 0


def test_agent_side_failures_are_no_evidence_about_the_node() -> None:
    """`overloaded` and `probe-error` mean the agent could not run or time the check."""
    from probes.model import Reason

    eng = engine(1, DecisionPolicy(fall=1))
    for v in ("a", "b", "c"):
        eng.observe([obs("n0", v, ok=True, seq=1)], 1.0)
    assert states(eng)["n0"] == VerdictState.UP
    for seq, reason in enumerate((Reason.OVERLOADED, Reason.PROBE_ERROR), start=2):
        changes = eng.observe([obs("n0", v, ok=False, seq=seq, reason=reason)
                               for v in ("a", "b", "c")], float(seq))
        assert changes == []
    assert states(eng)["n0"] == VerdictState.UP
    assert eng.agent_side_total == 6
    assert eng.observe([obs("n0", v, ok=False, seq=9) for v in ("a", "b", "c")], 9.0)
