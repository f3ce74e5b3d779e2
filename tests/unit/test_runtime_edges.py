"""The everyday edges of `tunnelwatch agent` and `tunnelwatch mesh` as processes: a port in use,
a state folder that cannot be made, a missing key file are one line on stderr and exit 2 (no
traceback); the mesh says at the default level what it loaded and where it listens; SIGTERM
stops the agent at once, cancelling a probe in flight without reporting it as a failure."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from probes.model import signing
from tests.agent.helpers import Receiver, free_port, write_config
from tests.mesh.helpers import write_mesh_config

EXE = Path(sys.executable).parent / "tunnelwatch"


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def _one_line_error(result: subprocess.CompletedProcess[str], words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert words in last, result.stderr


def _agent_config(folder: Path, port: int, mesh: dict[str, Any] | None = None) -> Path:
    return write_config(folder / "agent.yaml", listen=f"127.0.0.1:{port}",
                        targets=[{"id": "n1", "pool": "p", "pop": "p", "region": "r",
                                  "address": "127.0.0.1", "l4": {"tcp_ports": [1]}}],
                        mesh=mesh)


def test_agent_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run("agent", "--config", str(_agent_config(tmp_path, port)))
    _one_line_error(result, f"cannot listen on 127.0.0.1:{port}: address already in use")


def test_mesh_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_mesh_config(tmp_path, 2, ("va",), port=port)
        result = _run("mesh", "--config", str(config))
    _one_line_error(result, f"cannot listen on 127.0.0.1:{port}: address already in use")


def test_unusable_state_dir_and_missing_key_file_are_one_line(tmp_path: Path) -> None:
    cfg = _agent_config(tmp_path, free_port())
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "state"), "/proc/1/no-such/state"))
    _one_line_error(_run("agent", "--config", str(cfg)), "/proc/1/no-such")
    cfg = _agent_config(tmp_path, free_port(), mesh={
        "endpoints": ["http://127.0.0.1:1"], "key_id": "k", "key_file": "missing.key"})
    _one_line_error(_run("agent", "--config", str(cfg)), "missing.key")


def test_mesh_logs_what_it_loaded_and_where_it_listens(tmp_path: Path) -> None:
    port = free_port()
    config = write_mesh_config(tmp_path, 3, ("va", "vb"), port=port)
    proc = subprocess.Popen([str(EXE), "mesh", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            seen.append(line)
            if "listening on" in line or not line:
                break
        text = "".join(seen)
        assert "INFO" in text and "mesh loaded: 2 agents, 3 nodes" in text, text
        assert f"listening on 127.0.0.1:{port}" in text, text
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        print(f"mesh stopped {time.monotonic() - started:.2f} s after SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_sigterm_cancels_a_probe_in_flight_and_stops_at_once(tmp_path: Path) -> None:
    """A UDP exchange whose answer never comes is in flight (60 s timeout) when SIGTERM
    arrives: the agent cancels it instead of waiting, reports nothing for it, and is gone at
    once (it used to wait out the probe). The probe's timeout is far above the bound, so a
    busy machine cannot blur "stopped at once" and "waited out the probe"."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    silent.settimeout(60)
    key = signing.generate_key()
    signing.write_key_file(tmp_path / "mesh.key", key)
    mesh_port = free_port()
    receiver = Receiver(key.encode(), "v1")
    await receiver.start(mesh_port)
    cfg = write_config(
        tmp_path / "agent.yaml", listen=f"127.0.0.1:{free_port()}",
        tiers={"l4": {"interval": "120s", "timeout": "60s", "jitter": 0}},
        targets=[{"id": "n1", "pool": "p", "pop": "p", "region": "r", "address": "127.0.0.1",
                  "l4": {"udp": [{"port": silent.getsockname()[1], "send_hex": "00",
                                  "expect_hex": "01"}]}}],
        mesh={"endpoints": [f"http://127.0.0.1:{mesh_port}"], "key_id": "v1",
              "key_file": "mesh.key", "flush_interval": 0.1}, vantage="v1")
    log = tmp_path / "agent.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(EXE), "agent", "--config", str(cfg)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        await asyncio.to_thread(silent.recvfrom, 64)  # the probe's request: it is in flight
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 90)
        took = time.monotonic() - started
        print(f"agent stopped {took:.2f} s after SIGTERM with a 60 s probe in flight "
              f"(load average {os.getloadavg()[0]:.2f})")
        assert code == 0, log.read_text()[-2000:]
        assert took < 30  # never waits out the probe (the agent's own budget is 1.5 s)
        assert "stopped in" in log.read_text()
        await asyncio.sleep(0.2)
        assert receiver.seqs == [], "a cancelled probe was reported"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        silent.close()
        await receiver.stop()
