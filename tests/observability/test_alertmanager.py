"""Alertmanager: config checks, the routing table, and inhibition proven on a real Alertmanager."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.observability.tools import ALERTMANAGER, run, tool

pytestmark = pytest.mark.observability

CONFIG = ALERTMANAGER / "alertmanager.yml"
ROUTE_CASES = yaml.safe_load((ALERTMANAGER / "route-tests.yaml").read_text())["cases"]


def test_check_config() -> None:
    result = run([tool("amtool"), "check-config", str(CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: f"{c['labels']['alertname']}")
def test_route(case: dict[str, Any]) -> None:
    labels = [f"{k}={v}" for k, v in case["labels"].items()]
    argv = [tool("amtool"), "config", "routes", "test", f"--config.file={CONFIG}"]
    receivers = ",".join(case["receivers"])
    result = run([*argv, f"--verify.receivers={receivers}", *labels])
    assert result.returncode == 0, result.stdout + result.stderr


def test_route_verification_can_fail() -> None:
    """A wrong expectation must fail, or the table above proves nothing."""
    argv = [tool("amtool"), "config", "routes", "test", f"--config.file={CONFIG}"]
    result = run([*argv, "--verify.receivers=pager", "severity=warning", "pop=fra1"])
    assert result.returncode != 0


def test_every_group_by_label_is_on_every_alert() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    assert config["route"]["group_by"] == ["alertname", "pop", "region"]
    equal = {label for rule in config["inhibit_rules"] for label in rule["equal"]}
    assert "pop" in equal


# ---------------------------------------------------------------------------- real Alertmanager


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    binary = tool("prometheus-alertmanager")
    port = _free_port()
    log = (tmp_path / "am.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={CONFIG}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _get(f"{url}/api/v2/status")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.close()
                    pytest.fail("alertmanager did not start:\n" + (tmp_path / "am.log").read_text())
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


ALERTS: dict[str, dict[str, str]] = {
    # PoP fra1 is down: its node alerts must be muted, ams1's must not.
    "pop-down": {"alertname": "PoPDown", "severity": "critical", "scope": "pop", "pop": "fra1"},
    "fra1-node": {"alertname": "NodeDown", "severity": "warning", "scope": "node", "pop": "fra1"},
    "ams1-node": {"alertname": "NodeDown", "severity": "warning", "scope": "node", "pop": "ams1"},
    # the page mutes the ticket for the same SLO and PoP, not for another PoP
    "fra1-page": {"alertname": "HandshakeErrorBudgetBurn", "severity": "critical", "pop": "fra1"},
    "fra1-ticket": {"alertname": "HandshakeErrorBudgetBurn", "severity": "warning", "pop": "fra1"},
    "ams1-ticket": {"alertname": "HandshakeErrorBudgetBurn", "severity": "warning", "pop": "ams1"},
    # node-scoped severities: the 2-day certificate alert on node a leaves node b's 14-day alone
    "cert-a-crit": {"alertname": "NodeCertificateExpiry", "severity": "critical", "pop": "ams1"},
    "cert-a-warn": {"alertname": "NodeCertificateExpiry", "severity": "warning", "pop": "ams1"},
    "cert-b-warn": {"alertname": "NodeCertificateExpiry", "severity": "warning", "pop": "ams1"},
}
NODES = {"fra1-node": "fra1-a", "ams1-node": "ams1-a", "cert-a-crit": "a", "cert-a-warn": "a"}
NODES["cert-b-warn"] = "b"
EXPECT_INHIBITED = {"fra1-node", "fra1-ticket", "cert-a-warn"}


def test_inhibition_on_a_real_alertmanager(alertmanager: str) -> None:
    amtool = tool("amtool")
    for key, labels in ALERTS.items():
        full = {**labels, "region": "eu", "case": key}
        if key in NODES:
            full["node"] = NODES[key]
        argv = [amtool, f"--alertmanager.url={alertmanager}", "alert", "add"]
        argv += [f"{k}={v}" for k, v in full.items()]
        argv += ["--annotation=summary=Test alert."]
        result = run(argv)
        assert result.returncode == 0, result.stdout + result.stderr

    # The inhibitor learns about source alerts asynchronously; poll until the picture is stable.
    deadline = time.monotonic() + 20
    while True:
        alerts = _get(f"{alertmanager}/api/v2/alerts")
        inhibited = {a["labels"]["case"] for a in alerts if a["status"]["inhibitedBy"]}
        if (len(alerts) == len(ALERTS) and inhibited == EXPECT_INHIBITED) or (
            time.monotonic() > deadline
        ):
            break
        time.sleep(0.2)
    assert len(alerts) == len(ALERTS)
    assert inhibited == EXPECT_INHIBITED
    for a in alerts:
        state = a["status"]["state"]
        assert state == ("suppressed" if a["labels"]["case"] in EXPECT_INHIBITED else "active")

    # amtool agrees: by default it lists the active alerts; with --inhibited (amtool 0.25) exactly
    # the muted ones.
    base = [amtool, f"--alertmanager.url={alertmanager}", "alert", "query", "-o", "json"]
    shown = {a["labels"]["case"] for a in json.loads(run(base).stdout)}
    assert shown == set(ALERTS) - EXPECT_INHIBITED
    muted = {a["labels"]["case"] for a in json.loads(run([*base, "--inhibited"]).stdout)}
    assert muted == EXPECT_INHIBITED
