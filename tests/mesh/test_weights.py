"""The weight engine: table tests of each rule, then hypothesis properties over random load
and state scripts (monotone in load, bounded steps, dead band, guard, slow start, DEGRADED cap,
snapshot continuity)."""

from __future__ import annotations

import itertools
import math

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.mesh.policy import PolicyError
from probes.mesh.weight_policy import SignalSteps, Step, WeightPolicy, validate_weight_policy
from probes.mesh.weights import WeightEngine, WeightNode
from probes.model import NodeLoad, VerdictState, WeightChange, WeightReason

pytestmark = pytest.mark.mesh

UP, DEGRADED, DOWN = VerdictState.UP, VerdictState.DEGRADED, VerdictState.DOWN
DRAINING, MAINT = VerdictState.DRAINING, VerdictState.MAINTENANCE
# one signal at a time, no smoothing lag worth speaking of, no rate limit: the table shows
ONLY_CPU = WeightPolicy(enabled=True, half_life_seconds=1e-9, max_step_percent=100.0,
                        steps=[SignalSteps("cpu", [Step(0.75, 0.2), Step(0.85, 0.5)])],
                        step_hysteresis=0.0, dead_band_percent=0.0, guard_share=0.0)


def pool(n: int = 3, policy: WeightPolicy | None = None,
         capacity: tuple[float, ...] = ()) -> WeightEngine:
    nodes = [WeightNode(f"n{i}", "p", capacity[i] if capacity else 1.0) for i in range(n)]
    return WeightEngine(policy or WeightPolicy(enabled=True), nodes)


def up_all(eng: WeightEngine, now: float = 0.0) -> None:
    for name in eng.nodes:
        eng.set_state(name, UP, now)


def cpu(value: float, **more: float) -> NodeLoad:
    return NodeLoad(interval_seconds=1.0, cpu_busy_ratio=value, **more)  # type: ignore[arg-type]


def published(eng: WeightEngine) -> dict[str, int | None]:
    return {name: node.published for name, node in eng.nodes.items()}


# ---- the step table (the brief's defaults) --------------------------------------------------

@pytest.mark.parametrize(("busy", "weight"), [
    (0.0, 100), (0.5, 100), (0.749, 100), (0.75, 80), (0.80, 80), (0.849, 80), (0.85, 50),
    (0.99, 50), (1.0, 50),
])
def test_cpu_steps_are_the_briefs(busy: float, weight: int) -> None:
    eng = pool(1, ONLY_CPU)
    up_all(eng)
    eng.load([("n0", cpu(busy))], 1.0)
    eng.tick(1.0)
    assert published(eng)["n0"] == weight


def test_default_policy_has_the_briefs_steps_and_drop_and_session_bounds() -> None:
    tables = {(t.signal, t.relative): t for t in WeightPolicy().steps}
    assert tables[("cpu", False)].steps == [Step(0.75, 0.2), Step(0.85, 0.5)]
    assert tables[("drops", False)].steps == [Step(0.001, 0.2), Step(0.01, 0.5)]
    sessions = tables[("effective_sessions", True)]
    assert sessions.steps == [Step(0.9, 0.0), Step(1.1, 0.9)] and sessions.proportional


@pytest.mark.parametrize(("drops", "packets", "weight"), [
    (0.0, 10_000.0, 100), (5.0, 10_000.0, 100), (10.0, 9_990.0, 80), (99.0, 9_901.0, 80),
    (100.0, 9_900.0, 50), (50.0, 0.0, 50),
])
def test_drop_share_steps(drops: float, packets: float, weight: int) -> None:
    policy = msgspec.structs.replace(
        ONLY_CPU, steps=[SignalSteps("drops", [Step(0.001, 0.2), Step(0.01, 0.5)])])
    eng = pool(1, policy)
    up_all(eng)
    eng.load([("n0", NodeLoad(1.0, softnet_drops_per_second=drops,
                              packets_per_second=packets))], 1.0)
    eng.tick(1.0)
    assert published(eng)["n0"] == weight


