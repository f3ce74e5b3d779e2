"""The weight engine inside the mesh service: load reads never reach the decision engine, weights
follow committed inputs, verdicts carry the weight, and a restart (snapshot + journal replay,
crash or clean) continues with the same weights and sequence numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from probes.mesh.policy import DecisionPolicy
from probes.mesh.service import MeshService
from probes.mesh.store_sqlite import SQLiteStore
from probes.mesh.weight_policy import WeightPolicy
from probes.mesh.weights import WeightNode, split_load
from probes.model import NodeLoad, Observation, ObservationBatch, VerdictState, encode
from tests.mesh.helpers import fleet, obs

pytestmark = pytest.mark.mesh

WEIGHTS = WeightPolicy(enabled=True, slow_start_seconds=10.0)
VANTAGES = ("va", "vb", "vc")


def load_obs(node: str, vantage: str, busy: float, seq: int, at: float,
             sessions: int = 3) -> Observation:
    return Observation(node=node, check="load", vantage=vantage, seq=seq, wall_time=at, ok=True,
                       reason=obs(node, vantage, True).reason, duration_seconds=0.01,
                       kind="telemetry.load",
                       load=NodeLoad(1.0, cpu_busy_ratio=busy, active_sessions=sessions))


class Feeder:
    """Sends one batch per vantage per second: every node's check, and va's load reads."""

    def __init__(self, svc: MeshService) -> None:
        self.svc = svc
        self.batch_seq = 0
        self.obs_seq = 0

    async def second(self, t: float, up: dict[str, bool], busy: dict[str, float]) -> None:
        self.batch_seq += 1
        for vantage in VANTAGES:
            items = []
            for node, ok in up.items():
                self.obs_seq += 1
                items.append(obs(node, vantage, ok, at=t, seq=self.obs_seq))
            if vantage == "va":
                for node, value in busy.items():
                    self.obs_seq += 1
                    items.append(load_obs(node, vantage, value, self.obs_seq, t))
            batch = ObservationBatch(1, vantage, self.batch_seq, t, items)
            await self.svc.accept_batch(encode(batch), batch, t)
        await self.svc.tick(t + 0.5)


def service(db: Path, *, weights: WeightPolicy | None = WEIGHTS) -> MeshService:
    nodes = fleet(3)
    # no dwell: the script takes n1 down and back within 4 s, and the weights' slow start must
    # run its course before the script ends
    return MeshService(SQLiteStore(db), DecisionPolicy(min_dwell_seconds=0), nodes,
                       weight_policy=weights,
                       weight_nodes=[WeightNode(n.node, n.pool) for n in nodes])


async def script(feeder: Feeder, start: float, seconds: int) -> None:
    for i in range(seconds):
        t = start + i
        hot = 0.99 if 3 <= i < 9 else 0.3
        await feeder.second(t, {"n0": True, "n1": i < 5 or i > 7, "n2": True},
                      {"n0": hot, "n1": 0.3, "n2": 0.3})


def test_load_reads_are_split_from_checks() -> None:
    checks = [obs("n0", "va", True), obs("n1", "va", False)]
    loads = [load_obs("n0", "va", 0.5, 99, 0.0)]
    left, taken = split_load([checks[0], loads[0], checks[1]])
    assert list(left) == checks
    assert taken == [("n0", loads[0].load)]
    assert split_load(checks)[0] is checks  # nothing to split: no copy


async def test_load_reads_never_vote_even_without_weights(tmp_path: Path) -> None:
    svc = service(tmp_path / "m.db", weights=None)
    assert svc.weights is None
    feeder = Feeder(svc)
    await feeder.second(0.0, {}, {"n0": 0.5, "n1": 0.5, "n2": 0.5})
    await feeder.second(1.0, {}, {"n0": 0.5, "n1": 0.5, "n2": 0.5})
    assert svc.engine.check_count() == 0  # no check state was made from a load read
    assert {n.state for n in svc.engine.nodes.values()} == {VerdictState.UNKNOWN}
    await svc.close()


async def test_weights_follow_load_and_states_and_verdicts_carry_them(tmp_path: Path) -> None:
    svc = service(tmp_path / "m.db")
    seen: list = []
    svc.weight_listeners.append(seen.extend)
    verdicts: list = []
    svc.listeners.append(verdicts.extend)
    await script(Feeder(svc), 0.0, 20)
    n0 = [c.weight for c in seen if c.node == "n0"]
    assert n0[0] == 100 and 50 in n0 and n0[-1] == 100  # hot for 5 s, cut -50 %, then back
    n1 = [(c.weight, c.state) for c in seen if c.node == "n1"]
    assert (0, VerdictState.DOWN) in n1
    assert n1[-1] == (100, VerdictState.UP)  # through slow start
    assert any(c.reasons and c.reasons[0].what == "slow-start" for c in seen if c.node == "n1")
    down = next(v for v in verdicts if v.node == "n1" and v.state == VerdictState.DOWN)
    assert down.weight == 0
    assert all(v.weight is not None for v in verdicts)
    await svc.close()


@pytest.mark.parametrize("snapshot_every", [1, 7, 10_000])
async def test_restart_continues_the_same_weights(tmp_path: Path, snapshot_every: int) -> None:
    ref = service(tmp_path / "ref.db")
    expected: list = []
    ref.weight_listeners.append(expected.extend)
    feeder = Feeder(ref)
    await script(feeder, 0.0, 12)
    await script(feeder, 12.0, 12)
    await ref.close()

    db = tmp_path / "m.db"
    first = service(db)
    first.snapshot_every = snapshot_every
    got: list = []
    first.weight_listeners.append(got.extend)
    feeder = Feeder(first)
    await script(feeder, 0.0, 12)
    first.store.close()  # a crash: no final snapshot
    second = service(db)
    second.snapshot_every = snapshot_every
    second.weight_listeners.append(got.extend)
    assert second.weights is not None and first.weights is not None
    assert second.weights.to_builtins() == first.weights.to_builtins()
    feeder.svc = second
    await script(feeder, 12.0, 12)
    assert encode(got) == encode(expected)
    await second.close()
