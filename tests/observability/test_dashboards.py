"""Grafana dashboards: generated drift-free, well-formed, and querying only metrics that exist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.observability import metric_catalog
from tests.observability.tools import DASHBOARDS, DEPLOY, ROOT, RULES

pytestmark = pytest.mark.observability

FILES = sorted(DASHBOARDS.glob("*.json"))
EXPECTED_UIDS = {
    "tunnelwatch-fleet",
    "tunnelwatch-node",
    "tunnelwatch-vantages",
    "tunnelwatch-mesh",
}


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return [p for p in out if p["type"] != "row"]


def _exprs() -> list[tuple[str, str, str]]:
    return [
        (path.name, panel["title"], target["expr"])
        for path in FILES
        for panel in _panels(_load(path))
        for target in panel["targets"]
    ]


def test_generated_dashboards_have_no_drift(tmp_path: Path) -> None:
    pytest.importorskip("grafana_foundation_sdk", reason="pip install -e '.[dev]'")
    script = DASHBOARDS / "generate.py"
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True)
    fresh = sorted(p.name for p in tmp_path.glob("*.json"))
    assert fresh == [p.name for p in FILES]
    for path in FILES:
        assert (tmp_path / path.name).read_text() == path.read_text(), (
            f"{path.name} differs: run python dashboards/generate.py"
        )


def test_dashboards_are_grafana_11_with_fixed_uids() -> None:
    uids = set()
    for path in FILES:
        dash = _load(path)
        assert dash["schemaVersion"] >= 39, f"{path.name}: not a Grafana 11 schema"
        assert dash["title"].startswith("tunnelwatch / ")
        assert dash.get("description")
        uids.add(dash["uid"])
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
    assert uids == EXPECTED_UIDS


def test_every_panel_is_complete() -> None:
    for path in FILES:
        for panel in _panels(_load(path)):
            where = f"{path.name}: {panel.get('title')!r}"
            assert panel.get("title"), where
            assert panel.get("description"), f"{where}: no description"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and all(refs) and len(set(refs)) == len(refs), where
            assert panel["gridPos"]["w"] > 0 and panel["gridPos"]["h"] > 0, where


def test_rate_windows_use_rate_interval() -> None:
    """Grafana's $__rate_interval is never shorter than four scrapes; a bare [1m] can be."""
    for name, title, expr in _exprs():
        assert "[1m]" not in expr and "[$__interval]" not in expr, f"{name}: {title}"


def test_selector_extraction_is_not_vacuous() -> None:
    pytest.importorskip("promql_parser", reason="pip install -e '.[dev]'")
    expr = 'sum(rate(a_total{x="1"}[$__rate_interval])) / on (p) group_left () (1 - b:c{d="e"})'
    assert metric_catalog.selectors(expr) == {"a_total", "b:c"}
    assert metric_catalog.unknown({"no_such_metric", "up"}) == {"no_such_metric"}
    exported = metric_catalog.exported()
    if (ROOT / "probes/agent/metrics.py").exists():
        assert {
            "tunnelwatch_probe_attempts_total",
            "tunnelwatch_probe_duration_seconds",
        } <= exported
    if (ROOT / "probes/mesh/metrics.py").exists():
        assert {
            "tunnelwatch_mesh_node_verdict",
            "tunnelwatch_mesh_ingest_rejects_total",
        } <= exported


def test_every_panel_queries_known_metrics() -> None:
    pytest.importorskip("promql_parser", reason="pip install -e '.[dev]'")
    used: set[str] = set()
    for name, title, expr in _exprs():
        names = metric_catalog.selectors(expr)  # also proves the query parses
        assert names, f"{name}: {title}: no metric in {expr!r}"
        assert metric_catalog.unknown(names) == set(), f"{name}: {title}"
        used |= names
    # the dashboards read the recording rules, not only raw series
    assert used & metric_catalog.recorded()


def test_every_rule_queries_known_metrics() -> None:
    pytest.importorskip("promql_parser", reason="pip install -e '.[dev]'")
    for path in RULES.glob("*.rules.yaml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                names = metric_catalog.selectors(rule["expr"])
                assert metric_catalog.unknown(names) == set(), rule.get("alert", rule.get("record"))


def test_provisioning_points_at_the_dashboards() -> None:
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/tunnelwatch.yaml").read_text())
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/tunnelwatch"
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert any(d["type"] == "prometheus" and d.get("isDefault") for d in ds["datasources"])
