"""deploy/kubernetes/mesh-ha: the manifests parse, the mesh config loads with the real loader
and points at every etcd member the etcd StatefulSet creates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from probes.mesh.config import load_mesh_config
from probes.model.signing import write_key_file

pytestmark = pytest.mark.ha

HA = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "mesh-ha"


def docs() -> list[dict[str, Any]]:
    listed = yaml.safe_load((HA / "kustomization.yaml").read_text())["resources"]
    assert set(listed) == {p.name for p in HA.glob("*.yaml")} - {"kustomization.yaml"}
    return [d for name in listed for d in yaml.safe_load_all((HA / name).read_text()) if d]


def kind(name: str) -> dict[str, Any]:
    return next(d for d in docs() if d["kind"] == "StatefulSet" and d["metadata"]["name"] == name)


def test_three_etcd_members_and_three_mesh_replicas() -> None:
    etcd, mesh = kind("tunnelwatch-etcd"), kind("tunnelwatch-mesh-ha")
    assert etcd["spec"]["replicas"] == 3 and mesh["spec"]["replicas"] == 3
    for sts in (etcd, mesh):
        pod = sts["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    args = etcd["spec"]["template"]["spec"]["containers"][0]["args"]
    cluster = next(a for a in args if a.startswith("--initial-cluster="))
    assert cluster.count("=http://") == 3


def test_the_mesh_config_loads_and_names_every_etcd_member(tmp_path: Path) -> None:
    cm = next(d for d in docs() if d["kind"] == "ConfigMap")
    text = cm["data"]["mesh.yaml"]
    for agent in ("eu-1", "us-1"):
        write_key_file(tmp_path / agent, "k" * 64)
        text = text.replace(f"/etc/tunnelwatch/keys/{agent}", str(tmp_path / agent))
    (tmp_path / "mesh.yaml").write_text(text)
    cfg = load_mesh_config(tmp_path / "mesh.yaml")
    assert cfg.store.type == "etcd"
    assert cfg.store.replica == ""  # the pod's host name
    members = [f"tunnelwatch-etcd-{i}.tunnelwatch-etcd" for i in range(3)]
    assert all(any(m in e for e in cfg.store.endpoints) for m in members)
    assert cfg.store.clock_margin_seconds < cfg.store.lease_ttl_seconds
