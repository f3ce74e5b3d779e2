"""``/metrics`` of the mesh: a custom Collector that reads the engine's state at scrape time.

Nothing is updated on the hot path: the engine and the ingest keep plain integer counters and the
collector turns them into metric families when Prometheus scrapes. Labels are bounded: node, pool
and vantage ids come from the config, states and reasons from closed sets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from probes.mesh.ingest import IngestStats
from probes.mesh.service import MeshService
from probes.model import VerdictState

P = "tunnelwatch_mesh_"


class MeshCollector(Collector):
    def __init__(self, service: Callable[[], MeshService], ingest: IngestStats) -> None:
        # a callable: the service's engine may be rebuilt after a store failure
        self._service = service
        self._ingest = ingest

    def collect(self) -> Iterator[Metric]:
        service = self._service()
        engine = service.engine
        now = service.last_now

        by_state = GaugeMetricFamily(
            P + "nodes", "Nodes by published verdict state.", labels=["state"]
        )
        counts = Counter(node.state for node in engine.nodes.values())
        for state in VerdictState:
            by_state.add_metric([state.value], counts.get(state, 0))
        yield by_state

        verdict = GaugeMetricFamily(
            P + "node_verdict",
            "1 for the node's published verdict state.",
            labels=["node", "pool", "state"],
        )
        votes = GaugeMetricFamily(
            P + "node_votes",
            "Vantages by their vote on the node at its last evaluation.",
            labels=["node", "vote"],
        )
        quorum = GaugeMetricFamily(
            P + "node_quorum_lost", "1 when too few vantages could vote.", labels=["node"]
        )
        for name, node in engine.nodes.items():
            verdict.add_metric([name, node.info.pool, node.state.value], 1)
            v = node.votes
            for label, value in (
                ("up", v.up),
                ("degraded", v.degraded),
                ("down", v.down),
                ("stale", v.excluded_stale),
                ("impaired", v.excluded_impaired),
            ):
                votes.add_metric([name, label], value)
            quorum.add_metric([name], int(node.quorum_lost))
        yield verdict
        yield votes
        yield quorum

        transitions = CounterMetricFamily(
            P + "verdict_transitions",
            "Verdict changes by from and to state.",
            labels=["from", "to"],
        )
        for (old, new), value in sorted(engine.transitions.items()):
            transitions.add_metric([old, new], value)
        yield transitions

        impaired = GaugeMetricFamily(
            P + "vantage_impaired", "1 while the vantage is judged impaired.", labels=["vantage"]
        )
        fresh = GaugeMetricFamily(
            P + "vantage_last_report_age_seconds",
            "Seconds since the vantage's last accepted observation.",
            labels=["vantage"],
        )
        for name, vantage in engine.vantages.items():
            impaired.add_metric([name], int(vantage.impaired))
            seen = max((nv.seen for nv in vantage.nvs), default=now)
            fresh.add_metric([name], max(0.0, now - seen))
        yield impaired
        yield fresh

        holding = GaugeMetricFamily(
            P + "pool_guard_holding", "Nodes the pool guard keeps from going DOWN.", labels=["pool"]
        )
        for name, pool in engine.pools.items():
            holding.add_metric([name], len(pool.held))
        yield holding
        yield CounterMetricFamily(
            P + "guard_holds",
            "Times the pool guard started holding a node.",
            value=engine.guard_holds_total,
        )
        yield CounterMetricFamily(
            P + "damping_suppressions",
            "Times flap damping began holding a check down.",
            value=engine.damping_suppressions_total,
        )
        yield CounterMetricFamily(
            P + "observations_applied",
            "Observations applied to the engine.",
            value=engine.observations_total,
        )
        dropped = CounterMetricFamily(
            P + "observations_dropped", "Observations not applied, by reason.", labels=["reason"]
        )
        dropped.add_metric(["unknown-node"], engine.unknown_node_total)
        dropped.add_metric(["duplicate"], engine.duplicate_total)
        dropped.add_metric(["late"], engine.late_total)
        dropped.add_metric(["agent-side"], engine.agent_side_total)
        yield dropped

        stats = self._ingest
        yield CounterMetricFamily(
            P + "ingest_batches", "Agent batches accepted.", value=stats.batches_total
        )
        yield CounterMetricFamily(
            P + "ingest_observations",
            "Observations in accepted batches.",
            value=stats.observations_total,
        )
        yield CounterMetricFamily(
            P + "ingest_bytes", "Bytes of accepted batches.", value=stats.bytes_total
        )
        rejects = CounterMetricFamily(
            P + "ingest_rejects", "Agent batches rejected, by reason.", labels=["reason"]
        )
        for reason, value in stats.rejects.items():
            rejects.add_metric([reason], value)
        yield rejects
        yield GaugeMetricFamily(
            P + "journal_entries",
            "Journal entries a restart would replay.",
            value=service.journal_since_snapshot,
        )
        yield GaugeMetricFamily(
            P + "snapshot_pause_seconds",
            "How long the last engine snapshot blocked the mesh (fork only, when in background).",
            value=service.last_snapshot_seconds,
        )
        yield CounterMetricFamily(
            P + "snapshots_background",
            "Engine snapshots written by a forked child.",
            value=service.snapshots_background_total,
        )
        yield GaugeMetricFamily(
            P + "check_states", "Tracked (node, vantage, check) states.", value=engine.check_count()
        )