def test_effective_sessions_are_relative_to_the_pool_per_unit_of_capacity() -> None:
    policy = msgspec.structs.replace(ONLY_CPU, steps=[
        SignalSteps("effective_sessions", [Step(1.25, 0.2), Step(1.5, 0.5)], relative=True)])
    # n2 has twice the capacity: 40 sessions on it is as busy as 20 on the others
    eng = pool(3, policy, capacity=(1.0, 1.0, 2.0))
    up_all(eng)
    loads = {"n0": 30.0, "n1": 10.0, "n2": 40.0}  # per capacity: 30, 10, 20 -> mean 20
    eng.load([(n, NodeLoad(1.0, effective_sessions=v)) for n, v in loads.items()], 1.0)
    eng.tick(1.0)
    assert published(eng) == {"n0": 50, "n1": 100, "n2": 100}  # n0 at 1.5x the mean
    reasons = {r.what: r for r in eng.nodes["n0"].reasons}
    assert reasons["effective_sessions-share"].value == 1.5
    assert reasons["effective_sessions-share"].cut == 0.5


def test_an_idle_pool_is_not_compared() -> None:
    """Below the table's min_mean the ratios are noise (a decaying average is never exactly 0:
    without the bound a node whose clients left stayed "twice as busy" as idle peers)."""
    policy = msgspec.structs.replace(ONLY_CPU, steps=[
        SignalSteps("effective_sessions", [Step(1.5, 0.5)], relative=True, min_mean=1.0)])
    eng = pool(2, policy)
    up_all(eng)
    eng.load([("n0", NodeLoad(1.0, effective_sessions=0.02)),
              ("n1", NodeLoad(1.0, effective_sessions=0.001))], 1.0)
    eng.tick(1.0)
    assert published(eng) == {"n0": 100, "n1": 100}
    eng.load([("n0", NodeLoad(1.0, effective_sessions=2.0)),
              ("n1", NodeLoad(1.0, effective_sessions=0.5))], 2.0)
    eng.tick(2.0)  # mean 1.25: compared now, n0 at 1.6x
    assert published(eng) == {"n0": 50, "n1": 100}


def test_one_node_alone_has_nothing_to_be_relative_to() -> None:
    policy = msgspec.structs.replace(ONLY_CPU, steps=[
        SignalSteps("effective_sessions", [Step(1.25, 0.2)], relative=True)])
    eng = pool(1, policy)
    up_all(eng)
    eng.load([("n0", NodeLoad(1.0, effective_sessions=500.0))], 1.0)
    eng.tick(1.0)
    assert published(eng)["n0"] == 100


def test_a_proportional_table_interpolates_between_its_steps() -> None:
    eng = pool(1, msgspec.structs.replace(ONLY_CPU, steps=[
        SignalSteps("cpu", [Step(0.5, 0.0), Step(0.7, 0.4), Step(0.9, 0.8)], proportional=True)]))
    up_all(eng)
    seen = []
    for t, busy in enumerate([0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.45], start=1):
        eng.load([("n0", cpu(busy))], float(t))
        eng.tick(float(t))
        seen.append(published(eng)["n0"])
    assert seen == [100, 100, 80, 60, 40, 20, 20, 100]  # no hysteresis: straight back
    eng.load([("n0", cpu(0.8))], 9.0)
    eng.tick(9.0)
    assert eng.nodes["n0"].reasons[0] == WeightReason("cpu", value=0.8, bound=0.7, cut=0.6)


