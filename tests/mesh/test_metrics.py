"""The /metrics collector reports what the alert rules watch: impaired vantages, guard holds,
quorum loss, damping, dropped observations."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from probes.mesh.ingest import IngestStats
from probes.mesh.metrics import MeshCollector
from probes.mesh.policy import DampingPolicy, DecisionPolicy, PoolGuardPolicy
from probes.mesh.service import MeshService
from probes.mesh.store_sqlite import SQLiteStore
from probes.model import ObservationBatch, encode
from tests.mesh.helpers import fleet, obs

pytestmark = pytest.mark.mesh


async def test_collector_reports_impairment_guard_and_drops(tmp_path: Path) -> None:
    policy = DecisionPolicy(
        pool_guard=PoolGuardPolicy(max_down_share=0.25), damping=DampingPolicy(enabled=False)
    )
    svc = MeshService(SQLiteStore(tmp_path / "m.db"), policy, fleet(8))
    seq = 0

    async def send(agent: str, results: dict[str, bool], t: float) -> None:
        nonlocal seq
        seq += 1
        b = ObservationBatch(
            version=1,
            agent=agent,
            batch_seq=seq,
            sent_at=t,
            observations=[obs(n, agent, ok, at=t) for n, ok in results.items()],
        )
        await svc.accept_batch(encode(b), b, t)

    nodes = [f"n{i}" for i in range(8)]
    for agent in ("va", "vb", "vc", "vd"):
        await send(agent, dict.fromkeys(nodes, True), 0.0)
    for t in range(1, 7):  # vd: down at t=3, impaired once contradicted for confirm_seconds
        for agent in ("va", "vb", "vc", "vd"):
            # vd sees the whole fleet down (impaired); va..vc see n0..n2 down (guard: 2 of 8)
            await send(agent, {n: agent != "vd" and int(n[1:]) >= 3 for n in nodes}, float(t))
    svc.engine.observe([obs("ghost", "va", True, at=6.0)], 6.0)
    registry = CollectorRegistry()
    registry.register(MeshCollector(lambda: svc, IngestStats()))
    text = generate_latest(registry).decode()
    for line in (
        'tunnelwatch_mesh_vantage_impaired{vantage="vd"} 1.0',
        'tunnelwatch_mesh_vantage_impaired{vantage="va"} 0.0',
        'tunnelwatch_mesh_pool_guard_holding{pool="p0"} 1.0',
        "tunnelwatch_mesh_guard_holds_total 1.0",
        'tunnelwatch_mesh_nodes{state="DOWN"} 2.0',
        'tunnelwatch_mesh_nodes{state="UP"} 6.0',
        'tunnelwatch_mesh_node_votes{node="n0",vote="impaired"} 1.0',
        'tunnelwatch_mesh_node_votes{node="n0",vote="down"} 3.0',
        'tunnelwatch_mesh_observations_dropped_total{reason="unknown-node"} 1.0',
        'tunnelwatch_mesh_verdict_transitions_total{from="UP",to="DOWN"} 2.0',
        "tunnelwatch_mesh_check_states 32.0",
        "tunnelwatch_mesh_store_up 1.0",
    ):
        assert line in text, line
    await svc.close()
