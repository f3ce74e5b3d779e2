"""The scheduling policy under a fake clock: tiers, spread + jitter, fast re-probe, cascade.

An event-driven simulation: time jumps to the next thing that happens (a tier round, which
APScheduler drives in the agent; a due check; a check finishing), so the run is exact and fast.
"""

from __future__ import annotations

import heapq
import itertools
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from probes.agent.scheduler import ScheduleCore
from probes.config import TierPolicy
from probes.model import Tier

from .fakes import fleet, planned

pytestmark = pytest.mark.agent

TIERS = {
    "l4": TierPolicy(interval=2.0, timeout=1.0, fast_interval=0.5, rise=2, fall=3, jitter=0.1),
    "functional": TierPolicy(interval=15.0, timeout=5.0, fast_interval=2.0, rise=2, fall=3),
    "session": TierPolicy(interval=60.0, timeout=10.0, fast_interval=10.0, rise=2, fall=3),
}
RUN_TIME = 0.01  # every fake check takes 10 ms


@dataclass(frozen=True)
class Start:
    t: float
    due: float
    key: str
    why: str


def simulate(core: ScheduleCore, until: float,
             outcome: Callable[[str, float], bool]) -> list[Start]:
    starts: list[Start] = []
    rounds = {tier: 0.0 for tier in core.tiers_in_use()}
    finishing: list[tuple[float, str, bool]] = []
    t = 0.0
    while t <= until:
        for tier, at in rounds.items():
            if at <= t:
                core.open_round(tier, t)
                rounds[tier] = at + core.policy(tier).interval
        while finishing and finishing[0][0] <= t:
            _, key, ok = heapq.heappop(finishing)
            core.complete(key, ok, t)
        for due in core.pop_due(t):
            starts.append(Start(t, due.due, due.key, due.why))
            heapq.heappush(finishing, (t + RUN_TIME, due.key, outcome(due.key, t)))
        candidates = [*rounds.values()]
        if finishing:
            candidates.append(finishing[0][0])
        nxt = core.next_due()
        if nxt is not None:
            candidates.append(nxt)
        t = max(min(candidates), t + 1e-9)
    return starts


def _starts_of(starts: list[Start], key: str) -> list[float]:
    return [s.t for s in starts if s.key == key]


@pytest.fixture
def run() -> tuple[list[Start], ScheduleCore]:
    core = ScheduleCore(TIERS, rng=random.Random(7))
    core.load(fleet(40))

    def outcome(key: str, t: float) -> bool:
        # node-7's port is closed from t=100 s to t=130 s; everything else is healthy
        return not (key == "node-7/tcp" and 100.0 <= t < 130.0)

    return simulate(core, 200.0, outcome), core


def test_tiers_run_at_their_intervals(run: tuple[list[Start], ScheduleCore]) -> None:
    starts, _ = run
    for check, interval in (("tcp", 2.0), ("fake.handshake", 15.0), ("fake.session", 60.0)):
        steady = [s for s in starts if s.key == f"node-3/{check}" and s.why == "round"]
        gaps = [b.t - a.t for a, b in itertools.pairwise(steady)]
        assert gaps, check
        assert statistics.median(gaps) == pytest.approx(interval, rel=0.1), (check, gaps)


def test_start_offsets_spread_over_the_interval_with_jitter(
        run: tuple[list[Start], ScheduleCore]) -> None:
    starts, core = run
    first_round = [s.t for s in starts
                   if s.key.endswith("/tcp") and s.t < 2.0 and s.why == "round"]
    assert len(first_round) == 40
    bins = [0] * 8  # 0.25 s bins over the 2 s interval: 5 starts each if perfectly even
    for t in first_round:
        bins[int(t / 0.25)] += 1
    assert min(bins) >= 2 and max(bins) <= 8, bins
    # jitter: one check's offset inside its round varies round to round, within +-5 % of 2 s
    st = core.states["node-3/tcp"]
    offsets = [s.t % 2.0 for s in starts if s.key == "node-3/tcp" and s.why == "round"]
    assert len(set(round(o, 6) for o in offsets)) > 10
    assert all(abs(o - st.phase * 2.0) <= 0.1 + 1e-9 for o in offsets), (st.phase, offsets)


def test_fast_reprobe_until_fall_and_rise_settle(run: tuple[list[Start], ScheduleCore]) -> None:
    starts, _ = run
    tcp7 = [s for s in starts if s.key == "node-7/tcp"]
    failing = [s for s in tcp7 if 100.0 <= s.t < 130.0]
    first_fail = failing[0].t
    # fall=3: two fast re-probes confirm the failure, then the normal 2 s interval; fastinter
    # spaces the starts (0.5 s apart, each run taking 10 ms)
    assert [s.why for s in failing[:4]] == ["round", "fast", "fast", "round"]
    assert failing[1].t - first_fail == pytest.approx(0.5)
    assert failing[2].t - failing[1].t == pytest.approx(0.5)
    # recovery: first success, one fast re-probe (rise=2), then back to rounds
    after = [s for s in tcp7 if s.t >= 130.0]
    assert [s.why for s in after[:3]] == ["round", "fast", "round"]
    # a healthy node is never fast-probed after it first settled
    assert not [s for s in starts if s.key == "node-3/tcp" and s.why == "fast" and s.t > 5]


