"""The pure PoP engine: hysteresis, soft drain, guard, damping, pins, restart adoption."""

from __future__ import annotations

import pytest

from probes.mesh.bgp.pop import Pin, PopEngine, PopPolicy, PopState
from probes.mesh.policy import DampingPolicy
from probes.model import VerdictState as V

pytestmark = pytest.mark.bgp

UP, DEG, DOWN = V.UP, V.DEGRADED, V.DOWN


def engine(pops: int = 3, nodes: int = 2, **policy: object) -> PopEngine:
    members = [(f"p{i}-n{j}", f"p{i}", "node") for i in range(pops) for j in range(nodes)]
    members += [(f"p{i}-any", f"p{i}", "anycast") for i in range(pops)]
    e = PopEngine(PopPolicy(**policy), members)  # type: ignore[arg-type]
    for i in range(pops):
        for j in range(nodes):
            e.on_verdict(f"p{i}-n{j}", UP, 0.0)
    return e


def test_all_nodes_down_withdraws_and_recovery_waits_for_hysteresis() -> None:
    e = engine(up_after_seconds=10.0)
    assert e.on_verdict("p0-n0", DOWN, 1.0)[0].state is PopState.DRAINED
    change = e.on_verdict("p0-n1", DOWN, 2.0)
    assert [(c.pop, c.state) for c in change] == [("p0", PopState.WITHDRAWN)]
    assert "no usable node" in change[0].reasons[0]
    assert e.on_verdict("p0-n0", UP, 5.0) == []  # healthy again, but not for long enough
    assert e.on_verdict("p0-n1", UP, 6.0) == []
    # raw health was DRAINED from t=5 and ANNOUNCED from t=6: ten healthy seconds end at 16
    assert e.tick(15.9) == []
    assert e.next_timer(15.9) == pytest.approx(16.0)
    assert [c.state for c in e.tick(16.0)] == [PopState.ANNOUNCED]


def test_degraded_nodes_soft_drain() -> None:
    e = engine()
    assert [c.state for c in e.on_verdict("p1-n0", DEG, 1.0)] == [PopState.DRAINED]
    assert e.state("p1") is PopState.DRAINED


def test_anycast_checks_alone_can_withdraw() -> None:
    e = engine(nodes=1)
    assert [c.state for c in e.on_verdict("p2-any", DOWN, 1.0)] == [PopState.WITHDRAWN]


def test_unknown_is_no_evidence() -> None:
    e = PopEngine(PopPolicy(), [("n", "p", "node"), ("m", "p", "node")])
    assert e.on_verdict("n", V.UNKNOWN, 1.0) == []
    assert e.state("p") is PopState.ANNOUNCED


def test_guard_never_withdraws_more_than_allowed_and_releases_when_a_slot_frees() -> None:
    e = engine(pops=4, max_withdrawn=1, max_withdrawn_share=0.5, up_after_seconds=0.0)
    for n in ("p0-n0", "p0-n1"):
        e.on_verdict(n, DOWN, 1.0)
    held = [c for n in ("p1-n0", "p1-n1") for c in e.on_verdict(n, DOWN, 2.0)]
    assert e.state("p0") is PopState.WITHDRAWN
    assert e.state("p1") is PopState.DRAINED  # held: still announced
    assert held[-1].held_by_guard and "guard" in held[-1].reasons[-1]
    assert e.guard_holds_total == 1
    assert sum(s is PopState.WITHDRAWN for s in e.states().values()) == 1
    # p0 recovers: p1 may now go
    changes = e.on_verdict("p0-n0", UP, 3.0) + e.on_verdict("p0-n1", UP, 3.0)
    assert {(c.pop, c.state) for c in changes} == {("p0", PopState.DRAINED),
                                                   ("p0", PopState.ANNOUNCED),
                                                   ("p1", PopState.WITHDRAWN)}


def test_share_bound_applies_too() -> None:
    e = engine(pops=3, max_withdrawn=5, max_withdrawn_share=0.34)  # floor(1.02) = 1
    for p in ("p0", "p1"):
        for j in range(2):
            e.on_verdict(f"{p}-n{j}", DOWN, 1.0)
    assert sorted(s.value for s in e.states().values()) == ["ANNOUNCED", "DRAINED", "WITHDRAWN"]


def test_flap_damping_keeps_a_flapping_pop_withdrawn_then_releases() -> None:
    damping = DampingPolicy(penalty=1000, half_life_seconds=60, suppress=1500, reuse=750,
                            max_hold_seconds=600)
    e = engine(nodes=1, up_after_seconds=0.0, damping=damping)
    t = 0.0
    for _ in range(2):  # two flaps: penalty 2000 > suppress 1500
        t += 1
        e.on_verdict("p0-n0", DOWN, t)
        t += 1
        e.on_verdict("p0-n0", UP, t)
    assert e.state("p0") is PopState.WITHDRAWN, "suppressed: healthy, but stays withdrawn"
    release = e.next_timer(t)
    assert release is not None and 60 < release < 200  # log2(~1977/750) half-lives
    assert e.tick(release - 0.1) == []
    assert [c.state for c in e.tick(release)] == [PopState.ANNOUNCED]


def test_pins_override_probes_and_are_audited() -> None:
    e = engine()
    assert [c.state for c in e.pin("p1", Pin.WITHDRAWN, 1.0, who="alice", note="fibre cut")] \
        == [PopState.WITHDRAWN]
    assert e.on_verdict("p1-n0", UP, 2.0) == []  # probes cannot un-pin
    e.pin("p0", Pin.ANNOUNCED, 3.0, who="bob")
    for j in range(2):
        e.on_verdict(f"p0-n{j}", DOWN, 4.0)
    assert e.state("p0") is PopState.ANNOUNCED
    assert e.pin("p1", None, 5.0, who="alice") == []  # healthy since t=0: 10 s hysteresis
    assert [(c.pop, c.state) for c in e.tick(10.0)] == [("p1", PopState.ANNOUNCED)]
    assert [a["who"] for a in e.audit] == ["alice", "bob", "alice"]


def test_pinned_withdrawal_respects_the_guard_unless_forced() -> None:
    e = engine(max_withdrawn=1)
    e.pin("p0", Pin.WITHDRAWN, 1.0, who="a")
    e.pin("p1", Pin.WITHDRAWN, 2.0, who="a")
    assert e.state("p1") is PopState.DRAINED
    e.pin("p1", Pin.WITHDRAWN, 3.0, who="a", force=True)
    assert e.state("p1") is PopState.WITHDRAWN


def test_adopting_the_speakers_state_after_restart_does_not_flap() -> None:
    e = PopEngine(PopPolicy(up_after_seconds=10), [("n", "p", "node")])
    e.adopt("p", PopState.WITHDRAWN, 100.0)
    assert e.tick(101.0) == []
    assert e.on_verdict("n", DOWN, 102.0) == []  # still down: nothing to do
    assert e.on_verdict("n", UP, 103.0) == []
    assert [c.state for c in e.tick(113.0)] == [PopState.ANNOUNCED]
