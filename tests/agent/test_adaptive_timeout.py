"""The L4 tier's adaptive timeout: RFC 6298's RTO over a check's own successful round trips.

A silent node then fails an L4 check in ``MIN_ADAPTIVE_TIMEOUT`` rather than the tier's flat
timeout; a slow path gets a proportionally longer wait; failures never shorten it (Karn).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probes.agent.scheduler import MIN_ADAPTIVE_TIMEOUT, RTO_MIN_SAMPLES, ScheduleCore
from probes.config import TierPolicy
from probes.model import Tier

from .fakes import planned

pytestmark = pytest.mark.agent

TIERS = {
    "l4": TierPolicy(interval=2.0, timeout=1.0, fast_interval=0.25),
    "functional": TierPolicy(interval=2.0, timeout=1.0, fast_interval=0.25),
}
L4 = "node-1/tcp"
FUNCTIONAL = "node-1/fake.handshake"


def core() -> ScheduleCore:
    c = ScheduleCore(TIERS, rng=random.Random(1))
    c.load([planned("node-1", Tier.L4), planned("node-1", Tier.FUNCTIONAL)])
    return c


def test_configured_timeout_until_enough_samples() -> None:
    c = core()
    assert c.timeout_for(L4) == 1.0
    for i in range(RTO_MIN_SAMPLES - 1):
        c.complete(L4, True, float(i), 0.001)
        assert c.timeout_for(L4) == 1.0
    c.complete(L4, True, 10.0, 0.001)
    assert c.timeout_for(L4) == MIN_ADAPTIVE_TIMEOUT  # a 1 ms path: the floor


def test_slow_path_waits_longer_and_never_beyond_the_configured_timeout() -> None:
    c = core()
    for i in range(10):
        c.complete(L4, True, float(i), 0.25 if i % 2 else 0.15)  # 200 ms +- 50 ms
    rto = c.timeout_for(L4)
    assert MIN_ADAPTIVE_TIMEOUT < rto < 1.0
    st_ = c.states[L4]
    assert rto == pytest.approx(st_.srtt + 4 * st_.rttvar)
    for i in range(10):
        c.complete(L4, True, 20.0 + i, 3.0)  # slower than the configured timeout
    assert c.timeout_for(L4) == 1.0


def test_failures_give_no_sample_and_functional_checks_keep_their_timeout() -> None:
    c = core()
    for i in range(5):
        c.complete(L4, True, float(i), 0.002)
        c.complete(FUNCTIONAL, True, float(i), 0.002)
    before = (c.states[L4].srtt, c.states[L4].rttvar, c.timeout_for(L4))
    for i in range(5):
        c.complete(L4, False, 10.0 + i, 0.25)  # timeouts: Karn, no sample
    assert (c.states[L4].srtt, c.states[L4].rttvar, c.timeout_for(L4)) == before
    assert c.timeout_for(FUNCTIONAL) == 1.0  # multi-exchange: retransmits need the full wait


@given(st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=50))
def test_timeout_always_within_floor_and_configured(durations: list[float]) -> None:
    c = core()
    for i, d in enumerate(durations):
        c.complete(L4, True, float(i), d)
        assert MIN_ADAPTIVE_TIMEOUT <= c.timeout_for(L4) <= 1.0
