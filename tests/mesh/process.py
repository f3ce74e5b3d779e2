"""A real ``tunnelwatch mesh`` subprocess for tests and benchmarks, and a signed poster."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from probes.model import ObservationBatch, encode, signing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MeshProcess:
    def __init__(self, config: Path, port: int, cpu: int | None = None,
                 nofile: int | None = None) -> None:
        self.config = config
        self.cpu = cpu  # pin to one core (taskset) for benchmarks
        self.nofile = nofile  # the mesh's open-file limit (soft), e.g. the common 1,024
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = Path(sys.executable).parent / "tunnelwatch"
        pin = ["taskset", "-c", str(self.cpu)] if self.cpu is not None else []
        nofile = self.nofile

        def limits() -> None:
            if nofile is not None:
                _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

        self.proc = subprocess.Popen(
            [*pin, str(exe), "mesh", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.config.parent / "mesh.log", "ab"),  # noqa: SIM115
            preexec_fn=limits if nofile is not None else None,  # noqa: PLW1509
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
            assert self.proc.poll() is None, (self.config.parent / "mesh.log").read_text()
        raise AssertionError("mesh did not come up")

    def cpu_seconds(self) -> float:
        """User + system CPU time the mesh process used so far."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def children_cpu_seconds(self) -> float:
        """CPU time of the mesh's reaped children (snapshot writers)."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=5) as r:
            return json.load(r)

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(self.base + path, timeout=10) as r:
            return str(r.read().decode())


def post(mesh: MeshProcess, folder: Path, batch: ObservationBatch) -> int | None:
    """HTTP status, or None when the connection failed (the mesh is dead)."""
    body = encode(batch)
    key = signing.load_key(folder / f"{batch.agent}.key")
    headers = signing.signed_headers(batch.agent, batch.agent, key, body, time.time())
    req = urllib.request.Request(
        mesh.base + "/v1/batches", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None