def test_l4_failure_cascades_to_functional(run: tuple[list[Start], ScheduleCore]) -> None:
    starts, _ = run
    first_fail = next(s.t for s in starts if s.key == "node-7/tcp" and s.t >= 100.0)
    cascades = [s for s in starts if s.why == "cascade"]
    assert cascades, "no cascade happened"
    assert {s.key for s in cascades} == {"node-7/fake.handshake"}
    # immediately: as soon as the failed L4 check finished
    assert cascades[0].t == pytest.approx(first_fail + RUN_TIME)
    # and not once per failed L4 run: at most once per functional fast_interval
    ts = [s.t for s in cascades]
    assert all(b - a >= 2.0 for a, b in itertools.pairwise(ts))


def test_admission_refuses_beyond_max_rate_and_reload_keeps_state() -> None:
    core = ScheduleCore(TIERS, max_rate=10.0)  # 10 starts/s = 20 L4 checks at 2 s
    report = core.load([planned(f"n{i}", Tier.L4) for i in range(30)])
    assert len(report.refused) == 10 and report.planned_rate == pytest.approx(10.0)
    core.open_round(Tier.L4, 0.0)
    for due in core.pop_due(2.0):
        core.complete(due.key, False, 2.0)
    before = core.states["n0/tcp"]
    again = core.load([planned(f"n{i}", Tier.L4) for i in range(5)])
    assert again.kept == 5 and again.removed == 15
    assert core.states["n0/tcp"] is before and before.last_ok is False
    assert core.states["n0/tcp"].phase == before.phase


def test_round_slots_are_the_phase_plus_the_seeded_jitter_draw() -> None:
    # each check of a round, in slot order, is placed at phase + rng.uniform(-j/2, j/2) of the
    # interval, reflected at the round's edges: the same seed gives the same slots
    core = ScheduleCore(TIERS, rng=random.Random(3))
    core.load(fleet(40, (Tier.L4,)))
    core.open_round(Tier.L4, 10.0)
    draws = random.Random(3)
    jitter, interval = TIERS["l4"].jitter, TIERS["l4"].interval
    expected = {}
    for st in sorted(core.states.values(), key=lambda s: s.phase):
        slot = st.phase + draws.uniform(-jitter / 2, jitter / 2)
        slot = -slot if slot < 0.0 else (2 * 0.999 - slot if slot > 0.999 else slot)
        expected[st.check.key] = 10.0 + slot * interval
    assert {key: st.due for key, st in core.states.items()} == expected
    assert any(due < 10.0 + st.phase * interval for due, st in
               zip(expected.values(), core.states.values(), strict=True))  # jitter both ways


def test_checks_due_at_the_same_time_start_in_the_order_they_were_queued() -> None:
    core = ScheduleCore(TIERS)
    core.load([planned(f"n{i}", Tier.L4) for i in range(3)])
    for key in ("n2/tcp", "n0/tcp", "n1/tcp"):
        assert core.request(key, 5.0) == "honoured"
    assert [d.key for d in core.pop_due(5.0)] == ["n2/tcp", "n0/tcp", "n1/tcp"]


def test_a_check_removed_by_a_reload_never_starts_and_one_added_again_starts_once() -> None:
    core = ScheduleCore(TIERS)
    core.load([planned(f"n{i}", Tier.L4) for i in range(4)])
    core.open_round(Tier.L4, 0.0)  # every check queued in [0, 2)
    core.load([planned(f"n{i}", Tier.L4) for i in range(2)])  # n2, n3 removed
    core.load([planned(f"n{i}", Tier.L4) for i in range(3)])  # n2 back: a new, idle state
    core.open_round(Tier.L4, 0.0)  # queues n2 (n0 and n1 are queued already)
    keys = [d.key for d in core.pop_due(2.0)]
    assert sorted(keys) == ["n0/tcp", "n1/tcp", "n2/tcp"]
    assert core.next_due() is None


def test_a_success_of_a_check_settled_up_changes_nothing_but_its_round_trip() -> None:
    core = ScheduleCore(TIERS)
    core.load([planned("n0", Tier.L4), planned("n0", Tier.FUNCTIONAL)])
    key = "n0/tcp"

    def run(ok: bool, now: float, duration: float = 0.01) -> tuple[bool, ...]:
        core.request(key, now)
        [due] = [d for d in core.pop_due(now) if d.key == key]
        return tuple(core.complete(due.key, ok, now + duration, duration))

    first = run(True, 0.0)
    assert first == (False, True, (), True, False, False)  # the first outcome settles at once
    st = core.states[key]
    assert run(True, 1.0, 0.02) == (False, True, (), False, False, False)
    assert (st.rtt_samples, st.streak, st.last_ok, st.running, st.due) == (2, 0, True, False,
                                                                           None)
    assert st.srtt == pytest.approx(0.01 * 7 / 8 + 0.02 / 8)
    assert core.next_due() is None  # nothing queued
    # a failure of it is a change (failing, a fast re-probe and a cascade are queued) ...
    failed = run(False, 2.0)
    assert failed[1:] == (True, ("n0/fake.handshake",), False, True, True)
    # ... and the success after it is one too: the check is no longer failing
    assert run(True, 3.0) == (False, True, (), False, False, True)
    assert run(True, 4.0) == (False, True, (), False, False, False)
