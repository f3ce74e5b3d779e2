"""The minimum dwell: a node's probe verdict never changes twice within ``min_dwell_seconds``;
a change that comes sooner waits for the dwell (the tick releases it), operator actions do not
wait, and only a change of state is published (sequence numbers move with state changes only).
"""

from __future__ import annotations

import pytest

from probes.mesh.decision import DecisionEngine
from probes.mesh.policy import DampingPolicy, DecisionPolicy, PolicyError, validate_policy
from probes.model import VerdictState
from tests.mesh.helpers import engine, everyone, obs, round_of

pytestmark = pytest.mark.mesh

UP, DOWN, DRAINING = VerdictState.UP, VerdictState.DOWN, VerdictState.DRAINING
DEGRADED = VerdictState.DEGRADED
V3 = ("va", "vb", "vc")
POLICY = DecisionPolicy(rise=1, fall=1, damping=DampingPolicy(enabled=False),
                        min_dwell_seconds=4.0)


def up_engine() -> DecisionEngine:
    eng = engine(1, POLICY)
    assert [c.state for c in round_of(eng, 0.0, everyone(["n0"], V3, True))] == [UP]
    return eng


def report(eng: DecisionEngine, t: float, ok: bool) -> list[VerdictState]:
    return [c.state for c in round_of(eng, t, everyone(["n0"], V3, ok))]


# (time, every vantage's result or "tick") -> published state changes at that time
DWELL_TABLE = [
    # the first verdict after UNKNOWN starts no dwell: DOWN at once
    ([(1.0, False)], [[DOWN]]),
    # DOWN at 1, UP wanted at 2: held until 5 (the tick at 5 releases it)
    ([(1.0, False), (2.0, True), (4.9, "tick"), (5.0, "tick")], [[DOWN], [], [], [UP]]),
    # held, then the node fails again before the dwell ends: nothing was ever published
    ([(1.0, False), (2.0, True), (3.0, False), (6.0, "tick")], [[DOWN], [], [], []]),
    # a change after the dwell is published at once
    ([(1.0, False), (5.5, True)], [[DOWN], [UP]]),
    # a held change is released by the tick after the dwell, not by any observation
    ([(1.0, False), (2.0, True), (5.0, True), (5.0, "tick")], [[DOWN], [], [], [UP]]),
]


@pytest.mark.parametrize(("steps", "expected"), DWELL_TABLE)
def test_dwell_table(steps: list[tuple[float, object]], expected: list[list[VerdictState]]
                     ) -> None:
    eng = up_engine()
    got = []
    for t, what in steps:
        if what == "tick":
            got.append([c.state for c in eng.tick(t)])
        else:
            got.append(report(eng, t, bool(what)))
    assert got == expected


def test_held_change_is_an_audit_note_and_takes_no_seq() -> None:
    eng = up_engine()
    report(eng, 1.0, False)
    eng.take_audit()
    assert report(eng, 2.0, True) == []
    notes = eng.take_audit()
    assert [(n.what, n.node, n.state) for n in notes] == [("dwell-held", "n0", "DOWN")]
    assert eng.nodes["n0"].seq == 2
    assert [c.seq for c in eng.tick(5.0)] == [3]


def test_operator_actions_do_not_wait() -> None:
    eng = up_engine()
    report(eng, 1.0, False)
    assert [c.state for c in eng.set_admin("n0", DRAINING, 1.5, actor="ops")] == [DRAINING]
    assert [c.state for c in eng.set_admin("n0", None, 2.0, actor="ops")] == [DOWN]


def test_dwell_survives_a_snapshot() -> None:
    from probes.mesh.snapshot import dump_engine, load_engine

    eng = up_engine()
    report(eng, 1.0, False)
    report(eng, 2.0, True)  # held
    restored = load_engine(dump_engine(eng))
    assert restored.tick(4.5) == []
    assert [c.state for c in restored.tick(5.0)] == [UP]


def test_dwell_must_not_be_negative() -> None:
    with pytest.raises(PolicyError) as err:
        validate_policy(DecisionPolicy(min_dwell_seconds=-1))
    assert err.value.path == "decision.min_dwell_seconds"


def test_a_failing_node_passing_through_degraded_is_not_held_by_the_dwell() -> None:
    """Seen in the lab: an isolated node's vantages go DOWN at different moments and one probe
    in flight measures loss, so for a moment the vote is DEGRADED (1 down, 1 degraded, 1 up);
    the DOWN half a second later must not wait behind the dwell. A change into DEGRADED waits
    degraded_confirm_seconds, so the node goes UP -> DOWN directly."""
    from probes.model import Quality

    eng = up_engine()
    lossy = Quality(sent=4, received=2, loss_ratio=0.5)
    eng.observe([obs("n0", "va", False, at=1.0), obs("n0", "vb", True, at=1.0, quality=lossy),
                 obs("n0", "vc", True, at=1.0)], 1.0)
    assert eng.nodes["n0"].state == UP  # DEGRADED not confirmed yet
    changes = report(eng, 1.5, False)
    assert changes == [DOWN]


def test_a_quality_problem_that_lasts_is_degraded_after_confirmation() -> None:
    from probes.model import Quality

    eng = up_engine()
    lossy = Quality(sent=4, received=2, loss_ratio=0.5)
    for t in (1.0, 2.0):
        eng.observe([obs("n0", v, True, at=t, quality=lossy) for v in V3], t)
        assert eng.nodes["n0"].state == UP
    assert [c.state for c in eng.tick(1.0 + POLICY.degraded_confirm_seconds)] == [DEGRADED]