def test_relative_cuts_are_a_preference_the_least_cut_node_keeps_full_weight() -> None:
    """A pool whose nodes are all near its mean: the default band cuts each of them, but only
    their differences matter to a balancer, so the least-cut node stays at 100 and the others
    keep their ratio to it (no pool of nodes all at 55 %, no guard tripped by a preference)."""
    eng = pool(3, msgspec.structs.replace(ONLY_CPU, steps=WeightPolicy().steps))
    up_all(eng)
    eng.load([(n, NodeLoad(1.0, effective_sessions=v))
              for n, v in (("n0", 10.0), ("n1", 10.5), ("n2", 11.0))], 1.0)
    eng.tick(1.0)
    # shares 0.952, 1.0, 1.048 of the mean: raw cuts 0.236, 0.45, 0.664 of the band 0.9..1.1
    assert published(eng) == {"n0": 100, "n1": 72, "n2": 44}
    (reason,) = eng.nodes["n2"].reasons
    assert reason.what == "effective_sessions-share" and reason.cut == pytest.approx(0.5607, 1e-3)
    assert reason.note == "beside the pool's least cut 0.235714"
    assert eng.nodes["n0"].reasons == []


def test_deepest_cut_of_all_signals_decides() -> None:
    eng = pool(1, msgspec.structs.replace(ONLY_CPU, steps=WeightPolicy().steps))
    up_all(eng)
    # CPU at the first step (-20 %), drops at the second (-50 %): -50 % wins
    eng.load([("n0", cpu(0.8, softnet_drops_per_second=20.0, packets_per_second=980.0))], 1.0)
    eng.tick(1.0)
    assert published(eng)["n0"] == 50
    whats = [r.what for r in eng.nodes["n0"].reasons]
    assert whats == ["cpu", "drops"]


def test_hysteresis_keeps_a_step_until_the_signal_falls_clearly_below_it() -> None:
    eng = pool(1, msgspec.structs.replace(ONLY_CPU, step_hysteresis=0.05))
    up_all(eng)
    seen = []
    for t, busy in enumerate([0.76, 0.74, 0.72, 0.715, 0.70, 0.76], start=1):
        eng.load([("n0", cpu(busy))], float(t))
        eng.tick(float(t))
        seen.append(published(eng)["n0"])
    # 0.75 * 0.95 = 0.7125: 0.74 and 0.72 keep the step, 0.70 leaves it
    assert seen == [80, 80, 80, 80, 100, 80]


def test_ewma_half_life() -> None:
    policy = msgspec.structs.replace(ONLY_CPU, half_life_seconds=2.0)
    eng = pool(1, policy)
    up_all(eng)
    eng.load([("n0", cpu(0.0))], 0.0)
    eng.load([("n0", cpu(1.0))], 2.0)  # one half-life later: halfway
    assert eng.nodes["n0"].ewma["cpu"] == pytest.approx(0.5)
    eng.load([("n0", cpu(1.0))], 4.0)
    assert eng.nodes["n0"].ewma["cpu"] == pytest.approx(0.75)


def test_stale_load_lapses_and_a_new_sample_starts_afresh() -> None:
    policy = msgspec.structs.replace(ONLY_CPU, load_stale_after_seconds=5.0,
                                     half_life_seconds=10.0)
    eng = pool(1, policy)
    up_all(eng)
    eng.load([("n0", cpu(0.9))], 1.0)
    eng.tick(1.0)
    assert published(eng)["n0"] == 50
    eng.tick(7.0)  # 6 s without load: no evidence, no cut
    assert published(eng)["n0"] == 100
    assert [r.what for r in eng.nodes["n0"].reasons] == ["load-stale"]
    eng.load([("n0", cpu(0.1))], 20.0)  # not averaged with the old 0.9
    assert eng.nodes["n0"].ewma["cpu"] == 0.1


# ---- states: caps, slow start, zero ----------------------------------------------------------

def test_states_cap_at_once_and_degraded_keeps_load_cuts_under_its_cap() -> None:
    eng = pool(1, msgspec.structs.replace(WeightPolicy(enabled=True), slow_start_seconds=0.0))
    up_all(eng)
    assert published(eng)["n0"] == 100
    changes = eng.set_state("n0", DEGRADED, 1.0)
    assert [c.weight for c in changes] == [50]
    eng.load([("n0", cpu(0.9))], 2.0)
    for t in range(2, 6):
        eng.tick(float(t))
    assert published(eng)["n0"] == 50  # the -50 % of the load is not below the cap of 50
    for state in (DOWN, DRAINING, MAINT):
        eng.set_state("n0", UP, 10.0)
        changes = eng.set_state("n0", state, 10.0)
        assert changes[-1].weight == 0 and changes[-1].state == state
        assert changes[-1].reasons[0].what == "state"


