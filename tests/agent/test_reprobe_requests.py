"""Re-probes on request (corroboration on demand), agent side: the schedule honours what the
mesh asks within its own budget, and a reply is parsed defensively."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.agent.reporter import MAX_REPROBE_REQUESTS, reprobe_requests
from probes.agent.scheduler import ScheduleCore
from probes.config import TierPolicy
from probes.model import Tier

from .fakes import planned

pytestmark = pytest.mark.agent

TIER = TierPolicy(interval=2.0, timeout=1.0, fast_interval=0.25, rise=2, fall=3, jitter=0.0)


def core(rate: float = 10.0) -> ScheduleCore:
    c = ScheduleCore({"l4": TIER, "functional": TIER}, rng=random.Random(1), max_reprobe_rate=rate)
    c.load([planned("n0", Tier.L4), planned("n0", Tier.FUNCTIONAL), planned("n1", Tier.L4)])
    return c


def test_a_request_makes_the_check_due_now() -> None:
    c = core()
    assert c.request("n0/tcp", 0.0) == "honoured"
    [first] = c.pop_due(0.0)
    c.complete(first.key, True, 0.01)  # settled UP
    assert c.request("n0/tcp", 5.0) == "honoured"
    due = c.pop_due(5.0)
    assert [(d.key, d.why) for d in due] == [("n0/tcp", "reprobe")]
    c.complete("n0/tcp", False, 5.01)  # a failure on re-probe: fastinter takes over as usual
    assert c.states["n0/tcp"].due == pytest.approx(5.25)  # fastinter after its start


def test_a_queued_slot_is_pulled_forward_not_doubled() -> None:
    c = core()
    c.open_round(Tier.L4, 0.0)  # both L4 checks queued at their slots in [0, 2)
    assert c.request("n1/tcp", 0.0) in ("honoured", "busy")
    keys = [d.key for d in c.pop_due(0.0)]
    assert keys.count("n1/tcp") == 1
    assert "n1/tcp" not in [d.key for d in c.pop_due(2.0)]  # its later slot is gone


def test_busy_unknown_and_limited() -> None:
    c = core(rate=1.0)
    assert c.request("nope/tcp", 1.0) == "unknown"
    assert c.request("n0/tcp", 1.0) == "honoured"
    assert c.request("n0/tcp", 1.0) == "busy"  # already due
    c.pop_due(1.0)
    assert c.request("n0/tcp", 1.0) == "busy"  # running
    assert c.request("n1/tcp", 1.0) == "honoured"  # burst: two at a rate of 1/s
    assert c.request("n0/fake.handshake", 1.0) == "limited"
    assert c.request("n0/fake.handshake", 2.0) == "honoured"  # a token came back
    assert core(rate=0.0).request("n0/tcp", 1.0) == "limited"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 0.5), st.sampled_from(["n0/tcp", "n1/tcp",
                                                              "n0/fake.handshake"])),
                max_size=80), st.floats(0.1, 20))
def test_requests_never_exceed_the_budget(script: list[tuple[float, str]], rate: float) -> None:
    c = core(rate)
    t = 0.0
    honoured = 0
    for dt, key in script:
        t += dt
        honoured += c.request(key, t) == "honoured"
        for due in c.pop_due(t):
            c.complete(due.key, True, t)
    assert honoured <= 2 * rate + rate * t + 1e-6


def test_replies_are_parsed_defensively() -> None:
    ok = msgspec.json.encode({"accepted": True, "verdicts": 0,
                              "reprobe": [["n0", "icmp"], ["n1", "openvpn.tls"]]})
    assert reprobe_requests(ok) == [("n0", "icmp"), ("n1", "openvpn.tls")]
    for bad in (b"", b"not json", b"[]", b'{"reprobe": 3}', b'{"reprobe": [["n0"], [1, 2]]}',
                b'{"accepted": true}'):
        assert reprobe_requests(bad) == []
    many = msgspec.json.encode({"reprobe": [["n", "c"]] * (MAX_REPROBE_REQUESTS + 5)})
    assert len(reprobe_requests(many)) == MAX_REPROBE_REQUESTS


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
        ["reprobe", "accepted", "x"]), inner, max_size=3), max_leaves=20).map(msgspec.json.encode))
def test_reply_parser_never_raises(reply: bytes) -> None:
    for node, check in reprobe_requests(reply):
        assert isinstance(node, str) and isinstance(check, str)
