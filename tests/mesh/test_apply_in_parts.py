"""A heavy batch (and a tick's staleness wheel) is applied in parts, the event loop serving
other work between them (#22).

Between parts nothing else is applied (the batch holds the input turn) and nothing is decided:
the verdicts come from one settle after the last part, the same as the batch applied at once
(which is how a restart or ``mesh replay`` applies it). If the apply stops between parts (an
engine bug, or its task cancelled), the engine is rebuilt from the store: nothing of the batch
stays, nothing of it was journaled, and the agent sends it again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.mesh import service as service_module
from probes.mesh.decision import CHECK_DOWN, DecisionEngine, whole
from probes.mesh.policy import DampingPolicy, DecisionPolicy
from probes.mesh.service import MeshService
from probes.mesh.store_sqlite import SQLiteStore
from probes.model import ObservationBatch, Reason, Verdict, VerdictState, encode
from probes.model.columnar import columnar_body, decode_received, observation_row
from tests.mesh.helpers import fleet, obs

pytestmark = pytest.mark.mesh

POLICY = DecisionPolicy(damping=DampingPolicy(enabled=False))
PART = 100  # observations per part in these tests
NODES = 4


def _batch(agent: str, seq: int, results: list[tuple[str, bool]], at: float,
           ) -> tuple[bytes, ObservationBatch]:
    # observation seqs from the batch's: two services fed the same batches hold the same rows
    b = ObservationBatch(version=1, agent=agent, batch_seq=seq, sent_at=at,
                         observations=[obs(n, agent, ok, at=at, seq=seq * 10_000 + i)
                                       for i, (n, ok) in enumerate(results)])
    return encode(b), b


def _heavy(wire: str) -> bytes:
    """vb's batch 2 at 3.0: n0 failing three times (its check goes DOWN in the first part),
    then three more parts of passes of the other nodes; as JSON or columnar."""
    passes = [(f"n{1 + i % (NODES - 1)}", True) for i in range(3 * PART)]
    body, b = _batch("vb", 2, [("n0", False)] * 3 + passes, 3.0)
    if wire == "json":
        return body
    columnar = columnar_body("vb", 2, 3.0, b.observations)
    assert columnar is not None
    return columnar


def _accept(svc: MeshService, body: bytes, now: float) -> Coroutine[Any, Any, list[Verdict]]:
    return svc.accept_body(body, decode_received, "vb", 3 * PART + 3, now)


WIRES = pytest.mark.parametrize("wire", ["json", "columnar"])


async def _service(path: Path) -> MeshService:
    """Every node UP from va, vb, vc; va's check of n0 already DOWN (one of three: still UP)."""
    svc = MeshService(SQLiteStore(path), POLICY, fleet(NODES))
    for agent in ("va", "vb", "vc"):
        body, b = _batch(agent, 1, [(f"n{i}", True) for i in range(NODES)], 1.0)
        await svc.accept_batch(body, b, 1.0)
    body, b = _batch("va", 2, [("n0", False)] * 3, 2.0)
    assert await svc.accept_batch(body, b, 2.0) == []
    assert svc.engine.nodes["n0"].state == VerdictState.UP
    return svc


def _n0_from_vb(svc: MeshService) -> tuple[int, VerdictState]:
    """(vb's check state of n0, n0's verdict)."""
    return svc.engine.check_state("n0", "vb", "wg").state, svc.engine.nodes["n0"].state


async def _watch(svc: MeshService, running: asyncio.Future[Any],
                 seen: list[tuple[int, VerdictState]],
                 on_mid_apply: Callable[[], None] | None = None) -> None:
    """What another task sees of n0 while ``running`` runs (every time the loop lets it)."""
    while not running.done():
        state = _n0_from_vb(svc)
        seen.append(state)
        if state == (CHECK_DOWN, VerdictState.UP) and on_mid_apply is not None:
            on_mid_apply()
            on_mid_apply = None
        await asyncio.sleep(0)


@pytest.fixture(autouse=True)
def _small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "APPLY_PART", PART)
    monkeypatch.setattr(service_module, "TICK_PART", 2)


