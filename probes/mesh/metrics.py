"""``/metrics`` of the mesh: a custom Collector that reads the engine's state at scrape time.

Nothing is updated on the hot path: the engine and the ingest keep plain integer counters and the
collector turns them into metric families when Prometheus scrapes. Labels are bounded: node, pool
and vantage ids come from the config, states and reasons from closed sets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from probes.mesh.connections import ConnectionGuard
from probes.mesh.ingest import IngestStats
from probes.mesh.reprobe import RESULTS as REPROBE_RESULTS
from probes.mesh.reprobe import ReprobePlanner
from probes.mesh.service import MeshService
from probes.mesh.state import NodeState, NodeVantage
from probes.mesh.weights import NodeWeight, WeightEngine
from probes.model import VerdictState, Votes

P = "tunnelwatch_mesh_"


def node_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily,
                             GaugeMetricFamily]:
    """The per-node families, empty (nodes by state, verdict, votes, quorum lost): their
    names, help and labels in one place for the collector and the text renderer."""
    return (
        GaugeMetricFamily(P + "nodes", "Nodes by published verdict state.", labels=["state"]),
        GaugeMetricFamily(P + "node_verdict", "1 for the node's published verdict state.",
                          labels=["node", "pool", "state"]),
        GaugeMetricFamily(P + "node_votes",
                          "Vantages by their vote on the node at its last evaluation.",
                          labels=["node", "vote"]),
        GaugeMetricFamily(P + "node_quorum_lost", "1 when too few vantages could vote.",
                          labels=["node"]),
    )


def vote_values(v: Votes) -> tuple[tuple[str, int], ...]:
    """A node's ``node_votes`` series: each vote label with its count, in exposition order."""
    return (("up", v.up), ("degraded", v.degraded), ("down", v.down),
            ("stale", v.excluded_stale), ("impaired", v.excluded_impaired))


def last_report(nvs: Iterable[NodeVantage]) -> float | None:
    """When the latest of these (node, vantage) pairs' observations was accepted (None: none)."""
    return max((nv.seen for nv in nvs), default=None)


class MeshCollector(Collector):
    def __init__(self, service: Callable[[], MeshService], ingest: IngestStats,
                 reprobe: ReprobePlanner | None = None,
                 guard: ConnectionGuard | None = None) -> None:
        # a callable: the service's engine may be rebuilt after a store failure
        self.service = service
        self._ingest = ingest
        self._reprobe = reprobe
        self._guard = guard

    def collect(self) -> Iterator[Metric]:
        service = self.service()
        by_state, verdict, votes, quorum = node_families()
        counts = Counter(node.state for node in service.engine.nodes.values())
        for state in VerdictState:
            by_state.add_metric([state.value], counts.get(state, 0))
        for name, node in service.engine.nodes.items():
            verdict.add_metric([name, node.info.pool, node.state.value], 1)
            for label, value in vote_values(node.votes):
                votes.add_metric([name, label], value)
            quorum.add_metric([name], int(node.quorum_lost))
        yield from (by_state, verdict, votes, quorum)
        yield from self.collect_rest(service)

    def collect_rest(self, service: MeshService,
                     last_seen: Mapping[str, float] | None = None) -> Iterator[Metric]:
        """Every family but :func:`node_families`' (those are the bulk at thousands of nodes:
        :mod:`probes.mesh.exposition` writes them from per-node text kept between scrapes).
        ``last_seen``: each vantage's :func:`last_report`, when the caller took them already
        (a vantage's are all its nodes: the exposition reads them in slices)."""
        engine = service.engine
        now = service.last_now

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
        contradicted = GaugeMetricFamily(
            P + "vantage_contradicted",
            "1 while the vantage's peers hold fresh contrary evidence (impaired once confirmed).",
            labels=["vantage"],
        )
        for name, vantage in engine.vantages.items():
            impaired.add_metric([name], int(vantage.impaired))
            contradicted.add_metric([name], int(vantage.contradicted))
            latest = (last_seen[name] if last_seen is not None and name in last_seen
                      else last_report(vantage.nvs))
            seen = now if latest is None else latest
            fresh.add_metric([name], max(0.0, now - seen))
        yield impaired
        yield contradicted
        yield fresh
        audit = CounterMetricFamily(
            P + "audit_events",
            "Engine decisions that change no published state (quorum, impairment, dwell).",
            labels=["what"],
        )
        for what, value in engine.audit_totals.items():
            audit.add_metric([what], value)
        yield audit

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
        dropped.add_metric(["check-limit"], engine.check_limit_total)
        yield dropped

        requests = CounterMetricFamily(
            P + "reprobe_requests",
            "Re-probe requests to other vantages when a check began failing (corroboration on "
            "demand), by result: sent, or dropped by cooldown, agent-rate, expired.",
            labels=["result"],
        )
        for result in REPROBE_RESULTS:
            requests.add_metric(
                [result], self._reprobe.counts[result] if self._reprobe is not None else 0)
        yield requests

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
        health = service.health
        yield GaugeMetricFamily(
            P + "store_up",
            "1 while the store commits; 0 while it cannot (inputs are refused, 503).",
            value=int(health.ok))
        yield GaugeMetricFamily(
            P + "engine_diverged",
            "1 while the engine could not be rebuilt from the store after a failed commit.",
            value=int(health.diverged))
        yield CounterMetricFamily(
            P + "store_commit_failures", "Commits the store failed (nothing of them was kept).",
            value=health.commit_failures_total)
        yield CounterMetricFamily(
            P + "engine_rebuilds", "Times the engine was rebuilt from the store after a failure.",
            value=health.rebuilds_total)
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
        yield CounterMetricFamily(
            P + "check_states_forgotten",
            "Check states forgotten: not reported for decision.limits.forget_after_seconds.",
            value=engine.forgotten_checks_total)
        guard = self._guard
        if guard is not None:
            yield GaugeMetricFamily(P + "connections", "Client connections open.", value=guard.open)
            yield GaugeMetricFamily(P + "connections_limit", "Client connections allowed at once.",
                                    value=guard.limit)
            yield CounterMetricFamily(
                P + "connections_evicted",
                "Unauthenticated connections closed to make room for a new one at the limit.",
                value=guard.evicted_total)
            yield CounterMetricFamily(
                P + "connections_refused",
                "New connections closed at once: every slot held by authenticated clients.",
                value=guard.refused_total)
        yield from path_metrics(service, now)
        yield CounterMetricFamily(
            P + "ingest_traces", "Path traces in accepted batches.", value=stats.traces_total
        )


