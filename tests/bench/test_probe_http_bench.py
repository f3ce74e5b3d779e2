"""``/probe`` over HTTP side by side: the agent's blackbox-style ``/probe`` against
prometheus-blackbox-exporter's, a TCP connect to the same local target, both driven by the same
compiled keep-alive client (tests/bench/httpload.c: epoll, one thread, the same number of
connections, closed loop).

Fair to the peer: each server runs alone on core 0 (``taskset``), blackbox with
``GOMAXPROCS=1`` (one core's worth of Go threads, as the agent has one event loop); the client
and the TCP target run on core 1. Each server's CPU is every thread of its process and of its
children (``/proc/<pid>/stat``, utime+stime+cutime+cstime, children found through
``/proc/<pid>/task/*/children``). Latency p50/p99 is the client's, over every request (thousands
per run). The agent runs as ``tunnelwatch agent`` does, with one target (its scheduler probes it
every 2 s meanwhile, and its reporter retries a mesh that does not answer: both are counted).

Prints figures and the ratio; asserts only that every probe succeeded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.bench.figures import record
from tests.bench.test_agent_bench import BLACKBOX_CONFIG, TARGETS, TICKS, _free_port, _stop

pytestmark = [pytest.mark.slow, pytest.mark.agent]

CONNS = 16
SECONDS = 5.0
SERVER_CORE, CLIENT_CORE = "0", "1"
HERE = Path(__file__).parent


def _pinned(core: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", core, *argv] if shutil.which("taskset") else argv


def _descendants(pid: int) -> list[int]:
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            out.extend(_descendants(int(child)))
    return out


def _cpu_seconds(pid: int) -> float:
    """CPU of ``pid``, every thread, and its children (live and reaped)."""
    return sum(cpu_user_and_system(pid))


def cpu_user_and_system(pid: int) -> tuple[float, float]:
    """:func:`_cpu_seconds` in its user and system (kernel) parts: on loopback a probe's kernel
    part moves by ~10 us from run to run, which hides changes of the Python side in the sum."""
    user = system = 0
    for p in _descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) + int(fields[13])  # utime cutime
        system += int(fields[12]) + int(fields[14])  # stime cstime
    return user / TICKS, system / TICKS


def _wait_http(url: str, proc: subprocess.Popen[bytes], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while True:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return
        except OSError:
            assert time.monotonic() < deadline, f"{url} did not answer within {within:g} s"
            time.sleep(0.1)


def compiled(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """tests/bench/``name``.c built (skips without a C compiler)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip(f"no C compiler for {name}.c")
    binary = tmp_path_factory.mktemp(name) / name
    subprocess.run([cc, "-O2", "-o", str(binary), str(HERE / f"{name}.c")], check=True)
    return binary


@pytest.fixture(scope="module")
def httpload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compiled(tmp_path_factory, "httpload")


@pytest.fixture(scope="module")
def tcp_target() -> Iterator[int]:
    port = _free_port()
    proc = subprocess.Popen(_pinned(CLIENT_CORE, [sys.executable, "-c", TARGETS, str(port),
                                                  str(_free_port())]))
    time.sleep(0.5)
    try:
        yield port
    finally:
        _stop(proc)


