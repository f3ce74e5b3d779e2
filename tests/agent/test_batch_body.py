"""The reporter builds batch JSON by concatenating encoded observations: always a valid batch."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.agent.reporter import batch_url
from probes.model import MAX_SECONDS, MAX_WALL_TIME, Observation, Reason, batch_body, decode_batch

pytestmark = pytest.mark.agent

# within the wire's bounds (the agent clamps what it measured into them: model.within_bounds)
wall_times = st.floats(0, MAX_WALL_TIME)
observations = st.builds(
    Observation, node=st.text(max_size=20), check=st.text(max_size=20),
    vantage=st.text(max_size=10), seq=st.integers(0, 2**63 - 1), wall_time=wall_times,
    ok=st.booleans(), reason=st.sampled_from(list(Reason)),
    duration_seconds=st.floats(0, MAX_SECONDS), detail=st.text(max_size=50))


@settings(max_examples=500)
@given(st.text(max_size=30), st.integers(0, 2**63 - 1), wall_times,
       st.lists(observations, max_size=5))
def test_batch_body_decodes_to_the_same_batch(agent: str, batch_seq: int, sent_at: float,
                                              obs: list[Observation]) -> None:
    body = batch_body(agent, batch_seq, sent_at, [msgspec.json.encode(o) for o in obs])
    batch = decode_batch(body)
    assert (batch.agent, batch.batch_seq, batch.observations) == (agent, batch_seq, obs)
    assert math.isclose(batch.sent_at, sent_at) or batch.sent_at == sent_at


def test_batch_url() -> None:
    assert batch_url("http://mesh:9480") == "http://mesh:9480/v1/batches"
    assert batch_url("https://mesh:9480/") == "https://mesh:9480/v1/batches"
    assert batch_url("http://mesh/custom/path") == "http://mesh/custom/path"
