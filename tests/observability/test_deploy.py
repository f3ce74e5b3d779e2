"""Offline validation of deploy/: Containerfile, compose stack, Kubernetes manifests.

No container engine runs here, so nothing is built or started: the files are parsed and checked
for the properties that matter (multi-stage, non-root, capabilities per role, mounts that exist,
configs the real loaders accept, the same rules as rules/).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from probes.model.signing import write_key_file
from tests.observability.tools import DEPLOY, RULES, run, tool

pytestmark = pytest.mark.observability

K8S = DEPLOY / "kubernetes"
NAMESPACED = {
    "ConfigMap",
    "Service",
    "Deployment",
    "StatefulSet",
    "ServiceMonitor",
    "PrometheusRule",
}


# ---------------------------------------------------------------------------- Containerfile


def _stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = (DEPLOY / "Containerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(1), [])
        if current is not None:
            current.append(line)
    return stages


def _last(stage: list[str], instruction: str) -> str:
    lines = [s for s in stage if s.split()[0].upper() == instruction]
    assert lines, f"no {instruction}"
    return lines[-1].split(None, 1)[1]


def test_containerfile_is_multi_stage() -> None:
    stages = _stages()
    assert {"build", "runtime", "agent", "mesh"} <= set(stages)
    assert stages["agent"][0].split()[1] == "runtime"
    assert stages["mesh"][0].split()[1] == "runtime"
    # the runtime takes only the built venv, not the compilers and sources of the build stage
    assert any(s.startswith("COPY --from=build /opt/tunnelwatch") for s in stages["runtime"])
    assert not any("pip install" in s for s in stages["runtime"] + stages["agent"])


@pytest.mark.parametrize("role", ["agent", "mesh"])
def test_roles_run_as_non_root(role: str) -> None:
    user = _last(_stages()[role], "USER")
    assert user.split(":")[0] not in {"0", "root"}, user
    assert _last(_stages()[role], "CMD").startswith(f'["{role}"')


def test_only_the_agent_gets_net_raw() -> None:
    stages = _stages()
    agent = " ".join(stages["agent"])
    assert "setcap cap_net_raw+ep" in agent
    others = " ".join(stages["runtime"] + stages["mesh"] + stages["build"])
    assert "setcap" not in others


# ---------------------------------------------------------------------------- compose


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def test_compose_has_the_full_stack() -> None:
    services = _compose()["services"]
    assert set(services) == {
        "mesh",
        "agent-eu",
        "agent-us",
        "prometheus",
        "alertmanager",
        "grafana",
    }
    targets = set(_stages())
    for name in ("mesh", "agent-eu", "agent-us"):
        assert services[name]["build"]["target"] in targets
        assert services[name]["build"]["dockerfile"] == "deploy/Containerfile"


def test_compose_capabilities_per_role() -> None:
    services = _compose()["services"]
    for name, svc in services.items():
        assert svc.get("cap_drop") == ["ALL"], name
        user = str(svc.get("user", "")).split(":")[0]
        assert user and user not in {"0", "root"}, f"{name} runs as root"
        if name.startswith("agent-"):
            assert svc["cap_add"] == ["NET_RAW"], name
            # file capabilities need exec without no_new_privs
            assert "no-new-privileges:true" not in svc.get("security_opt", []), name
        else:
            assert "cap_add" not in svc, name
            assert "no-new-privileges:true" in svc["security_opt"], name


def test_compose_bind_mounts_exist() -> None:
    services = _compose()["services"]
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert (DEPLOY / mounts["/etc/prometheus/rules"]).resolve() == RULES
    grafana = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    assert (
        DEPLOY / grafana["/etc/grafana/provisioning"]
    ).resolve() == DEPLOY / "grafana/provisioning"
    dashboards = (DEPLOY / grafana["/var/lib/grafana/dashboards/tunnelwatch"]).resolve()
    assert sorted(dashboards.glob("*.json")), "no dashboards where Grafana looks"


def test_prometheus_config_checks_with_the_rules(tmp_path: Path) -> None:
    promtool = tool("promtool")
    shutil.copy(DEPLOY / "prometheus/prometheus.yml", tmp_path / "prometheus.yml")
    os.symlink(RULES, tmp_path / "rules")  # the compose mount, reproduced
    result = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 3 rule files found" in result.stdout + result.stderr


def _check_config(text: str, tmp_path: Path, name: str) -> None:
    """Validate a config with the real loader, key files replaced by throwaway ones."""
    keys = tmp_path / "keys"
    keys.mkdir(exist_ok=True)

    def fake_key(match: re.Match[str]) -> str:
        path = keys / Path(match.group(1)).name
        write_key_file(path, "00" * 32)
        return f"key_file: {path}"

    config = tmp_path / name
    config.write_text(re.sub(r"key_file: (/[^\s,}]+)", fake_key, text))
    argv = [sys.executable, "-m", "probes.cli", "check-config", str(config)]
    result = run(argv)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["agent-eu.yaml", "agent-us.yaml", "mesh.yaml"])
def test_compose_configs_load(name: str, tmp_path: Path) -> None:
    _check_config((DEPLOY / "compose/config" / name).read_text(), tmp_path, name)


# ---------------------------------------------------------------------------- Kubernetes


def _resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs.extend(d for d in yaml.safe_load_all((K8S / name).read_text()) if d)
    return docs


def _kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _resources() if d["kind"] == kind]


def test_manifests_have_required_fields() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    namespaces = {n["metadata"]["name"]: n for n in _kind("Namespace")}
    assert set(namespaces) == {"tunnelwatch", "tunnelwatch-agents"}
    for doc in _resources():
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc
        if doc["kind"] in NAMESPACED:
            assert doc["metadata"]["namespace"] in namespaces, doc["metadata"]["name"]


def test_pod_security_levels_per_namespace() -> None:
    """Agents alone get the privileged namespace (NET_RAW); everything else is restricted."""
    level = {
        n["metadata"]["name"]: n["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        for n in _kind("Namespace")
    }
    assert level == {"tunnelwatch": "restricted", "tunnelwatch-agents": "privileged"}
    for workload in _kind("Deployment") + _kind("StatefulSet"):
        name, namespace = workload["metadata"]["name"], workload["metadata"]["namespace"]
        agent = name.startswith("tunnelwatch-agent")
        assert namespace == ("tunnelwatch-agents" if agent else "tunnelwatch"), name


def _pod_checks(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    template = spec["template"]
    labels = template["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items(), workload["metadata"]["name"]
    pod = template["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert isinstance(container, dict)
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"] for v in pod["volumes"]} | {
        t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])
    }
    for mount in container["volumeMounts"]:
        assert mount["name"] in volumes, mount
    ports = {p["name"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in ports
    return container


def test_agents_are_deployments_per_region_with_net_raw(tmp_path: Path) -> None:
    agents = [
        d for d in _kind("Deployment") if d["metadata"]["name"].startswith("tunnelwatch-agent")
    ]
    regions = {d["metadata"]["labels"]["tunnelwatch.io/region"] for d in agents}
    assert len(regions) >= 2
    configs = {c["metadata"]["name"]: c for c in _kind("ConfigMap")}
    for deployment in agents:
        assert deployment["spec"]["replicas"] == 1  # one vantage identity per Deployment
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        container = _pod_checks(deployment)
        assert container["securityContext"]["capabilities"]["add"] == ["NET_RAW"]
        assert container["args"][0] == "agent"
        cm = deployment["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
        agent_yaml = configs[cm]["data"]["agent.yaml"]
        _check_config(agent_yaml, tmp_path, f"{cm}.yaml")
        # each agent mounts its own key only, and reports to the mesh across namespaces
        vantage = yaml.safe_load(agent_yaml)["agent"]["vantage"]
        secrets = [
            v["secret"] for v in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in v
        ]
        assert [s["secretName"] for s in secrets] == [f"tunnelwatch-agent-{vantage}"]
        assert ".tunnelwatch.svc:" in yaml.safe_load(agent_yaml)["mesh"]["endpoints"][0]


def test_mesh_is_a_statefulset_without_capabilities(tmp_path: Path) -> None:
    (mesh,) = _kind("StatefulSet")
    container = _pod_checks(mesh)
    sc = container["securityContext"]
    assert "add" not in sc["capabilities"]
    assert sc["allowPrivilegeEscalation"] is False
    assert container["args"][0] == "mesh"
    assert mesh["spec"]["volumeClaimTemplates"]
    services = {s["metadata"]["name"]: s for s in _kind("Service")}
    assert services[mesh["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    configs = {c["metadata"]["name"]: c for c in _kind("ConfigMap")}
    _check_config(configs["tunnelwatch-mesh"]["data"]["mesh.yaml"], tmp_path, "mesh.yaml")


def test_service_monitors_select_services_with_their_port() -> None:
    services = _kind("Service")
    monitors = _kind("ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"tunnelwatch-agent", "tunnelwatch-mesh"}
    for monitor in monitors:
        wanted = monitor["spec"]["selector"]["matchLabels"]
        hits = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
        assert hits, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["endpoints"]:
            for service in hits:
                assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_prometheus_rule_embeds_the_same_rules() -> None:
    (rule,) = _kind("PrometheusRule")
    groups = []
    for path in sorted(RULES.glob("*.rules.yaml")):
        groups.extend(yaml.safe_load(path.read_text())["groups"])
    by_name = {g["name"]: g for g in groups}
    assert {g["name"] for g in rule["spec"]["groups"]} == set(by_name)
    for group in rule["spec"]["groups"]:
        assert group == by_name[group["name"]]