# the smoothed load signals the weight engine holds per node, as gauges (docs/weights.md)
_LOAD_GAUGES = (
    ("cpu", "node_load_cpu_busy_ratio", "Smoothed CPU busy share (host or VPN daemon)."),
    ("drops", "node_load_drop_ratio", "Smoothed share of packets the node dropped."),
    ("effective_sessions", "node_load_effective_sessions",
     "Smoothed effective sessions (sessions weighted by their recent traffic)."),
    ("sessions", "node_load_sessions", "Smoothed active sessions."),
    ("packets", "node_load_packets_per_second", "Smoothed packets per second, both ways."),
    ("bytes", "node_load_bytes_per_second", "Smoothed bytes per second, both ways."),
)


WEIGHT_LABELS = ("node", "pool", "pop")  # in sorted order, as the text format writes them


def weight_families() -> tuple[GaugeMetricFamily | CounterMetricFamily, ...]:
    """The weight engine's per-node families, empty, in exposition order (an index into this is
    what :func:`weight_samples` gives)."""
    labels = list(WEIGHT_LABELS)
    return (
        GaugeMetricFamily(
            P + "node_weight_ratio",
            "The node's published weight, a share of its nominal weight (0 = no new flows).",
            labels=labels),
        CounterMetricFamily(
            P + "node_weight_changes", "Published weight changes of the node.", labels=labels),
        GaugeMetricFamily(
            P + "node_capacity", "The node's configured capacity (1 = a typical node).",
            labels=labels),
        GaugeMetricFamily(
            P + "node_load_fresh", "1 while the node's load is recent enough to weigh.",
            labels=labels),
        *(GaugeMetricFamily(P + name, doc, labels=labels) for _, name, doc in _LOAD_GAUGES),
    )


_LOAD_FAMILY = {signal: 4 + i for i, (signal, _, _) in enumerate(_LOAD_GAUGES)}


def weight_labels(name: str, node: NodeWeight, engine_nodes: Mapping[str, NodeState]) -> list[str]:
    """A node's label values in the weight families: node, pool, pop."""
    info = engine_nodes.get(name)
    return [name, node.pool, info.info.pop if info is not None else ""]


