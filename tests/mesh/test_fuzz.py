"""Fuzzing the mesh's own parsers: bad input is a clean error, never a crash."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.mesh import signing
from probes.mesh.replay import parse_lines
from probes.mesh.snapshot import SnapshotError, load_engine
from probes.model import SchemaError, encode
from tests.mesh.helpers import obs

pytestmark = pytest.mark.mesh

FAST = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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


@FAST
@given(st.text(max_size=40), st.text(max_size=80), st.binary(max_size=64))
def test_signature_checks_never_raise(timestamp: str, signature: str, body: bytes) -> None:
    assert signing.verify(KEY, timestamp, body, signature) in (True, False)
    signing.timestamp_fresh(timestamp, 1e9, 300)


@FAST
@given(st.binary(max_size=300))
def test_snapshot_loader_rejects_garbage_cleanly(blob: bytes) -> None:
    # a snapshot is our own file; garbage must fail with an error, not hang or kill the process
    with contextlib.suppress(SnapshotError, KeyError, TypeError, ValueError):
        load_engine(blob)


@pytest.mark.slow
@SLOW
@given(st.integers(0, 400), st.binary(min_size=1, max_size=8))
def test_replay_lines_mutated_observation_long(cut: int, junk: bytes) -> None:
    _lines([_mutated(GOOD_LINE, cut, junk)])
