"""Which metric names exist: recording rules, what the producers export, and a pending list.

The producers document what they export: docs/metrics-agent.md (agent), docs/mesh.md (mesh
collector) and docs/metrics-mesh-publish.md (publishers); their collectors are the ground truth,
so the names in probes/agent/metrics.py, probes/mesh/metrics.py and
probes/mesh/publish/metrics.py count too (a ``*MetricFamily`` counter named ``x`` is exposed as
``x_total``). Rules and dashboards may only use those names, rules/ recording rules, or ``PENDING``
below: names the rules were written against (docs/observability.md, "Metric contract") that no
producer exports yet. Keep ``PENDING`` short; every entry is a gap to close with the producer.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import yaml

from tests.observability.tools import DOCS, ROOT, RULES

PRODUCER_DOCS = ("metrics-agent.md", "mesh.md", "metrics-mesh-publish.md", "anycast.md", "ha.md")
PRODUCER_CODE = (
    "probes/agent/metrics.py",
    "probes/mesh/metrics.py",
    "probes/mesh/publish/metrics.py",
    "probes/mesh/bgp/controller.py",
)
PROMETHEUS_BUILTINS = {"up"}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")

# name -> the producer expected to export it (see docs/observability.md)
PENDING: dict[str, str] = {}

_NAME = re.compile(r"\btunnelwatch_[a-z0-9_]+[a-z0-9]")


@functools.cache
def documented() -> frozenset[str]:
    names: set[str] = set()
    for doc in PRODUCER_DOCS:
        path = DOCS / doc
        if path.exists():
            names.update(_NAME.findall(path.read_text()))
    return frozenset(names)


# CounterMetricFamily("x", ...) / GaugeMetricFamily(P + "x", ...) / Counter("x_total", ...)
_FAMILY = re.compile(
    r'\b(Counter|Gauge|Histogram|Summary)(MetricFamily)?\(\s*(P \+ )?"([a-z0-9_]+)"'
)
MESH_PREFIX = "tunnelwatch_mesh_"  # probes/mesh/metrics.py: P


@functools.cache
def exported() -> frozenset[str]:
    """Names in the producers' collector code, as Prometheus exposes them."""
    names: set[str] = set()
    for module in PRODUCER_CODE:
        path = ROOT / module
        if not path.exists():
            continue
        for kind, family, prefixed, name in _FAMILY.findall(path.read_text()):
            full = (MESH_PREFIX if prefixed else "") + name
            # a custom collector's counter family is exposed with the _total suffix
            if kind == "Counter" and family and not full.endswith("_total"):
                full += "_total"
            names.add(full)
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
    known = recorded() | documented() | exported() | PROMETHEUS_BUILTINS | set(PENDING)
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
