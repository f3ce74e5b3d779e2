"""Fuzzing the mesh's own parsers: bad input is a clean error, never a crash."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.mesh.decision import DecisionEngine, NodeInfo
from probes.mesh.policy import DecisionPolicy, PolicyError, policy_from_mapping
from probes.mesh.replay import parse_lines
from probes.mesh.snapshot import SnapshotError, dump_engine, load_engine
from probes.model import ObservationBatch, SchemaError, decode_batch, encode, signing
from tests.mesh.helpers import obs

pytestmark = pytest.mark.mesh

FAST = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=100_000, deadline=None, suppress_health_check=list(HealthCheck))
KEY = b"k" * 32
GOOD_LINE = encode(obs("n0", "va", True))


def _lines(data: list[bytes]) -> None:
    try:
        list(parse_lines(data))
    except SchemaError as exc:
        assert exc.path.startswith("line ")


def _mutated(data: bytes, cut: int, junk: bytes) -> bytes:
    cut %= len(data) + 1
    return data[:cut] + junk + data[cut + len(junk) :]


@FAST
@given(st.lists(st.binary(max_size=200), max_size=5))
def test_replay_lines_random_bytes(data: list[bytes]) -> None:
    _lines(data)


@FAST
@given(st.integers(0, 400), st.binary(min_size=1, max_size=8))
def test_replay_lines_mutated_observation(cut: int, junk: bytes) -> None:
    _lines([_mutated(GOOD_LINE, cut, junk)])


GOOD_RECORDS = [
    b'{"now":5.0,"tick":true}',
    b'{"now":5.0,"admin":{"node":"n0","state":"DRAINING","actor":"ops"}}',
    b'{"now":5.0,"batch":{"version":1,"agent":"va","batch_seq":1,"sent_at":5.0,'
    b'"observations":[' + GOOD_LINE + b"]}}",
]


@FAST
@given(st.sampled_from(GOOD_RECORDS), st.integers(0, 400), st.binary(min_size=1, max_size=8))
def test_replay_lines_mutated_journal_record(good: bytes, cut: int, junk: bytes) -> None:
    _lines([good, _mutated(good, cut, junk)])


@FAST
@given(st.text(max_size=40), st.text(max_size=80), st.binary(max_size=64))
def test_signature_checks_never_raise(timestamp: str, signature: str, body: bytes) -> None:
    assert signing.verify(KEY, timestamp, body, signature) in (True, False)
    signing.timestamp_fresh(timestamp, 1e9, 300)


@FAST
@given(st.binary(max_size=300))
def test_snapshot_loader_rejects_garbage_cleanly(blob: bytes) -> None:
    # a snapshot is our own file; garbage must fail with its error, not hang or kill the process
    with pytest.raises(SnapshotError):
        load_engine(blob)


def _snapshot() -> bytes:
    engine = DecisionEngine(DecisionPolicy(), [NodeInfo("n0", "p"), NodeInfo("n1", "p")])
    engine.observe([obs("n0", "va", True), obs("n1", "va", False)], 1.0)
    return dump_engine(engine)


GOOD_SNAPSHOT = _snapshot()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 4000), st.binary(min_size=1, max_size=8))
def test_snapshot_loader_loads_or_refuses_a_damaged_snapshot(cut: int, junk: bytes) -> None:
    """Damage inside a value (a figure, a name, an optional key) may still load; anything else
    is a SnapshotError, never another exception (the loader used to raise KeyError, TypeError
    or IndexError from the rows)."""
    try:
        engine = load_engine(_mutated(GOOD_SNAPSHOT, cut, junk))
    except SnapshotError:
        return
    assert isinstance(engine, DecisionEngine)


@pytest.mark.slow
@SLOW
@given(st.integers(0, 400), st.binary(min_size=1, max_size=8))
def test_replay_lines_mutated_observation_long(cut: int, junk: bytes) -> None:
    _lines([_mutated(GOOD_LINE, cut, junk)])


_values = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 100), st.floats(allow_nan=True), st.text(max_size=8)
)
_fields = st.sampled_from(
    [
        "rise",
        "fall",
        "window",
        "window_failures",
        "stale_after_seconds",
        "max_age_seconds",
        "damping",
        "quality",
        "quorum",
        "impairment",
        "pool_guard",
        "tiers",
        "default_tier",
        "bogus",
    ]
)


_SECTIONS = {
    "damping": ["enabled", "penalty", "half_life_seconds", "suppress", "reuse", "max_hold_seconds"],
    "quality": ["max_loss_ratio", "max_rtt_p99_seconds"],
    "quorum": ["mode", "healthy_percent", "min_voters"],
    "impairment": ["down_share", "min_nodes"],
    "pool_guard": ["max_down_share"],
}
_section = st.sampled_from(sorted(_SECTIONS)).flatmap(
    lambda name: st.tuples(
        st.just(name), st.dictionaries(st.sampled_from(_SECTIONS[name]), _values, max_size=3)
    )
)


@FAST
@given(
    st.dictionaries(_fields, _values, max_size=4),
    st.lists(_section, max_size=3),
)
def test_policy_loader_only_raises_policy_errors(
    data: dict[str, object], sections: list[tuple[str, dict[str, object]]]
) -> None:
    data = {**data, **dict(sections)}
    try:
        policy = policy_from_mapping(data)
    except PolicyError as exc:
        assert exc.path.startswith("decision")
    else:
        assert policy.rise >= 1 and policy.quorum.min_voters >= 1


def _has_duplicate_key(data: bytes) -> bool:
    """The reference: the stdlib parser's (key, value) pairs of every object, duplicates kept."""
    found = False

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        nonlocal found
        keys = [key for key, _ in items]
        found = found or len(set(keys)) != len(keys)
        return dict(items)

    json.loads(data, object_pairs_hook=pairs)
    return found


def _observations(count: int, detail: str) -> bytes:
    return encode(ObservationBatch(
        version=1, agent="va", batch_seq=1, sent_at=1.0,
        observations=[msgspec.structs.replace(obs(f"n{i}", "va", i % 2 == 0), detail=detail)
                      for i in range(count)]))


@FAST
@given(st.lists(st.tuples(st.integers(0, 40), st.text(max_size=30), st.integers(0, 9),
                          st.integers(0, 10_000)), min_size=1, max_size=6))
def test_duplicate_keys_are_found_in_bodies_one_after_another(
        bodies: list[tuple[int, str, int, int]]) -> None:
    """The duplicate-key check re-encodes into a buffer kept between bodies: a body after a
    longer one (or a shorter one) is judged on its own bytes, whatever came before; a body is
    refused exactly when the stdlib parser sees a key twice in one object."""
    for count, detail, doubled, cut in bodies:
        body = _observations(count, detail)
        if count and doubled < 5:  # a key of one observation written twice
            key = (b'"node":', b'"seq":', b'"ok":', b'"reason":', b'"check":')[doubled]
            at = body.find(key, cut % len(body))
            at = body.find(key) if at < 0 else at
            end = body.index(b",", at)
            body = body[:end] + b"," + body[at:end] + body[end:]
        elif doubled == 5:  # not canonical, no duplicates: the exact scan decides
            body = body.replace(b":", b": ")
        expected = _has_duplicate_key(body)
        try:
            decode_batch(body)
        except SchemaError as exc:
            assert expected, exc
            assert "duplicate key" in str(exc)
        else:
            assert not expected