def weight_samples(node: NodeWeight, now: float, stale: float) -> list[tuple[int, float]]:
    """A node's series in the weight families: (index in :func:`weight_families`, value)."""
    out: list[tuple[int, float]] = []
    if node.published is not None:
        out.append((0, node.published / 100.0))
    out += ((1, node.seq), (2, node.capacity))
    is_fresh = node.load_fresh(now, stale)
    out.append((3, int(is_fresh)))
    if is_fresh:
        out.extend((_LOAD_FAMILY[signal], value) for signal, value in node.ewma.items())
    return out


class WeightCollector(Collector):
    """The weight engine at scrape time (weights on): weights, their inputs and the guard."""

    def __init__(self, service: Callable[[], MeshService]) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service = self.service()
        weights = service.weights
        if weights is None:
            return
        now = service.last_now
        stale = weights.policy.load_stale_after_seconds
        families = weight_families()
        engine_nodes = service.engine.nodes
        for name, node in weights.nodes.items():
            values = weight_labels(name, node, engine_nodes)
            for family, value in weight_samples(node, now, stale):
                families[family].add_metric(values, value)
        yield from families
        yield from self.collect_rest(weights)

    def collect_rest(self, weights: WeightEngine) -> Iterator[Metric]:
        """The pools' guard families (the per-node ones are :func:`weight_families`)."""
        scale = GaugeMetricFamily(
            P + "weight_guard_scale",
            "Factor the pool's weight guard scales load cuts back by (1 = not holding).",
            labels=["pool"])
        for pool in weights.pools:
            scale.add_metric([pool], weights.guard_scale.get(pool, 1.0))
        yield scale
        yield CounterMetricFamily(
            P + "weight_guard_steps", "Weight steps in which a pool's guard scaled cuts back.",
            value=weights.guard_steps_total)


def path_metrics(service: MeshService, now: float) -> Iterator[Metric]:
    """Path evidence (docs/paths.md). Labels: vantage and node from the config, the finding's
    kind from a closed set, the network as its AS number (or private/unknown): never an IP."""
    paths = service.paths
    for name, doc, counts in (
        ("traces", "Path traces taken in, by vantage.", paths.traces_total),
        ("path_route_changes",
         "Route changes seen in consecutive traces of one (node, vantage), by vantage.",
         paths.route_changes_total),
    ):
        per_vantage = CounterMetricFamily(P + name, doc, labels=["vantage"])
        for vantage, value in sorted(counts.items()):
            per_vantage.add_metric([vantage], value)
        yield per_vantage
    fault = GaugeMetricFamily(
        P + "path_fault",
        "1 per failing (node, vantage) whose latest trace says where the node is lost.",
        labels=["node", "vantage", "kind", "asn"],
    )
    nodes: dict[tuple[str, str], set[str]] = {}
    asns: dict[str, str] = {}
    for node, vantage, found in paths.faults(now):
        label = found.network.label if found.hop else "none"
        fault.add_metric([node, vantage, found.kind, label], 1)
        nodes.setdefault((label, found.kind), set()).add(node)
        if found.network.asn is not None:
            asns[label] = found.network.name
    yield fault
    per_network = GaugeMetricFamily(
        P + "path_fault_nodes",
        "Nodes some vantage loses after this network, by kind of finding.",
        labels=["asn", "kind"],
    )
    for (label, kind), members in sorted(nodes.items()):
        per_network.add_metric([label, kind], len(members))
    yield per_network
    impaired = GaugeMetricFamily(
        P + "vantage_path_fault",
        "1 while a vantage loses most of the nodes it fails after one network.",
        labels=["vantage", "asn"],
    )
    for vantage in sorted(paths.failing_vantages()):
        found_v = paths.vantage_fault(vantage, now)
        if found_v is not None:
            impaired.add_metric([vantage, found_v.network.label], 1)
            if found_v.network.asn is not None:
                asns[found_v.network.label] = found_v.network.name
    yield impaired
    info = GaugeMetricFamily(
        P + "asn_info", "1 per AS named in a path fault: its name from the ASN table.",
        labels=["asn", "as_name"],
    )
    for label, name in sorted(asns.items()):
        info.add_metric([label, name], 1)
    yield info
    yield CounterMetricFamily(
        P + "traces_unknown_node",
        "Path traces of nodes the mesh is not configured with, ignored.",
        value=paths.unknown_node_total,
    )
    yield CounterMetricFamily(
        P + "path_news",
        "Localisation changes of DOWN or DEGRADED nodes noted after their verdict (audit).",
        value=paths.news_total,
    )
