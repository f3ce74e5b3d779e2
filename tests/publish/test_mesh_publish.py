"""The publishers inside a real ``tunnelwatch mesh`` process: verdicts from ingested batches reach
a webhook in order; SIGKILL during delivery, restart: nothing lost, and anything delivered twice
carries the same idempotency key and the same body."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import msgspec
import pytest

from probes.model import Observation, ObservationBatch, Reason, Verdict, encode, signing
from tests.publish.helpers import KEY

pytestmark = pytest.mark.publish

AGENTS = ("va", "vb", "vc")
NODES = 6
ROUNDS = 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Recorder(BaseHTTPRequestHandler):
    """A slow webhook sink (so a kill lands mid-delivery) that records every delivery."""

    deliveries: ClassVar[list[tuple[str, str]]] = []  # (idempotency key, body sha256)
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        ok = signing.verify(KEY, self.headers[signing.HEADER_TIMESTAMP], body,
                            self.headers[signing.HEADER_SIGNATURE])
        time.sleep(0.02)
        if ok:
            with self.lock:
                self.deliveries.append((self.headers["Idempotency-Key"],
                                        hashlib.sha256(body).hexdigest()))
        self.send_response(204 if ok else 401)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def sink() -> Iterator[tuple[str, type[Recorder]]]:
    Recorder.deliveries = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", Recorder
    server.shutdown()
    server.server_close()


def write_config(folder: Path, port: int, url: str) -> Path:
    signing.write_key_file(folder / "hook.key", KEY)
    lines = [f"listen: 127.0.0.1:{port}", "database: mesh.db", "agents:"]
    for agent in AGENTS:
        signing.write_key_file(folder / f"{agent}.key", signing.generate_key())
        lines.append(f"  - {{name: {agent}, key_file: {agent}.key}}")
    lines.append("nodes:")
    lines += [f"  - {{id: n{i}, pool: p{i}}}" for i in range(NODES)]
    # no dwell: the script flips every node within seconds, as fast as it can post
    lines += ["decision:", "  damping: {enabled: false}", "  min_dwell_seconds: 0", "publishers:",
              f"  - {{type: webhook, name: hook, url: '{url}', key_id: k1, key_file: hook.key,",
              "     retry: {initial_backoff: 0.05, max_backoff: 0.5, poll_interval: 0.05}}"]
    path = folder / "mesh.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def batches() -> list[ObservationBatch]:
    """Every node fails everywhere for a few rounds, at its own rhythm: many verdict changes."""
    out = []
    seq = dict.fromkeys(AGENTS, 0)
    for r in range(ROUNDS):
        for agent in AGENTS:
            items = []
            for i in range(NODES):
                seq[agent] += 1
                ok = (r // (3 + i % 3)) % 2 == 0
                items.append(Observation(node=f"n{i}", check="wg", vantage=agent, seq=seq[agent],
                                         wall_time=time.time(), ok=ok,
                                         reason=Reason.OK if ok else Reason.TIMEOUT,
                                         duration_seconds=0.01, kind="wireguard.handshake"))
            out.append(ObservationBatch(version=1, agent=agent, batch_seq=r + 1,
                                        sent_at=time.time(), observations=items))
    return out


class Mesh:
    def __init__(self, config: Path, port: int) -> None:
        self.config, self.base = config, f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "probes.cli", "mesh", "--config", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=open(self.config.parent / "mesh.log", "ab"))  # noqa: SIM115
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
            assert self.proc.poll() is None, (self.config.parent / "mesh.log").read_text()
        raise AssertionError("mesh did not come up")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log(self) -> list[dict]:
        with urllib.request.urlopen(self.base + "/v1/verdicts?after=0&limit=100000",
                                    timeout=5) as r:
            return list(json.load(r)["log"])

    def post(self, folder: Path, batch: ObservationBatch) -> int:
        body = encode(batch)
        key = signing.load_key(folder / f"{batch.agent}.key")
        headers = signing.signed_headers(batch.agent, batch.agent, key, body, time.time())
        req = urllib.request.Request(self.base + "/v1/batches", data=body, headers=headers)
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status)

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.base + "/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + '{publisher="hook"}'):
                    return float(line.rsplit(" ", 1)[1])
        return -1.0


def test_sigkill_during_delivery_loses_nothing(tmp_path: Path,
                                              sink: tuple[str, type[Recorder]]) -> None:
    url, recorder = sink
    port = free_port()
    mesh = Mesh(write_config(tmp_path, port, url), port)
    try:
        mesh.start()
        for batch in batches():
            assert mesh.post(tmp_path, batch) == 200
        log = mesh.log()
        assert len(log) > 3 * NODES  # the script really moves verdicts
        # kill while the sink is part-way through the log
        deadline = time.monotonic() + 20
        while len(recorder.deliveries) < len(log) // 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        mesh.kill()
        delivered_before = len(recorder.deliveries)
        assert 0 < delivered_before < len(log), "the kill did not land mid-delivery"

        mesh.start()
        assert mesh.log() == log  # the restart announced nothing new
        want = {msgspec.convert(e["verdict"], Verdict).idempotency_key for e in log}
        deadline = time.monotonic() + 30
        while {k for k, _ in recorder.deliveries} != want and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # nothing more should come
        assert mesh.metric("tunnelwatch_publisher_lag_seconds") == 0
    finally:
        mesh.kill()

    got = list(recorder.deliveries)
    assert {k for k, _ in got} == want  # nothing lost
    bodies: dict[str, set[str]] = defaultdict(set)
    for key, digest in got:
        bodies[key].add(digest)
    assert all(len(d) == 1 for d in bodies.values())  # a duplicate is the same delivery again
    assert len(got) - len(want) <= 2  # at most the in-flight one(s) came twice
    # per node, first deliveries come in seq order with no gaps
    firsts: dict[str, list[int]] = defaultdict(list)
    seen: set[str] = set()
    for key, _ in got:
        if key not in seen:
            seen.add(key)
            node, seq = key.rsplit(":", 1)
            firsts[node].append(int(seq))
    for node, seqs in firsts.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"{node}: {seqs}"


@pytest.mark.parametrize(("publisher", "path"), [
    ("{type: webhook, name: h, url: 'ftp://x', key_id: k, key_file: hook.key}",
     "$.publishers[0].url"),
    ("{type: webhook, name: h, url: 'http://x', key_id: k, key_file: missing.key}",
     "$.publishers[0].key_file"),
    ("{type: haproxy, name: lb, socket: /s, down_action: off}", "$.publishers[0].down_action"),
    ("{type: haproxy, name: lb, socket: /s, retry: {max_backoff: 0}}",
     "$.publishers[0].retry.max_backoff"),
    ("{type: haproxy, name: lb}", "$.publishers[0]"),
])
def test_mesh_config_publisher_errors_name_the_field(tmp_path: Path, publisher: str,
                                                     path: str) -> None:
    from probes.config import ConfigError
    from probes.mesh.config import load_mesh_config

    config = write_config(tmp_path, 9480, "http://127.0.0.1:1/")
    text = config.read_text().split("publishers:")[0]
    config.write_text(text + f"publishers:\n  - {publisher}\n")
    with pytest.raises(ConfigError) as err:
        load_mesh_config(config)
    assert any(p.path == path and p.line for p in err.value.problems), err.value