def test_unknown_nodes_publish_nothing() -> None:
    eng = pool(2)
    eng.load([("n0", cpu(0.9)), ("n1", cpu(0.1)), ("ghost", cpu(0.5))], 1.0)
    assert eng.tick(1.0) == []
    assert eng.set_state("ghost", UP, 1.0) == []


def test_slow_start_after_down_ramps_and_publishes_only_past_the_dead_band() -> None:
    policy = WeightPolicy(enabled=True)  # 60 s from 10 %, dead band 5, max step 25
    eng = pool(1, policy)
    up_all(eng)
    eng.set_state("n0", DOWN, 1.0)
    first = eng.set_state("n0", UP, 10.0)
    assert [c.weight for c in first] == [10]
    assert first[0].reasons[0].what == "slow-start"
    weights = [10]
    for t in range(11, 80):
        weights += [c.weight for c in eng.tick(float(t))]
    assert weights[-1] == 100
    assert all(b - a >= 5 or b == 100 for a, b in itertools.pairwise(weights))
    assert weights == sorted(weights)
    assert 15 <= len(weights) <= 20  # ~90 points of ramp in steps of >= 5


def test_no_slow_start_from_first_verdict_or_degraded() -> None:
    eng = pool(1, WeightPolicy(enabled=True, max_step_percent=25.0))
    assert [c.weight for c in eng.set_state("n0", UP, 0.0)] == [100]
    assert [c.weight for c in eng.set_state("n0", DEGRADED, 1.0)] == [50]
    # back from DEGRADED: no slow start, but the rise is rate-limited like any other
    assert [c.weight for c in eng.set_state("n0", UP, 2.0)] == [75]
    assert [c.weight for c in eng.tick(3.0)] == [100]


def test_max_step_bounds_load_moves() -> None:
    policy = msgspec.structs.replace(ONLY_CPU, max_step_percent=20.0)
    eng = pool(1, policy)
    up_all(eng)
    eng.load([("n0", cpu(0.9))], 1.0)
    internal = []
    for t in range(1, 5):
        eng.tick(float(t))
        internal.append(eng.nodes["n0"].weight)
    assert internal == [80.0, 60.0, 50.0, 50.0]


def test_ticks_closer_than_a_step_do_nothing() -> None:
    eng = pool(1, msgspec.structs.replace(ONLY_CPU, step_seconds=2.0))
    up_all(eng)
    eng.load([("n0", cpu(0.9))], 0.5)
    assert eng.tick(1.0) != []
    eng.load([("n0", cpu(0.1))], 1.5)
    assert eng.tick(2.5) == []
    assert eng.tick(3.0) != []


def test_floor_holds_against_any_cut() -> None:
    policy = msgspec.structs.replace(
        ONLY_CPU, floor_percent=30.0, steps=[SignalSteps("cpu", [Step(0.5, 0.9)])])
    eng = pool(1, policy)
    up_all(eng)
    eng.load([("n0", cpu(1.0))], 1.0)
    eng.tick(1.0)
    assert published(eng)["n0"] == 30
    assert [r.what for r in eng.nodes["n0"].reasons] == ["cpu", "floor"]