@WIRES
async def test_the_loop_serves_other_work_between_parts_and_nothing_is_decided_before_the_end(
        tmp_path: Path, wire: str) -> None:
    svc = await _service(tmp_path / "m.db")
    body = _heavy(wire)
    accepting = asyncio.ensure_future(_accept(svc, body, 3.0))
    seen: list[tuple[int, VerdictState]] = []
    await _watch(svc, accepting, seen)
    verdicts = accepting.result()
    # another task ran while the batch was half applied: vb's check of n0 already DOWN (first
    # part), n0 not yet (two of three vantages DOWN is decided at the end)
    assert (CHECK_DOWN, VerdictState.UP) in seen
    assert [(v.node, v.state) for v in verdicts] == [("n0", VerdictState.DOWN)]
    # the same verdict and engine as the journaled batch applied at once (a restart's replay)
    twin = await _service(tmp_path / "twin.db")
    twin_verdicts = await _applied_at_once(twin, body, 3.0)
    assert [msg(v) for v in verdicts] == [msg(v) for v in twin_verdicts]
    assert svc.engine.to_rows() == twin.engine.to_rows()
    await svc.close()
    await twin.close()


async def _applied_at_once(svc: MeshService, body: bytes, now: float) -> list[Verdict]:
    with pytest.MonkeyPatch.context() as m:
        m.setattr(service_module, "APPLY_PART", 10**9)
        return await _accept(svc, body, now)


def msg(v: Verdict) -> tuple[Any, ...]:
    return v.node, v.state, v.seq, v.decided_at, [r.what for r in v.reasons]


@WIRES
async def test_a_batch_cancelled_between_parts_leaves_nothing_behind(
        tmp_path: Path, wire: str) -> None:
    path = tmp_path / "m.db"
    svc = await _service(path)
    before = (svc.engine.to_rows(), svc.store.journal_length(), dict(svc.agent_seq))
    body = _heavy(wire)
    accepting = asyncio.ensure_future(_accept(svc, body, 3.0))

    def cancel_the_apply() -> None:
        for task in svc._running:  # the input's own task (its caller's cancel would not stop it)
            task.cancel()

    await _watch(svc, accepting, [], cancel_the_apply)
    with pytest.raises(asyncio.CancelledError):
        accepting.result()
    assert not svc.health.diverged
    assert (svc.engine.to_rows(), svc.store.journal_length(), dict(svc.agent_seq)) == before
    # the agent sends it again: taken whole, once
    assert [v.node for v in await _accept(svc, body, 3.5)] == ["n0"]
    await svc.close()
    restarted = MeshService(SQLiteStore(path), POLICY, fleet(NODES))
    assert restarted.engine.nodes["n0"].state == VerdictState.DOWN
    assert restarted.engine.observations_total == svc.engine.observations_total
    await restarted.close()


async def test_an_engine_failure_in_a_later_part_leaves_nothing_of_the_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = await _service(tmp_path / "m.db")
    before = (svc.engine.to_rows(), svc.store.journal_length(), dict(svc.agent_seq))
    original = DecisionEngine._absorb
    parts: list[int] = []

    def fails_in_the_third_part(self: DecisionEngine, rows: Any, now: float) -> None:
        rows = list(rows)
        parts.append(len(rows))
        if len(parts) == 3:
            raise RuntimeError("bug")
        original(self, rows, now)

    body = _heavy("json")
    with monkeypatch.context() as m:
        m.setattr(DecisionEngine, "_absorb", fails_in_the_third_part)
        with pytest.raises(RuntimeError):
            await _accept(svc, body, 3.0)
    assert parts[:3] == [PART, PART, PART]  # (then the rebuild's replay of the journal)
    assert not svc.health.diverged
    assert (svc.engine.to_rows(), svc.store.journal_length(), dict(svc.agent_seq)) == before
    assert [v.node for v in await _accept(svc, body, 3.5)] == ["n0"]
    await svc.close()


