"""The whole webhook chain with real processes: ``tunnelwatch mesh`` -> signed webhook ->
``tunnelwatch receiver`` -> a real HAProxy in the lab. HAProxy ends up with every node's verdict."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from probes.lab.haproxy import Backend
from probes.lab.topology import Lab
from probes.mesh.publish.runtime_api import parse_servers_state
from probes.model.signing import write_key_file
from tests.publish.helpers import KEY
from tests.publish.test_mesh_publish import NODES, Mesh, batches, free_port, write_config

pytestmark = [pytest.mark.publish, pytest.mark.lab]

ADMIN = {"UP": "ready", "DEGRADED": "ready", "DOWN": "maint", "DRAINING": "drain",
         "MAINTENANCE": "maint"}


def test_mesh_webhook_receiver_haproxy(lab: Lab, tmp_path: Path) -> None:
    hap = lab.start_haproxy(lab.add_host("lb"), servers=[
        Backend(f"n{i}", f"10.99.0.{i + 1}", 1194) for i in range(NODES)])
    port = free_port()
    write_key_file(tmp_path / "hook.key", KEY)
    receiver_cfg = tmp_path / "receiver.yaml"
    receiver_cfg.write_text(
        f"listen: 127.0.0.1:{port}\nkeys:\n  - {{key_id: k1, key_file: hook.key}}\n"
        f"state_file: receiver-state.json\nhaproxy: {{name: lb, socket: {hap.runtime_socket}}}\n")
    receiver = subprocess.Popen([sys.executable, "-m", "probes.cli", "receiver", "--config",
                                 str(receiver_cfg)], stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / "receiver.log", "wb"))  # noqa: SIM115
    mesh_dir = tmp_path / "mesh"
    mesh_dir.mkdir()
    mesh_port = free_port()
    mesh = Mesh(write_config(mesh_dir, mesh_port, f"http://127.0.0.1:{port}/v1/verdicts"),
                mesh_port)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
                break
            except OSError:
                assert receiver.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "receiver.log").read_text()
                time.sleep(0.05)
        mesh.start()
        for batch in batches():
            assert mesh.post(mesh_dir, batch) == 200
        log = mesh.log()
        latest = {e["verdict"]["node"]: e["verdict"]["state"] for e in log}
        want = {node: ADMIN[state] for node, state in latest.items()}

        def admin() -> dict[str, str]:
            rows = parse_servers_state(hap.command("show servers state vpn"))
            return {s: r.admin for (_, s), r in rows.items() if s in want}

        deadline = time.monotonic() + 30
        while admin() != want and time.monotonic() < deadline:
            time.sleep(0.1)
        assert admin() == want
        assert "maint" in want.values()  # the script really took nodes out
        last_seq = {n: max(e["verdict"]["seq"] for e in log if e["verdict"]["node"] == n)
                    for n in latest}

        def receiver_seqs() -> dict[str, int]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/state", timeout=5) as r:
                return {n: s["seq"] for n, s in json.load(r).items()}

        # HAProxy can already show the final admin states while a last delivery that does not
        # change them (same admin state, higher seq) is still on its way to the receiver
        deadline = time.monotonic() + 30
        while receiver_seqs() != last_seq and time.monotonic() < deadline:
            time.sleep(0.1)
        assert receiver_seqs() == last_seq
    finally:
        mesh.kill()
        receiver.terminate()
        receiver.wait(10)
