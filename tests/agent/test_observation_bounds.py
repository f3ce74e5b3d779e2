"""``within_bounds`` passes an observation that is already inside the wire's bounds through
uncopied (the agent's thousands a second); whatever it passes or clamps is what the full clamp
gives, and the mesh's decoder takes it."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.agent.plan import PlannedCheck
from probes.agent.runtime import DETAIL_MAX, observation
from probes.agent.scheduler import ProbeRun
from probes.checks import l4
from probes.checks.base import CheckResult
from probes.model import (
    MAX_COUNT,
    MAX_DETAIL,
    MAX_NAME,
    MAX_PHASE_NAME,
    MAX_PHASES,
    MAX_RATE,
    MAX_SECONDS,
    MAX_SEQ,
    MAX_WALL_TIME,
    NodeLoad,
    Observation,
    ObservationBatch,
    Quality,
    Reason,
    Tier,
    clamped,
    decode_batch,
    encode,
    within_bounds,
)

EDGE_FLOATS = [-0.0, -1e-9, float("nan"), float("inf"), -float("inf"), 1e300]
EDGE_NAMES = ["x" * (MAX_NAME + 1), "ü" * (MAX_NAME + 1)]


@st.composite
def observations(draw: st.DrawFn) -> Observation:
    """An observation inside the bounds (at their edges too), then at most one field pushed
    past them: an out-of-bounds field must not hide behind another one."""
    seconds = st.one_of(st.sampled_from([0.0, 5e-324, MAX_SECONDS]), st.floats(0, MAX_SECONDS))
    names = st.one_of(st.sampled_from(["", "n1", "x" * MAX_NAME, "ü" * MAX_NAME]),
                      st.text(max_size=8))
    phase_names = st.one_of(st.sampled_from(["connect", "p" * MAX_PHASE_NAME]),
                            st.text(max_size=8))
    fields: dict[str, Any] = {
        "node": draw(names), "check": draw(names), "vantage": draw(names), "kind": draw(names),
        "seq": draw(st.sampled_from([0, 7, MAX_SEQ])),
        "wall_time": draw(st.sampled_from([0.0, 1.7e9, MAX_WALL_TIME])),
        "duration_seconds": draw(seconds),
        "phases": draw(st.one_of(st.dictionaries(phase_names, seconds, max_size=3),
                                 st.just({f"p{i}": 0.001 for i in range(MAX_PHASES)}))),
        "detail": draw(st.sampled_from(["", "refused", "d" * MAX_DETAIL])),
        "quality": draw(st.one_of(st.none(), st.builds(
            Quality, sent=st.sampled_from([0, 1, MAX_COUNT]),
            received=st.sampled_from([0, 1, MAX_COUNT]),
            loss_ratio=st.sampled_from([0.0, 0.5, 1.0]),
            rtt_p50_seconds=st.one_of(st.none(), seconds),
            rtt_p99_seconds=st.one_of(st.none(), seconds),
            rtt_max_seconds=st.one_of(st.none(), seconds),
            throughput_bytes_per_second=st.sampled_from([None, 0.0, 1e9, MAX_RATE]),
            queueing_delay_seconds=st.one_of(st.none(), seconds)))),
    }
    past: dict[str, st.SearchStrategy[Any]] = {
        "node": st.sampled_from(EDGE_NAMES), "check": st.sampled_from(EDGE_NAMES),
        "vantage": st.sampled_from(EDGE_NAMES), "kind": st.sampled_from(EDGE_NAMES),
        "seq": st.sampled_from([-1, MAX_SEQ + 1]),
        "wall_time": st.sampled_from([*EDGE_FLOATS, MAX_WALL_TIME * 1.0000001]),
        "duration_seconds": st.sampled_from([*EDGE_FLOATS, MAX_SECONDS * 1.0000001]),
        "phases": st.one_of(
            st.builds(lambda v: {"connect": v}, st.sampled_from(EDGE_FLOATS)),
            st.just({"p" * (MAX_PHASE_NAME + 1): 0.001}),
            st.just({f"p{i}": 0.001 for i in range(MAX_PHASES + 1)})),
        "detail": st.just("d" * (MAX_DETAIL + 1)),
        "quality": st.one_of(
            st.builds(Quality, sent=st.sampled_from([-1, MAX_COUNT + 1])),
            st.builds(Quality, received=st.sampled_from([-1, MAX_COUNT + 1])),
            st.builds(Quality, loss_ratio=st.sampled_from([*EDGE_FLOATS, 1.0000001])),
            st.builds(Quality, rtt_p50_seconds=st.sampled_from(EDGE_FLOATS)),
            st.builds(Quality, rtt_p99_seconds=st.sampled_from(EDGE_FLOATS)),
            st.builds(Quality, rtt_max_seconds=st.sampled_from(EDGE_FLOATS)),
            st.builds(Quality, throughput_bytes_per_second=st.sampled_from(
                [*EDGE_FLOATS, MAX_RATE * 1.0000001])),
            st.builds(Quality, queueing_delay_seconds=st.sampled_from(EDGE_FLOATS))),
    }
    pushed = draw(st.sampled_from([None, *past]))
    if pushed is not None:
        fields[pushed] = draw(past[pushed])
    return Observation(ok=draw(st.booleans()), reason=draw(st.sampled_from(list(Reason))),
                       tier=Tier.L4, **fields)


def _same(a: Observation, b: Observation) -> bool:
    # NaN is never equal to itself: compare the encoded forms
    return msgspec.json.encode(a) == msgspec.json.encode(b)


@settings(max_examples=400, deadline=None)
@given(obs=observations())
def test_passing_through_is_what_clamping_gives_and_the_mesh_takes(obs: Observation) -> None:
    out = within_bounds(obs)
    assert _same(out, clamped(obs))
    batch = ObservationBatch(version=1, agent="a", batch_seq=1, sent_at=1.0, observations=[out])
    assert _same(decode_batch(encode(batch)).observations[0], out)


def test_an_observation_inside_the_bounds_is_not_copied() -> None:
    obs = Observation(node="n1", check="tcp:443", vantage="v", seq=1, wall_time=1.7e9, ok=True,
                      reason=Reason.OK, duration_seconds=0.0004, kind="tcp", tier=Tier.L4,
                      phases={"connect": 0.0004})
    assert within_bounds(obs) is obs
    negative = msgspec.structs.replace(obs, phases={"connect": -1e-6})
    assert within_bounds(negative).phases == {"connect": 0.0}


BASE = Observation(node="n1", check="udp:53", vantage="v", seq=1, wall_time=1.7e9, ok=True,
                   reason=Reason.OK, duration_seconds=0.0004, kind="udp", tier=Tier.L4,
                   phases={"rtt": 0.0003},
                   quality=Quality(sent=1, received=1, rtt_p50_seconds=0.0003,
                                   rtt_p99_seconds=0.0003, rtt_max_seconds=0.0003,
                                   throughput_bytes_per_second=1e6,
                                   queueing_delay_seconds=0.001))
PAST_QUALITY: dict[str, list[float]] = {
    "sent": [-1, MAX_COUNT + 1], "received": [-1, MAX_COUNT + 1],
    "loss_ratio": [*EDGE_FLOATS, 1.0000001],
    "rtt_p50_seconds": [*EDGE_FLOATS, MAX_SECONDS * 1.0000001],
    "rtt_p99_seconds": [*EDGE_FLOATS, MAX_SECONDS * 1.0000001],
    "rtt_max_seconds": [*EDGE_FLOATS, MAX_SECONDS * 1.0000001],
    "throughput_bytes_per_second": [*EDGE_FLOATS, MAX_RATE * 1.0000001],
    "queueing_delay_seconds": [*EDGE_FLOATS, MAX_SECONDS * 1.0000001],
}


def test_every_quality_field_past_its_bounds_is_clamped() -> None:
    assert within_bounds(BASE) is BASE
    for name, values in PAST_QUALITY.items():
        for value in values:
            assert BASE.quality is not None
            obs = msgspec.structs.replace(
                BASE, quality=msgspec.structs.replace(BASE.quality, **{name: value}))
            assert _same(within_bounds(obs), clamped(obs)), (name, value)


def test_the_agent_tells_each_field_of_a_run_in_its_own_place() -> None:
    """``observation`` gives the struct its fields by position (one is made for every probe):
    every field from its own source, each value different from the others', so that two
    fields swapped, or a field added to the struct before ``load``, fail here."""
    check = PlannedCheck(node="node-a", pool="p", pop="pop", region="eu", check="check-b",
                         kind=l4.UDP, params=l4.UdpParams(host="127.0.0.1", port=53),
                         tier=Tier.L4)
    quality, load = Quality(sent=3, received=2), NodeLoad(interval_seconds=1.5)
    result = CheckResult(False, Reason.TIMEOUT, 0.25, phases={"send": 0.125},
                         quality=quality, detail="d" * (DETAIL_MAX + 5), load=load)
    obs = observation(ProbeRun(check, result, 1.7e9, 10.0, 10.5, "round"), "vantage-c", 42)
    assert msgspec.structs.asdict(obs) == {
        "node": "node-a", "check": "check-b", "vantage": "vantage-c", "seq": 42,
        "wall_time": 1.7e9, "ok": False, "reason": Reason.TIMEOUT, "duration_seconds": 0.25,
        "kind": "udp", "tier": Tier.L4, "phases": {"send": 0.125}, "quality": quality,
        "detail": "d" * DETAIL_MAX, "load": load}