def test_dead_band_suppresses_small_moves_but_not_zero_or_cap() -> None:
    policy = msgspec.structs.replace(
        ONLY_CPU, dead_band_percent=10.0,
        steps=[SignalSteps("cpu", [Step(0.5, 0.05), Step(0.6, 0.3)])])
    eng = pool(1, policy)
    up_all(eng)
    eng.load([("n0", cpu(0.55))], 1.0)
    assert eng.tick(1.0) == []  # 100 -> 95: inside the band
    assert eng.nodes["n0"].weight == 95.0 and published(eng)["n0"] == 100
    eng.load([("n0", cpu(0.65))], 2.0)
    assert [c.weight for c in eng.tick(2.0)] == [70]
    eng.load([("n0", cpu(0.55))], 3.0)
    assert [c.weight for c in eng.tick(3.0)] == [95]  # 25 points: outside the band
    eng.load([("n0", cpu(0.1))], 4.0)
    assert [c.weight for c in eng.tick(4.0)] == [100]  # back at its cap: always published


# ---- the pool guard ---------------------------------------------------------------------------

def test_guard_scales_cuts_back_instead_of_emptying_the_pool() -> None:
    policy = msgspec.structs.replace(ONLY_CPU, guard_share=0.7)
    eng = pool(3, policy)
    up_all(eng)
    eng.load([(n, cpu(0.95)) for n in eng.nodes], 1.0)  # everyone -50 %: 150 of 300 < 210
    eng.tick(1.0)
    assert published(eng) == {"n0": 70, "n1": 70, "n2": 70}
    assert eng.guard_scale["p"] == pytest.approx(1.4)
    assert eng.nodes["n0"].reasons[-1].what == "pool-guard"


def test_guard_keeps_ratios_and_respects_caps() -> None:
    policy = msgspec.structs.replace(ONLY_CPU, guard_share=0.6)
    eng = pool(3, policy)
    up_all(eng)
    eng.set_state("n2", DEGRADED, 0.5)  # cap 50, no load cut
    eng.load([("n0", cpu(0.95)), ("n1", cpu(0.8)), ("n2", cpu(0.1))], 1.0)
    eng.tick(1.0)
    # caps 100+100+50 = 250, wanted 150; load: 50 + 80 + 50 = 180 >= 150: no scaling
    assert published(eng) == {"n0": 50, "n1": 80, "n2": 50}
    eng.load([("n0", cpu(0.95)), ("n1", cpu(0.95)), ("n2", cpu(0.1))], 2.0)
    eng.tick(2.0)
    # 50 + 50 + 50 = 150 >= 150 still
    assert published(eng) == {"n0": 50, "n1": 50, "n2": 50}
    eng.set_state("n2", DOWN, 3.0)
    eng.tick(3.0)
    # available caps 200, wanted 120; cuts give 100: scaled by 1.2
    assert published(eng) == {"n0": 60, "n1": 60, "n2": 0}


# ---- drain -----------------------------------------------------------------------------------

def test_drain_done_follows_fresh_session_counts() -> None:
    eng = pool(1, msgspec.structs.replace(ONLY_CPU, drain_done_sessions=1))
    up_all(eng)
    assert eng.drain_done("n0", 0.0) is None
    eng.load([("n0", NodeLoad(1.0, active_sessions=5))], 1.0)
    assert eng.drain_done("n0", 1.0) is False
    eng.load([("n0", NodeLoad(1.0, active_sessions=1))], 2.0)
    assert eng.drain_done("n0", 2.0) is True
    assert eng.drain_done("n0", 60.0) is None  # stale: not known any more


