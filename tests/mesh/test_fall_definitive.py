"""``fall_definitive``: a run of definitive failures (RST, ICMP unreachable) takes a check down
sooner than timeouts do.

Random loss can turn an answer into a timeout but cannot fabricate a "nothing listens here"
answer, so ``fall_definitive`` (2) such answers in a row take a check down where timeouts need
``fall`` (3). Per vantage only: one vantage still cannot take a node down alone, coming back
still takes ``rise`` successes, and damping still counts the flap.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.mesh.decision import CHECK_DOWN, CHECK_UNKNOWN, CHECK_UP, DecisionEngine
from probes.mesh.policy import (
    DampingPolicy,
    DecisionPolicy,
    PolicyError,
    policy_from_mapping,
    validate_policy,
)
from probes.mesh.state import OP_DOWN
from probes.model import Reason, VerdictState
from tests.mesh.helpers import engine, obs

pytestmark = pytest.mark.mesh

V3 = ("va", "vb", "vc")
R, U, T = Reason.REFUSED, Reason.ICMP_UNREACHABLE, Reason.TIMEOUT
OK = Reason.OK
NO_DAMPING = DampingPolicy(enabled=False)


def settled_up(policy: DecisionPolicy) -> DecisionEngine:
    eng = engine(1, policy)
    eng.observe([obs("n0", v, True, at=0.0) for v in V3], 0.0)
    assert eng.nodes["n0"].state == VerdictState.UP
    return eng


def play(eng: DecisionEngine, vantages: tuple[str, ...], results: list[Reason],
         start: float = 1.0) -> float:
    """Each vantage reports the same results, one round per 0.25 s; returns the last time."""
    t = start
    for reason in results:
        ok = reason == OK
        eng.observe([obs("n0", v, ok, reason=None if ok else reason, at=t) for v in vantages], t)
        t += 0.25
    return t


@pytest.mark.parametrize(
    ("policy", "results", "down"),
    [
        # the defaults: fall 3, fall_definitive 2 (RST / ICMP unreachable)
        (DecisionPolicy(), [R, R], True),
        (DecisionPolicy(), [U, U], True),
        (DecisionPolicy(), [R, U], True),  # both definitive: the kinds may differ
        (DecisionPolicy(), [T, T], False),  # timeouts keep fall 3
        (DecisionPolicy(), [T, T, T], True),
        (DecisionPolicy(), [T, R], False),  # the run of definitive answers is one long
        (DecisionPolicy(), [R, T], False),
        (DecisionPolicy(), [R, T, R], True),  # three failures in a row: fall
        (DecisionPolicy(), [R, OK, R], False),  # a success breaks the run
        (DecisionPolicy(), [R], False),
        (DecisionPolicy(), [Reason.AUTH_FAILED, Reason.AUTH_FAILED], False),  # not in the set
        # switched off, or set at fall: fall alone decides
        (DecisionPolicy(fall_definitive=0), [R, R], False),
        (DecisionPolicy(fall_definitive=0), [R, R, R], True),
        (DecisionPolicy(fall_definitive=3), [R, R], False),
        # one definitive answer suffices
        (DecisionPolicy(fall_definitive=1), [R], True),
        (DecisionPolicy(fall_definitive=1), [T], False),
        # a custom set
        (DecisionPolicy(definitive_reasons=(Reason.AUTH_FAILED,)),
         [Reason.AUTH_FAILED, Reason.AUTH_FAILED], True),
        (DecisionPolicy(definitive_reasons=(Reason.AUTH_FAILED,)), [R, R], False),
        # a k-of-n window replaces fall and fall_definitive
        (DecisionPolicy(window=5, window_failures=3), [R, R], False),
        (DecisionPolicy(window=5, window_failures=3), [R, OK, R, R], True),
    ],
)
def test_when_definitive_failures_take_the_node_down(
        policy: DecisionPolicy, results: list[Reason], down: bool) -> None:
    eng = settled_up(validate_policy(policy))
    play(eng, ("va", "vb"), results)
    assert (eng.nodes["n0"].state == VerdictState.DOWN) is down


def test_one_vantage_answering_refused_cannot_take_the_node_down() -> None:
    eng = settled_up(DecisionPolicy(fall_definitive=1))
    play(eng, ("va",), [R] * 10)
    assert eng.nodes["n0"].nvs["va"].opinion == OP_DOWN
    assert eng.nodes["n0"].state == VerdictState.UP


def test_down_by_definitive_answers_still_needs_rise_and_counts_a_flap() -> None:
    eng = settled_up(DecisionPolicy(min_dwell_seconds=0))  # damping on; no dwell: back in 0.5 s
    t = play(eng, ("va", "vb"), [R, R])
    assert eng.nodes["n0"].state == VerdictState.DOWN
    check = eng.nodes["n0"].nvs["va"].checks[0]
    assert check.penalty == pytest.approx(1000.0)
    t = play(eng, ("va", "vb"), [OK], start=t)
    assert eng.nodes["n0"].state == VerdictState.DOWN  # rise 2
    play(eng, ("va", "vb"), [OK], start=t)
    assert eng.nodes["n0"].state == VerdictState.UP


def test_the_evidence_names_the_definitive_reason() -> None:
    eng = settled_up(DecisionPolicy())
    eng.observe([obs("n0", v, False, reason=R, at=1.0) for v in ("va", "vb")], 1.0)
    changes = eng.observe([obs("n0", v, False, reason=R, at=1.25) for v in ("va", "vb")], 1.25)
    assert [c.state for c in changes] == [VerdictState.DOWN]
    downs = {(r.vantage, r.reason) for r in changes[0].reasons if r.what == "check-down"}
    assert downs == {("va", "refused"), ("vb", "refused")}


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize("value", [-1, 65])
def test_fall_definitive_out_of_range_is_rejected(value: int) -> None:
    with pytest.raises(PolicyError) as err:
        validate_policy(DecisionPolicy(fall_definitive=value))
    assert err.value.path == "decision.fall_definitive"


@pytest.mark.parametrize(
    "reason", [Reason.OK, Reason.TUNNEL_LOSS, Reason.TUNNEL_RTT, Reason.OVERLOADED,
               Reason.PROBE_ERROR])
def test_a_reason_that_is_no_answer_from_the_node_is_rejected(reason: Reason) -> None:
    with pytest.raises(PolicyError) as err:
        validate_policy(DecisionPolicy(definitive_reasons=(Reason.REFUSED, reason)))
    assert err.value.path == "decision.definitive_reasons"
    assert reason.value in str(err.value)


def test_config_mapping_names_the_field() -> None:
    got = policy_from_mapping({"fall_definitive": 1, "definitive_reasons": ["refused"]})
    assert got.fall_definitive == 1 and got.definitive_reasons == (Reason.REFUSED,)
    with pytest.raises(PolicyError) as err:
        policy_from_mapping({"definitive_reasons": ["no-such-reason"]})
    assert err.value.path.startswith("decision.definitive_reasons")
    with pytest.raises(PolicyError) as err:
        policy_from_mapping({"fall_definitive": 100})
    assert err.value.path == "decision.fall_definitive"


# ---------------------------------------------------------------------- properties

results = st.lists(st.sampled_from([OK, R, U, T, Reason.BAD_RESPONSE]), max_size=30)


def model(fall: int, fall_definitive: int, rise: int, script: list[Reason]) -> int:
    """The rule, written the slow and obvious way: the check's state after ``script``."""
    state = CHECK_UNKNOWN
    run: list[Reason] = []  # results since the last transition, against the current state
    for reason in script:
        ok = reason == OK
        if state == CHECK_UNKNOWN and ok:
            state, run = CHECK_UP, []
            continue
        if state == CHECK_DOWN:
            run = [*run, reason] if ok else []
            if len(run) >= rise:
                state, run = CHECK_UP, []
            continue
        run = [] if ok else [*run, reason]
        tail = run[-fall_definitive:] if fall_definitive else []
        by_definitive = (fall_definitive > 0 and len(tail) == fall_definitive
                         and all(r in (R, U) for r in tail))
        if len(run) >= fall or by_definitive:
            state, run = CHECK_DOWN, []
    return state


