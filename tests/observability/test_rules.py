"""Prometheus rules: generated drift-free, lint-clean, and every rule covered by a promtool test."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.observability.tools import DEPLOY, RULES, run, tool

pytestmark = pytest.mark.observability

RULE_FILES = sorted(RULES.glob("*.rules.yaml"))
TEST_FILES = sorted((RULES / "tests").glob("*.yaml"))
SEVERITIES = {"critical", "warning", "info"}


def _rules() -> list[dict[str, Any]]:
    out = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            out.extend(group["rules"])
    return out


def _tests() -> list[dict[str, Any]]:
    return [t for path in TEST_FILES for t in yaml.safe_load(path.read_text())["tests"]]


def test_rule_files_exist() -> None:
    assert {p.name for p in RULE_FILES} == {
        "recording.rules.yaml",
        "slo.rules.yaml",
        "alerts.rules.yaml",
    }


def test_generated_rules_have_no_drift(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(RULES / "generate.py"), str(tmp_path)], check=True)
    for path in RULE_FILES:
        fresh = (tmp_path / path.name).read_text()
        assert fresh == path.read_text(), f"{path.name} differs: run python rules/generate.py"
    k8s = DEPLOY / "kubernetes" / "prometheusrule.yaml"
    assert (tmp_path / k8s.name).read_text() == k8s.read_text(), "run python rules/generate.py"


def test_promtool_check_rules_lint() -> None:
    argv = [tool("promtool"), "check", "rules", "--lint=all", "--lint-fatal"]
    result = run([*argv, *map(str, RULE_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    # one promtool per test file, side by side: one process runs its files one after another
    # on one core (about 25 CPU-seconds in all), the machine has two
    promtool = tool("promtool")
    with ThreadPoolExecutor(max_workers=len(TEST_FILES)) as pool:
        results = list(pool.map(
            lambda path: run([promtool, "test", "rules", str(path)], cwd=RULES / "tests"),
            TEST_FILES))
    for path, result in zip(TEST_FILES, results, strict=True):
        assert result.returncode == 0, path.name + "\n" + result.stdout + result.stderr
        assert "SUCCESS" in result.stdout, path.name + "\n" + result.stdout


def test_alerts_follow_mixin_conventions() -> None:
    alerts = [r for r in _rules() if "alert" in r]
    assert alerts
    for rule in alerts:
        name = rule["alert"]
        assert re.fullmatch(r"(?:[A-Z][a-z0-9]*|PoP)+", name), f"{name}: not CamelCase"
        assert rule["labels"]["severity"] in SEVERITIES, name
        ann = rule["annotations"]
        assert set(ann) == {"summary", "description", "runbook_url"}, name
        assert ann["summary"].endswith("."), f"{name}: summary must be a sentence"
        assert "{{" not in ann["summary"], f"{name}: summary must be static"
        assert "{{" in ann["description"], f"{name}: description must be templated"


def test_every_alert_has_a_firing_and_a_silent_test() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    severities: dict[str, set[str]] = {}
    for t in _tests():
        for case in t.get("alert_rule_test", []):
            name = case["alertname"]
            if case.get("exp_alerts"):
                firing.add(name)
                for exp in case["exp_alerts"]:
                    labels = exp["exp_labels"]
                    # inhibition compares pop: an alert without it would match everything
                    assert labels.get("pop"), f"{name} fires without a pop label: {labels}"
                    severities.setdefault(name, set()).add(labels["severity"])
            else:
                silent.add(name)
    names = {r["alert"] for r in _rules() if "alert" in r}
    assert names - firing == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested silent"
    # every (alert, severity) rule is seen firing at least once
    for rule in _rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in severities[rule["alert"]], rule["alert"]


def _selector_labels(expr: str) -> tuple[str, dict[str, str]]:
    match = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?", expr)
    assert match, expr
    labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
    return match.group(1), labels


def test_every_recording_rule_has_an_expression_test() -> None:
    tested: list[tuple[str, dict[str, str]]] = [
        _selector_labels(case["expr"]) for t in _tests() for case in t.get("promql_expr_test", [])
    ]
    for rule in _rules():
        if "record" not in rule:
            continue
        want = rule.get("labels", {})
        hits = [
            name
            for name, labels in tested
            if name == rule["record"] and all(labels.get(k) == v for k, v in want.items())
        ]
        assert hits, f"no promql_expr_test for {rule['record']} {want}"


# The SRE-workbook thresholds for our budgets, typed from the table in
# shared/reference/observability-and-style.md, not computed: the generator must agree.
EXPECTED_BOUNDS = {
    "pop-availability": {"5m": 0.0072, "30m": 0.003, "2h": 0.0015, "6h": 0.0005},
    "probe-success": {"5m": 0.0072, "30m": 0.003, "2h": 0.0015, "6h": 0.0005},
    "handshake-errors": {"5m": 0.0576, "30m": 0.024, "2h": 0.012, "6h": 0.004},
    "handshake-latency": {"5m": 0.144, "30m": 0.06, "2h": 0.03, "6h": 0.01},
    "egress": {"5m": 0.072, "30m": 0.03, "2h": 0.015, "6h": 0.005},
    "dns-through-tunnel": {"5m": 0.072, "30m": 0.03, "2h": 0.015, "6h": 0.005},
}
EXPECTED_WINDOWS = {"5m": ("1h", "critical", "2m"), "30m": ("6h", "critical", "15m")}
EXPECTED_WINDOWS |= {"2h": ("1d", "warning", "1h"), "6h": ("3d", "warning", "3h")}


def test_burn_rate_thresholds_match_the_workbook_table() -> None:
    seen = set()
    for rule in _rules():
        slo = rule.get("labels", {}).get("slo")
        if "alert" not in rule or slo is None:
            continue
        short, long_ = rule["labels"]["short"], rule["labels"]["long"]
        assert EXPECTED_WINDOWS[short] == (long_, rule["labels"]["severity"], rule["for"])
        bound = EXPECTED_BOUNDS[slo][short]
        bounds = [
            float(b) for b in re.findall(r"ratio_rate\w+\{[^}]*\} > ([0-9.e-]+)", rule["expr"])
        ]
        assert bounds == [pytest.approx(bound), pytest.approx(bound)], rule["expr"]
        assert f"ratio_rate{short}{{" in rule["expr"] and f"ratio_rate{long_}{{" in rule["expr"]
        seen.add((slo, short))
    assert seen == {(s, w) for s in EXPECTED_BOUNDS for w in EXPECTED_WINDOWS}
