"""Anycast through the real mesh process: signed observation batches in, BGP at the upstream out.

The mesh runs in the lab's control namespace with an ``anycast:`` section pointing at the PoPs'
gobgpd APIs; the test posts batches as three agents would, and reads the BIRD upstream's RIB.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from probes.lab.topology import wait_for
from probes.model import SCHEMA_VERSION, Observation, ObservationBatch, Reason, encode, signing
from tests.bgp.conftest import POPS, PREFIX, Anycast

pytestmark = [pytest.mark.bgp, pytest.mark.lab]
TOKEN = "s3cret-operator-token-of-at-least-32-bytes"

AGENTS = ("a1", "a2", "a3")
PORT = 9481


class Mesh:
    def __init__(self, anycast: Anycast) -> None:
        self.anycast = anycast
        self.dir = anycast.lab.dir / "mesh"
        self.dir.mkdir()
        self.base = f"http://{anycast.control.address}:{PORT}"
        self.seq = {a: 0 for a in AGENTS}
        for a in AGENTS:
            signing.write_key_file(self.dir / f"{a}.key", signing.generate_key() + "\n")
        signing.write_key_file(self.dir / "operator.token", TOKEN + "\n")
        nodes: list[dict[str, Any]] = [{"id": f"{p}-n{j}", "pool": p, "pop": p}
                                       for p in POPS for j in (1, 2)]
        config = {
            "listen": f"{anycast.control.address}:{PORT}",
            "database": "mesh.db",
            "agents": [{"name": a, "key_file": f"{a}.key"} for a in AGENTS],
            "nodes": nodes,
            "operator_token_file": "operator.token",
            "tick_seconds": 0.2,
            "decision": {"rise": 1, "fall": 1, "damping": {"enabled": False}},
            "anycast": {
                "pops": [{"pop": p, "api_host": d.api_host, "asn": d.asn, "prefixes": [PREFIX]}
                         for p, d in anycast.daemons.items()],
                "policy": {"up_after_seconds": 1.0, "max_withdrawn": 1},
                "reconcile_interval_seconds": 2.0,
            },
        }
        self.config = self.dir / "mesh.yaml"
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc: Any = None

    def start(self) -> None:
        self.proc = self.anycast.control.popen(
            [sys.executable, "-m", "probes.cli", "mesh", "--config", str(self.config)],
            name="mesh")
        wait_for(lambda: self._healthy() or self.proc.poll() is not None, 60, "mesh")
        assert self.proc.poll() is None, "mesh exited"

    def _healthy(self) -> bool:
        try:
            return self.request("GET", "/healthz") is not None
        except OSError:
            return False

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.anycast.lab.untrack(self.proc.pid)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Any:
        req = urllib.request.Request(self.base + path, data=body, method=method,
                                     headers=headers or {})
        with self.anycast.control.entered(), urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read() or b"null")

    def report(self, ok_of: dict[str, bool]) -> None:
        """Every agent reports every node: ``ok_of[node]`` says whether its check passed."""
        now = time.time()
        for a in AGENTS:
            self.seq[a] += 1
            obs = [Observation(node=n, check="wg", kind="wireguard.handshake", vantage=a,
                               seq=self.seq[a] * 100 + i, wall_time=now, ok=ok,
                               reason=Reason.OK if ok else Reason.TIMEOUT,
                               duration_seconds=0.004)
                   for i, (n, ok) in enumerate(sorted(ok_of.items()))]
            body = encode(ObservationBatch(version=SCHEMA_VERSION, agent=a,
                                           batch_seq=self.seq[a], sent_at=now,
                                           observations=obs))
            key = signing.load_key(self.dir / f"{a}.key")
            self.request("POST", "/v1/batches", body,
                         signing.signed_headers(a, a, key, body, now))


def all_nodes(ok: bool = True, **overrides: bool) -> dict[str, bool]:
    states = {f"{p}-n{j}": ok for p in POPS for j in (1, 2)}
    states.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return states


def test_mesh_drives_bgp_end_to_end(anycast: Anycast) -> None:
    mesh = Mesh(anycast)
    mesh.start()
    mesh.report(all_nodes())
    anycast.wait_paths({"pop1": 100, "pop2": 100, "pop3": 100}, timeout=15)

    # pop1 loses both nodes, seen from every vantage
    started = time.monotonic()
    mesh.report(all_nodes(pop1_n1=False, pop1_n2=False))
    anycast.wait_paths({"pop2": 100, "pop3": 100})
    print(f"\nfailing batch posted -> withdrawal at the upstream: "
          f"{(time.monotonic() - started) * 1000:.0f} ms")

    # an operator pins pop2 withdrawn: the guard (one PoP withdrawn at most) holds it announced
    token = {"Authorization": f"Bearer {TOKEN}"}
    with pytest.raises(urllib.error.HTTPError) as denied:
        mesh.request("POST", "/v1/anycast/pop2/pin", b'{"pin": "withdrawn"}')
    assert denied.value.code == 401
    answer = mesh.request("POST", "/v1/anycast/pop2/pin",
                          json.dumps({"pin": "withdrawn", "actor": "alice",
                                      "note": "fibre work"}).encode(), token)
    assert answer["changes"][0]["held_by_guard"] is True
    anycast.wait_paths({"pop2": 1000, "pop3": 100})
    view = mesh.request("GET", "/v1/anycast")
    assert view["audit"][-1]["who"] == "alice"
    states = {p["pop"]: p["state"] for p in view["pops"]}
    assert states == {"pop1": "WITHDRAWN", "pop2": "DRAINED", "pop3": "ANNOUNCED"}

    # the mesh dies: nothing moves at the upstream
    mesh.kill()
    time.sleep(1.0)
    assert anycast.paths() == {"pop2": 1000, "pop3": 100}

    # it comes back: it adopts what the speakers announce; still nothing moves
    mesh.start()
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert anycast.paths() == {"pop2": 1000, "pop3": 100}
        time.sleep(0.1)
    view = mesh.request("GET", "/v1/anycast")
    assert {p["pop"]: p["state"] for p in view["pops"]}["pop1"] == "WITHDRAWN"
    assert {p["pop"]: p["pin"] for p in view["pops"]}["pop2"] == "withdrawn", "pin survived"
    audit = (mesh.dir / "mesh.db.anycast-audit.jsonl").read_text().splitlines()
    assert json.loads(audit[-1])["who"] == "alice"

    # pop1 recovers: re-announced after the hysteresis, and the slot it frees goes to the
    # withdrawal the guard was holding: pop2's pin
    mesh.report(all_nodes())
    anycast.wait_paths({"pop1": 100, "pop3": 100}, timeout=10)
    def metrics() -> str:
        req = urllib.request.Request(mesh.base + "/metrics")
        with anycast.control.entered(), urllib.request.urlopen(req, timeout=5) as r:
            return r.read().decode()

    # the upstream can see the UPDATE before the speaker's API call has returned to the mesh
    announced = 'tunnelwatch_anycast_prefix_announced{pop="pop1",prefix="192.0.2.0/24"} 1.0'
    wait_for(lambda: announced in metrics(), 5, "the mesh to record pop1's announcement")
    text = metrics()
    assert 'tunnelwatch_anycast_pop_state{pop="pop2",state="WITHDRAWN"} 1.0' in text
    assert "tunnelwatch_anycast_guard_holding" in text


def test_mesh_rejects_a_bad_anycast_section(tmp_path: Path) -> None:
    from probes.config import ConfigError
    from probes.mesh.config import load_mesh_config

    signing.write_key_file(tmp_path / "a.key", signing.generate_key() + "\n")
    config = {
        "agents": [{"name": "a", "key_file": "a.key"}],
        "nodes": [{"id": "n1", "pool": "p", "pop": "fra1"},
                  {"id": "any-fra1", "pool": "p", "pop": "fra1", "role": "anycast"}],
        "anycast": {"pops": [{"pop": "ams1", "api_host": "10.0.0.1", "asn": 65001,
                              "prefixes": ["198.51.100.0/33"]}],
                    "policy": {"max_withdrawn_share": 2}},
    }
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as info:
        load_mesh_config(path)
    paths = {p.path for p in info.value.problems}
    assert paths >= {"$.nodes[1].pool", "$.anycast.pops[0].pop",
                     "$.anycast.pops[0].prefixes[0]", "$.anycast.policy.max_withdrawn_share"}