@settings(max_examples=500, deadline=None)
@given(fall=st.integers(1, 5), fall_definitive=st.integers(0, 5), rise=st.integers(1, 3),
       script=results)
def test_check_state_follows_the_rule(fall: int, fall_definitive: int, rise: int,
                                      script: list[Reason]) -> None:
    policy = validate_policy(DecisionPolicy(fall=fall, fall_definitive=fall_definitive,
                                            rise=rise, damping=NO_DAMPING))
    eng = engine(1, policy)
    for i, reason in enumerate(script):
        ok = reason == OK
        eng.observe([obs("n0", "va", ok, reason=None if ok else reason, at=float(i))], float(i))
    got = eng.nodes["n0"].nvs["va"].checks[0].state if script else CHECK_UNKNOWN
    assert got == model(fall, fall_definitive, rise, script)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(V3), st.sampled_from([OK, R, U, T])), max_size=60))
def test_no_node_down_unless_a_majority_of_vantages_sees_it_down(
        script: list[tuple[str, Reason]]) -> None:
    # no dwell: it would keep a node DOWN a little after its majority is gone (on purpose)
    eng = settled_up(DecisionPolicy(fall_definitive=1, damping=NO_DAMPING, min_dwell_seconds=0))
    for i, (vantage, reason) in enumerate(script):
        ok = reason == OK
        t = 1.0 + i * 0.25
        eng.observe([obs("n0", vantage, ok, reason=None if ok else reason, at=t)], t)
        down = sum(nv.opinion == OP_DOWN for nv in eng.nodes["n0"].nvs.values())
        if eng.nodes["n0"].state == VerdictState.DOWN:
            assert down * 2 > len(V3)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=20))
def test_single_definitive_answers_between_successes_change_nothing(oks: list[int]) -> None:
    """With fall_definitive 2, one RST at a time (a daemon restarting) never takes it down."""
    eng = settled_up(DecisionPolicy())
    t = 1.0
    for n in oks:
        t = play(eng, V3, [R] + [OK] * n, start=t)
        assert eng.nodes["n0"].state == VerdictState.UP
    assert all(c.state == CHECK_UP for nv in eng.nodes["n0"].nvs.values() for c in nv.checks)