@pytest.fixture
def blackbox(tmp_path: Path) -> Iterator[tuple[str, int]]:
    binary = shutil.which("prometheus-blackbox-exporter")
    if binary is None:
        pytest.skip("prometheus-blackbox-exporter not installed")
    (tmp_path / "blackbox.yml").write_text(BLACKBOX_CONFIG)
    port = _free_port()
    proc = subprocess.Popen(
        _pinned(SERVER_CORE, [binary, f"--config.file={tmp_path / 'blackbox.yml'}",
                              f"--web.listen-address=127.0.0.1:{port}", "--log.level=error"]),
        env={**os.environ, "GOMAXPROCS": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        _wait_http(f"http://127.0.0.1:{port}/metrics", proc)
        yield f"127.0.0.1:{port}", proc.pid
    finally:
        _stop(proc)


def _agent(tmp_path: Path, tcp_port: int) -> tuple[subprocess.Popen[bytes], int]:
    key = tmp_path / "key"
    key.write_text("k" * 64)
    key.chmod(0o600)
    config = {"agent": {"vantage": "bench", "state_dir": str(tmp_path / "state")},
              "mesh": {"endpoints": [f"http://127.0.0.1:{_free_port()}"], "key_id": "k",
                       "key_file": str(key)},
              "targets": [{"id": "n1", "pool": "p", "pop": "fra", "region": "eu",
                           "address": "127.0.0.1", "l4": {"tcp_ports": [tcp_port]}}]}
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = subprocess.Popen(
        _pinned(SERVER_CORE, [sys.executable, "-m", "probes.cli", "agent", "--config",
                              str(tmp_path / "agent.yaml"), "--listen", f"127.0.0.1:{port}",
                              "--log-level", "error"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port


@pytest.fixture
def agent(tmp_path: Path, tcp_target: int) -> Iterator[tuple[str, int]]:
    proc, port = _agent(tmp_path, tcp_target)
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        yield f"127.0.0.1:{port}", proc.pid
    finally:
        _stop(proc)


def drive(httpload: Path, address: str, path: str, pid: int) -> dict[str, float]:
    """One closed-loop run against a server: its figures and its CPU."""
    host, port = address.split(":")
    cpu0 = _cpu_seconds(pid)
    out = subprocess.run(_pinned(CLIENT_CORE, [str(httpload), host, port, path, str(CONNS),
                                               str(SECONDS)]),
                         capture_output=True, text=True, check=True, timeout=SECONDS + 30)
    cpu = _cpu_seconds(pid) - cpu0
    done, failed, p50, p99 = out.stdout.split()
    return {"done": int(done), "failed": int(failed), "cpu": cpu, "p50_us": float(p50),
            "p99_us": float(p99), "per_cpu": int(done) / cpu if cpu else float("nan")}


def line(name: str, f: dict[str, float]) -> str:
    return (f"  {name:<30} {f['done']:>8.0f} probes ({f['failed']:.0f} failed) "
            f"{f['done'] / SECONDS:7.0f}/s, server {f['cpu']:5.2f} CPU-s -> "
            f"{f['per_cpu']:6.0f} probes/CPU-s ({1e6 / f['per_cpu']:5.0f} us each); latency "
            f"p50 {f['p50_us'] / 1e3:.2f} ms p99 {f['p99_us'] / 1e3:.2f} ms "
            f"({f['done']:.0f} samples)")


def test_probe_over_http_same_driver(httpload: Path, tcp_target: int,
                                     blackbox: tuple[str, int],
                                     agent: tuple[str, int]) -> None:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    b = drive(httpload, blackbox[0], f"/probe?module=tcp_connect&target=127.0.0.1:{tcp_target}",
              blackbox[1])
    a = drive(httpload, agent[0], "/probe?target=n1&module=tcp", agent[1])
    print(f"\n/probe over HTTP, TCP connect to a local target, {CONNS} keep-alive connections "
          f"from one compiled client for {SECONDS:g} s (servers pinned to core {SERVER_CORE}, "
          f"blackbox GOMAXPROCS=1; client and target on core {CLIENT_CORE}); load average "
          f"before {load}")
    print(line("blackbox_exporter /probe", b))
    print(line("tunnelwatch agent /probe", a))
    print(f"  ratio agent/blackbox probes per CPU-s: {a['per_cpu'] / b['per_cpu']:.2f}x "
          f"(target >= 2.5x); load average after "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    record("/probe over HTTP, TCP", a["per_cpu"], "probes/CPU-s", peer=b["per_cpu"],
           peer_name="blackbox /probe, same driver", target=">= 2.5x")
    assert b["failed"] == 0 and a["failed"] == 0
    assert b["done"] > 0 and a["done"] > 0
