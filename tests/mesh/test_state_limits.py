"""Per-agent limits on engine state, with expiry (issue #17, item 9): one agent made 400,000
distinct check names (+238 MiB), never expired. Now a (node, agent) keeps at most
``limits.max_checks_per_node`` checks, checks and (node, agent) pairs silent for
``limits.forget_after_seconds`` are forgotten, and all of it replays the same after a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from probes.mesh.decision import DecisionEngine
from probes.mesh.policy import (
    DampingPolicy,
    DecisionPolicy,
    PolicyError,
    StateLimits,
    policy_from_mapping,
)
from tests.mesh.apptest import Mesh, mesh_app
from tests.mesh.helpers import fleet, obs

pytestmark = pytest.mark.mesh

DAY = 86_400.0
POLICY = DecisionPolicy(damping=DampingPolicy(enabled=False),
                        limits=StateLimits(max_checks_per_node=8, forget_after_seconds=600))


def report(eng: DecisionEngine, now: float, vantage: str, checks: list[str],
           nodes: tuple[str, ...] = ("n0",)) -> None:
    eng.observe([obs(n, vantage, True, check=c, at=now) for n in nodes for c in checks], now)


def test_an_agent_cannot_make_unbounded_check_state() -> None:
    eng = DecisionEngine(POLICY, fleet(2))
    for start in range(0, 4000, 400):  # 4,000 distinct names, in batches
        report(eng, 1.0, "va", [f"c{i}" for i in range(start, start + 400)], ("n0", "n1"))
    assert eng.check_count() == 2 * 8
    assert eng.check_limit_total == 2 * (4000 - 8)
    report(eng, 2.0, "vb", ["wg"])  # another agent is not affected
    assert eng.check_count() == 2 * 8 + 1


def test_renamed_checks_make_room_once_the_old_names_are_silent() -> None:
    eng = DecisionEngine(POLICY, fleet(1))
    report(eng, 0.0, "va", [f"old{i}" for i in range(8)])
    report(eng, 100.0, "va", ["new0"])
    assert eng.check_count() == 8 and eng.check_limit_total == 1  # the old ones are recent
    for t in range(200, 800, 10):  # the agent now reports new0 only; old* fall silent
        report(eng, float(t), "va", ["new0"])
        eng.tick(float(t) + 0.5)
    report(eng, 800.0, "va", ["new1", "new2"])
    names = {c.name for nv in eng.nodes["n0"].nvs.values() for c in nv.checks}
    assert names == {"new0", "new1", "new2"} and eng.forgotten_checks_total == 8


def test_a_silent_agent_is_forgotten_and_replays_the_same() -> None:
    ref = DecisionEngine(POLICY, fleet(3))
    report(ref, 0.0, "gone", ["wg", "tcp"], ("n0", "n1", "n2"))
    again: DecisionEngine | None = None
    for t in range(1, 120):  # "gone" stops reporting; the others go on
        now = float(t * 10)
        batch = [obs(n, "va", True, at=now) for n in ("n0", "n1", "n2")]
        engines = [ref] if again is None else [ref, again]
        for eng in engines:  # the same inputs to both
            eng.observe(batch, now)
            eng.tick(now + 0.5)
        if t == 40:  # a restart in the middle: stale, not yet forgotten
            rows = ref.to_rows()
            assert "gone" in ref.vantages
            again = DecisionEngine.from_rows(rows)
            assert again.to_rows() == rows
    assert "gone" not in ref.vantages and "gone" not in ref.nodes["n0"].nvs
    assert ref.forgotten_checks_total == 6 and ref.check_count() == 3
    assert again is not None and again.to_rows() == ref.to_rows()


def test_limits_are_validated_naming_the_field() -> None:
    with pytest.raises(PolicyError) as info:
        policy_from_mapping({"limits": {"max_checks_per_node": 0}})
    assert info.value.path == "decision.limits.max_checks_per_node"
    with pytest.raises(PolicyError) as info:  # would forget state the vote still reads
        policy_from_mapping({"limits": {"forget_after_seconds": 10}})
    assert info.value.path == "decision.limits.forget_after_seconds"
    never = policy_from_mapping({"limits": {"forget_after_seconds": 0}})
    assert never.limits.forget_after_seconds == 0


async def test_through_the_mesh_state_stays_bounded_and_says_so(tmp_path: Path) -> None:
    async with mesh_app(tmp_path, extra="max_body_bytes: 1048576\n"
                        "decision: {limits: {max_checks_per_node: 8}}\n") as mesh:
        await _flood(mesh)
        metrics = await (await mesh.client.get("/metrics")).text()
        assert "tunnelwatch_mesh_check_states 32.0" in metrics  # 4 nodes x 8
        assert 'tunnelwatch_mesh_observations_dropped_total{reason="check-limit"} 7968.0' in metrics


async def _flood(mesh: Mesh) -> None:
    from probes.model import ObservationBatch, encode

    for seq in range(1, 5):
        observations = [obs(f"n{i % 4}", "va", True, check=f"x{seq}-{i}", at=mesh.now)
                        for i in range(2000)]
        body = encode(ObservationBatch(version=1, agent="va", batch_seq=seq, sent_at=mesh.now,
                                       observations=observations))
        status, _ = await mesh.post("va", body)
        assert status == 200
