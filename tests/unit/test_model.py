"""Wire model: round trips, errors that name the field, and fuzzed input never escapes as
anything but SchemaError."""

from __future__ import annotations

import contextlib
import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.model import (
    SCHEMA_VERSION,
    NodeLoad,
    Observation,
    ObservationBatch,
    Quality,
    Reason,
    SchemaError,
    Verdict,
    VerdictReason,
    VerdictState,
    Votes,
    decode_batch,
    decode_verdict,
    encode,
    within_bounds,
)


def _obs(seq: int = 1) -> Observation:
    return Observation(node="fra1-n1", check="wg-session", vantage="fra-a", seq=seq,
                       wall_time=1_790_000_000.5, ok=False, reason=Reason.TUNNEL_LOSS,
                       duration_seconds=0.21, kind="wireguard.session",
                       phases={"handshake": 0.004, "echo": 0.2},
                       quality=Quality(sent=10, received=8, loss_ratio=0.2,
                                       rtt_p50_seconds=0.001, rtt_max_seconds=0.003),
                       detail="2 of 10 echoes lost")


def test_batch_round_trip() -> None:
    batch = ObservationBatch(version=SCHEMA_VERSION, agent="fra-a", batch_seq=7,
                             sent_at=1_790_000_001.0, observations=[_obs(1), _obs(2)])
    assert decode_batch(encode(batch)) == batch


def test_verdict_round_trip_and_idempotency_key() -> None:
    v = Verdict(node="n1", state=VerdictState.DOWN, previous=VerdictState.UP, seq=42,
                decided_at=1.5, reasons=[VerdictReason(what="vote", vantage="a", value=3.0)],
                votes=Votes(down=3))
    assert decode_verdict(encode(v)) == v
    assert v.idempotency_key == "n1:42"


@pytest.mark.parametrize(("mutate", "path"), [
    (lambda d: d["observations"][0].update(reason="exploded"), "$.observations[0].reason"),
    (lambda d: d["observations"][0].update(ok="yes"), "$.observations[0].ok"),
    (lambda d: d["observations"][0].pop("node"), "$.observations[0]"),
    (lambda d: d["observations"][1].update(extra=1), "$.observations[1]"),
    (lambda d: d.update(batch_seq="x"), "$.batch_seq"),
    (lambda d: d.update(version=99), "$.version"),
])
def test_schema_errors_name_the_field(mutate, path: str) -> None:  # type: ignore[no-untyped-def]
    batch = ObservationBatch(version=SCHEMA_VERSION, agent="a", batch_seq=1, sent_at=0.0,
                             observations=[_obs(1), _obs(2)])
    data = json.loads(encode(batch))
    mutate(data)
    with pytest.raises(SchemaError) as info:
        decode_batch(json.dumps(data).encode())
    assert info.value.path == path


# the default run; the _100k variants (marked slow) go deep
FAST = settings(max_examples=500, deadline=None)
SLOW = settings(max_examples=100_000, deadline=None)


def _decode_raises_only_schema_error(data: bytes) -> None:
    with contextlib.suppress(SchemaError):
        decode_batch(data)


@FAST
@given(st.binary(max_size=300))
def test_fuzz_decode_batch_only_raises_schema_error(data: bytes) -> None:
    _decode_raises_only_schema_error(data)


@pytest.mark.slow
@SLOW
@given(st.binary(max_size=300))
def test_fuzz_decode_batch_only_raises_schema_error_100k(data: bytes) -> None:
    _decode_raises_only_schema_error(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


@FAST
@given(json_values)
def test_fuzz_structured_json_only_raises_schema_error(value: object) -> None:
    _decode_raises_only_schema_error(json.dumps(value).encode())


@pytest.mark.slow
@SLOW
@given(json_values)
def test_fuzz_structured_json_only_raises_schema_error_100k(value: object) -> None:
    _decode_raises_only_schema_error(json.dumps(value).encode())


def test_invalid_utf8_inside_a_string_is_a_schema_error() -> None:
    batch = encode(ObservationBatch(version=SCHEMA_VERSION, agent="a", batch_seq=1, sent_at=0.0,
                                    observations=[_obs(1)]))
    broken = batch.replace(b'"fra1-n1"', b'"fra1-\xff\xfe"')
    with pytest.raises(SchemaError, match="UTF-8"):
        decode_batch(broken)
    with pytest.raises(SchemaError):
        decode_verdict(b'{"node": "\xc3"}')


def _batch_with(junk: bytes) -> bytes:
    batch = encode(ObservationBatch(version=SCHEMA_VERSION, agent="a", batch_seq=1, sent_at=0.0,
                                    observations=[_obs(1)]))
    return batch.replace(b"fra1-n1", junk.replace(b'"', b"").replace(b"\\", b""))


@FAST
@given(st.binary(max_size=40))
def test_fuzz_bytes_inside_a_valid_batch_only_raise_schema_error(junk: bytes) -> None:
    _decode_raises_only_schema_error(_batch_with(junk))


@pytest.mark.slow
@SLOW
@given(st.binary(max_size=40))
def test_fuzz_bytes_inside_a_valid_batch_only_raise_schema_error_100k(junk: bytes) -> None:
    _decode_raises_only_schema_error(_batch_with(junk))


def test_a_load_record_round_trips_and_out_of_range_figures_name_their_field() -> None:
    load = NodeLoad(interval_seconds=1.0, cpu_busy_ratio=0.8, bytes_per_second=1e6,
                    active_sessions=12, effective_sessions=20.5)
    obs = msgspec.structs.replace(_obs(1), load=load)
    batch = ObservationBatch(version=SCHEMA_VERSION, agent="a", batch_seq=1, sent_at=0.0,
                             observations=[obs])
    assert decode_batch(encode(batch)) == batch
    for field, value in (("cpu_busy_ratio", 1.5), ("bytes_per_second", -1.0),
                         ("active_sessions", 2**40), ("interval_seconds", 1e9)):
        data = json.loads(encode(batch))
        data["observations"][0]["load"][field] = value
        with pytest.raises(SchemaError) as info:
            decode_batch(json.dumps(data).encode())
        assert info.value.path == f"$.observations[0].load.{field}"
        # the agent clamps what it measured instead of losing the batch
        odd = msgspec.structs.replace(load, **{field: value})
        clamped = within_bounds(msgspec.structs.replace(obs, load=odd))
        decode_batch(encode(msgspec.structs.replace(batch, observations=[clamped])))