# ---- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "path"), [
    ({"half_life_seconds": 0.0}, "weights.half_life_seconds"),
    ({"max_step_percent": 0.0}, "weights.max_step_percent"),
    ({"floor_percent": 0.0}, "weights.floor_percent"),
    ({"guard_share": 1.5}, "weights.guard_share"),
    ({"dead_band_percent": 100.0}, "weights.dead_band_percent"),
    ({"degraded_cap_percent": float("nan")}, "weights.degraded_cap_percent"),
    ({"steps": [SignalSteps("cpu", [Step(0.8, 0.5), Step(0.7, 0.6)])]},
     "weights.steps[0].steps[1]"),
    ({"steps": [SignalSteps("cpu", [Step(0.8, 1.0)])]}, "weights.steps[0].steps[0].cut"),
    ({"steps": [SignalSteps("cpu", [])]}, "weights.steps[0].steps"),
    # a step that cuts nothing: only as the start of a proportional ramp, and never alone
    ({"steps": [SignalSteps("cpu", [Step(0.7, 0.0), Step(0.8, 0.2)])]},
     "weights.steps[0].steps[0].cut"),
    ({"steps": [SignalSteps("cpu", [Step(0.7, 0.0)], proportional=True)]},
     "weights.steps[0].steps"),
    ({"steps": [SignalSteps("cpu", [Step(0.8, 0.2)], min_mean=1.0)]}, "weights.steps[0].min_mean"),
    ({"steps": [SignalSteps("cpu", [Step(0.8, 0.2)]), SignalSteps("cpu", [Step(0.9, 0.2)])]},
     "weights.steps[1].signal"),
])
def test_validation_names_the_field(change: dict[str, object], path: str) -> None:
    with pytest.raises(PolicyError) as err:
        validate_weight_policy(msgspec.structs.replace(WeightPolicy(), **change))
    assert err.value.path == path


def test_defaults_validate() -> None:
    validate_weight_policy(WeightPolicy())


# ---- properties ------------------------------------------------------------------------------

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STATES = st.sampled_from([UP, UP, UP, DEGRADED, DOWN, DRAINING, MAINT])
load = st.builds(
    lambda c, d, e: NodeLoad(1.0, cpu_busy_ratio=c, softnet_drops_per_second=d,
                             packets_per_second=1000.0, effective_sessions=e),
    st.floats(0, 1), st.floats(0, 50), st.floats(0, 200))
# one step of a script: (seconds to advance, action)
action = st.one_of(
    st.tuples(st.just("load"), st.integers(0, 3), load),
    st.tuples(st.just("state"), st.integers(0, 3), STATES),
    st.tuples(st.just("tick")),
)
scripts = st.lists(st.tuples(st.floats(0, 5), action), max_size=60)


def run(eng: WeightEngine, script: list, start: float = 0.0) -> list[WeightChange]:
    now = start
    out: list[WeightChange] = []
    for dt, act in script:
        now += dt
        if act[0] == "load":
            eng.load([(f"n{act[1]}", act[2])], now)
        elif act[0] == "state":
            out += eng.set_state(f"n{act[1]}", act[2], now)
        else:
            out += eng.tick(now)
    return out


@PROPS
@given(script=scripts)
def test_weights_stay_in_range_and_states_cap_them(script: list) -> None:
    eng = pool(4)
    policy = eng.policy
    for change in run(eng, script):
        assert 0 <= change.weight <= 100
        if change.state in (DOWN, DRAINING, MAINT):
            assert change.weight == 0
        if change.state == DEGRADED:
            assert change.weight <= policy.degraded_cap_percent
        if change.state in (UP, DEGRADED):
            assert change.weight >= min(policy.floor_percent, policy.slow_start_initial_percent)


@PROPS
@given(script=scripts)
def test_published_moves_respect_the_dead_band(script: list) -> None:
    eng = pool(4)
    band = eng.policy.dead_band_percent
    for change in run(eng, script):
        if change.previous is None:
            continue
        boundary = change.weight in (0, 100, 50) or change.previous == 0
        assert boundary or abs(change.weight - change.previous) >= band - 0.5


@PROPS
@given(script=scripts)
def test_load_moves_are_bounded_per_step(script: list) -> None:
    """Between two steps a serving node's weight moves by at most max_step, except downwards
    to a lower state cap (health is never rate-limited)."""
    eng = pool(4)
    limit = eng.policy.max_step_percent
    now = 0.0
    before = {n: eng.nodes[n].weight for n in eng.nodes}
    caps_before = {n: eng.nodes[n].cap for n in eng.nodes}
    for dt, act in script:
        now += dt
        if act[0] == "load":
            eng.load([(f"n{act[1]}", act[2])], now)
            continue
        if act[0] == "state":
            eng.set_state(f"n{act[1]}", act[2], now)
        else:
            eng.tick(now)
        for name, node in eng.nodes.items():
            old, new = before[name], node.weight
            if old is not None and new is not None and node.cap > 0 and caps_before[name] > 0:
                assert new - old <= limit + 1e-9
                assert old - new <= limit + 1e-9 or new == node.cap
            before[name] = new
            caps_before[name] = node.cap


