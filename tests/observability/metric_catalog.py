"""Which metric names exist: recording rules, the producers' documented lists, and a pending list.

The producers document what they export: docs/metrics-agent.md (agent), docs/mesh.md (mesh
collector) and docs/metrics-mesh-publish.md (publishers). Rules and dashboards may only use names
from there, from rules/ recording rules, or from ``PENDING`` below: names the rules were written
against (docs/observability.md, "Metric contract") whose producer has not documented them yet.
Keep ``PENDING`` short; every entry is a gap to close with the producer.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import yaml

from tests.observability.tools import DOCS, RULES

PRODUCER_DOCS = ("metrics-agent.md", "mesh.md", "metrics-mesh-publish.md")
PROMETHEUS_BUILTINS = {"up"}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")

# name -> the producer expected to export it (see docs/observability.md)
PENDING: dict[str, str] = {
    "tunnelwatch_probe_attempts_total": "agent",
    "tunnelwatch_probe_failures_total": "agent",
    "tunnelwatch_probe_duration_seconds": "agent",
    "tunnelwatch_tunnel_rtt_p99_seconds": "agent",
    "tunnelwatch_tunnel_packets_sent_total": "agent",
    "tunnelwatch_tunnel_packets_received_total": "agent",
    "tunnelwatch_node_active_sessions": "agent (node telemetry)",
    "tunnelwatch_node_reconnects_total": "agent (node telemetry)",
    "tunnelwatch_node_certificate_expiry_timestamp_seconds": "agent (OpenVPN TLS facts)",
    "tunnelwatch_agent_spool_bytes": "agent",
    "tunnelwatch_agent_spool_capacity_bytes": "agent",
    "tunnelwatch_agent_spool_dropped_total": "agent",
    "tunnelwatch_agent_scheduler_lag_seconds": "agent",
    "tunnelwatch_node_verdict": "mesh",
    "tunnelwatch_mesh_verdict_transitions_total": "mesh",
    "tunnelwatch_mesh_vantage_impaired": "mesh",
    "tunnelwatch_mesh_pool_guard_held_nodes": "mesh",
    "tunnelwatch_mesh_ingest_observations_total": "mesh",
    "tunnelwatch_mesh_ingest_rejected_total": "mesh",
}

_NAME = re.compile(r"\btunnelwatch_[a-z0-9_]+[a-z0-9]")


@functools.cache
def documented() -> frozenset[str]:
    names: set[str] = set()
    for doc in PRODUCER_DOCS:
        path = DOCS / doc
        if path.exists():
            names.update(_NAME.findall(path.read_text()))
    return frozenset(names)


@functools.cache
def recorded() -> frozenset[str]:
    names: set[str] = set()
    for path in RULES.glob("*.rules.yaml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            names.update(r["record"] for r in group["rules"] if "record" in r)
    return frozenset(names)


def base_name(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def unknown(names: Iterable[str]) -> set[str]:
    """The names that are neither recorded, documented, built in, nor pending."""
    known = recorded() | documented() | PROMETHEUS_BUILTINS | set(PENDING)
    return {n for n in names if n not in known and base_name(n) not in known}


# Grafana variables -> something promql accepts, so dashboard queries parse.
GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
}


def selectors(expr: str) -> set[str]:
    """Metric names of every vector selector in a PromQL expression (promql-parser)."""
    import promql_parser

    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    found: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            found.add(node.name)
        elif isinstance(node, promql_parser.MatrixSelector) and node.vector_selector.name:
            found.add(node.vector_selector.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found