# ---- the engine: in parts or at once, the same -------------------------------------------------

_REASONS = [Reason.OK, Reason.TIMEOUT, Reason.REFUSED, Reason.TUNNEL_LOSS]
_observation = st.tuples(st.integers(0, NODES - 1), st.sampled_from(["va", "vb", "vc"]),
                         st.sampled_from(["wg", "tcp"]), st.sampled_from(_REASONS))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(_observation, max_size=40), st.integers(1, 9)),
                min_size=1, max_size=8))
def test_observations_in_parts_decide_what_they_decide_at_once(
        batches: list[tuple[list[tuple[int, str, str, Reason]], int]]) -> None:
    at_once = DecisionEngine(POLICY, fleet(NODES, pool_of=2))
    in_parts = DecisionEngine(POLICY, fleet(NODES, pool_of=2))
    for i, (results, part) in enumerate(batches):
        now = 10.0 + 3 * i
        observations = [obs(f"n{n}", v, reason is Reason.OK, check=check, reason=reason, at=now)
                        for n, v, check, reason in results]
        expected = at_once.observe(observations, now)
        rows = map(observation_row, observations)
        assert whole(in_parts.observe_rows_in_parts(rows, now, count=len(observations),
                                                    part=part)) == expected
        assert in_parts.to_rows() == at_once.to_rows()
        assert in_parts.corroboration_asks(now) == at_once.corroboration_asks(now)


async def test_a_tick_serves_the_loop_between_parts_of_its_staleness_wheel(
        tmp_path: Path) -> None:
    """vb and vc stop reporting: the tick past stale_after looks at their 8 (node, vantage)
    pairs (and va's 4), 2 at a time; n0..n3 lose their quorum only at its end."""
    svc = MeshService(SQLiteStore(tmp_path / "m.db"), POLICY, fleet(NODES))
    for agent in ("va", "vb", "vc"):
        body, b = _batch(agent, 1, [(f"n{i}", True) for i in range(NODES)], 1.0)
        await svc.accept_batch(body, b, 1.0)
    still_fresh = POLICY.stale_after_seconds  # vb's and vc's reports not stale yet
    body, b = _batch("va", 2, [(f"n{i}", True) for i in range(NODES)], still_fresh)
    await svc.accept_batch(body, b, still_fresh)
    later = 1.0 + POLICY.stale_after_seconds + 2
    pairs = [nv for node in svc.engine.nodes.values() for nv in node.nvs.values()]

    def looked_at() -> tuple[int, set[bool]]:
        stale_seen = sum(not nv.wheeled for nv in pairs)
        return stale_seen, {node.quorum_lost for node in svc.engine.nodes.values()}

    ticking = asyncio.ensure_future(svc.tick(later))
    seen = []
    while not ticking.done():
        seen.append(looked_at())
        await asyncio.sleep(0)
    verdicts = ticking.result()
    # another task ran between parts: some of the stale pairs looked at, no quorum lost yet
    assert any(0 < stale < 8 and lost == {False} for stale, lost in seen)
    assert looked_at() == (8, {True})
    assert verdicts == []  # quorum lost keeps the last verdict (an audit note, not a verdict)
    await svc.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, NODES - 1), st.sampled_from(["va", "vb", "vc"]),
                          st.floats(0, 40)), max_size=60),
       st.integers(1, 5), st.floats(30, 80))
def test_a_tick_in_parts_decides_what_it_decides_at_once(
        seen: list[tuple[int, str, float]], part: int, at: float) -> None:
    at_once = DecisionEngine(POLICY, fleet(NODES, pool_of=2))
    in_parts = DecisionEngine(POLICY, fleet(NODES, pool_of=2))
    for n, v, t in sorted(seen, key=lambda x: x[2]):
        batch = [obs(f"n{n}", v, True, at=t)]
        assert at_once.observe(batch, t) == in_parts.observe(batch, t)
    expected = at_once.tick(at)
    assert whole(in_parts.tick_in_parts(at, part)) == expected
    assert in_parts.to_rows() == at_once.to_rows()