@PROPS
@given(script=scripts)
def test_guard_keeps_the_pools_share(script: list) -> None:
    # at 0.8 the default cuts (down to -50 %) would break it: the guard has work to do
    eng = pool(4, msgspec.structs.replace(WeightPolicy(enabled=True), guard_share=0.8))
    share = eng.policy.guard_share
    now = 0.0
    for dt, act in script:
        now += dt
        run(eng, [(0.0, act)], now)
        if act[0] != "tick" or eng.last_step != now:
            continue
        serving = [n for n in eng.nodes.values() if n.cap > 0]
        # the targets (what the rate limit moves towards) keep the guard's share of the limits
        # (the state caps, lowered by slow start's ramp)
        assert sum(n.target for n in serving) >= share * sum(n.limit for n in serving) - 1e-6


@PROPS
@given(script=scripts)
def test_slow_start_ramps_a_returning_node(script: list) -> None:
    """A node back in service from DOWN, DRAINING or MAINTENANCE never carries more than slow
    start's ramp, whatever its load: ``elapsed`` seconds after its return, at most
    initial + (100 - initial) * elapsed / slow_start_seconds, published weight included."""
    eng = pool(4)
    policy = eng.policy
    initial, span = policy.slow_start_initial_percent, policy.slow_start_seconds
    returned: dict[str, float] = {}
    now = 0.0
    for dt, act in script:
        now += dt
        if act[0] == "state":
            name, state = f"n{act[1]}", act[2]
            before = eng.nodes[name].state
            run(eng, [(0.0, act)], now)
            if state != before and state in (UP, DEGRADED) and before in (DOWN, DRAINING, MAINT):
                returned[name] = now
            elif state not in (UP, DEGRADED):
                returned.pop(name, None)
        else:
            run(eng, [(0.0, act)], now)
        for name, since in returned.items():
            if now - since >= span:
                continue
            ramp = initial + (100 - initial) * (now - since) / span
            node = eng.nodes[name]
            assert node.weight is not None and node.weight <= ramp + 1e-9
            assert node.published is not None and node.published <= math.floor(ramp + 0.5)


@PROPS
@given(busy=st.lists(st.floats(0, 1), min_size=2, max_size=2), rest=st.floats(0, 1))
def test_monotone_in_load(busy: list[float], rest: float) -> None:
    """More load on one node never gives it a higher weight (all else equal)."""
    low, high = sorted(busy)
    results = []
    for value in (low, high):
        eng = pool(2, msgspec.structs.replace(WeightPolicy(enabled=True), guard_share=0.0))
        up_all(eng)
        for t in range(1, 8):
            eng.load([("n0", cpu(value, effective_sessions=10.0 * value + 1.0)),
                      ("n1", cpu(rest, effective_sessions=10.0 * rest + 1.0))], float(t))
            eng.tick(float(t))
        results.append(eng.nodes["n0"].weight)
    assert results[1] <= results[0]


@PROPS
@given(first=scripts, second=scripts)
def test_snapshot_continues_exactly(first: list, second: list) -> None:
    eng = pool(4)
    run(eng, first)
    end = sum(dt for dt, _ in first)
    data = msgspec.msgpack.decode(msgspec.msgpack.encode(eng.to_builtins()))
    copy = WeightEngine.restore(data)
    a = run(eng, second, end)
    b = run(copy, second, end)
    assert msgspec.json.encode(a) == msgspec.json.encode(b)
