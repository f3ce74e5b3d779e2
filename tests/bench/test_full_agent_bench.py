"""The full scheduled agent against blackbox_exporter scraped at the same rate (issue #22).

    flock /work/.bench.lock .venv/bin/pytest -m slow -s tests/bench/test_full_agent_bench.py

Our side is the whole product path: ``tunnelwatch agent``'s ``Agent`` on uvloop
(tests/bench/agent_run.py) with 4,000 targets at the default 2 s L4 interval (2,000 probes/s),
its scheduler, metrics, spool and reporter sending signed batches to a real ``tunnelwatch mesh``;
its ``/metrics`` is scraped every 5 s meanwhile. The peer is blackbox_exporter (``GOMAXPROCS=1``)
whose ``/probe`` is requested at the same 2,000/s by the compiled scraper (tests/bench/httpload.c
with a rate: open loop, 64 keep-alive connections) — what a Prometheus scraping blackbox for
4,000 targets every 2 s asks of it.

Fair to the peer: the agent and blackbox each run alone on core 0 (``taskset``); the probe
target, the mesh and the scraper on core 1. CPU is counted for every process of each side,
every thread and child (``/proc``), over the same 10 s window after a 4 s warm-up: the agent
process, the mesh (printed apart: blackbox has no mesh; a Prometheus storing blackbox's answers
is not counted either), blackbox, and the scraper (printed apart). The agent's CPU is also
printed in its user and system parts: the kernel part moves most from run to run; beside it, its
context switches per probe and the kernel floor: the system CPU per probe of the probes' own
system calls made from C at the same rate on the same core (tests/bench/l4loop.c). The agent's
start error is every probe's start lag in the window (thousands of samples), as its scheduler
measures it.

``TW_BENCH_PROFILE=1`` also runs the agent once under cProfile and prints where its CPU goes.
Prints figures and ratios; asserts only that probes ran and the mesh accepted them.
"""

from __future__ import annotations

import json
import os
import pstats
import re
import resource
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.bench.figures import record
from tests.bench.test_agent_bench import DNS_QUERY, TARGETS, TICKS, _free_port, _stop
from tests.bench.test_probe_http_bench import (
    CLIENT_CORE,
    SERVER_CORE,
    _cpu_seconds,
    _pinned,
    blackbox,
    compiled,
    cpu_user_and_system,
    httpload,
)
from tests.mesh.helpers import write_mesh_config
from tests.mesh.process import MeshProcess

pytestmark = [pytest.mark.slow, pytest.mark.agent]
__all__ = ["blackbox", "httpload"]  # fixtures this module uses (the same servers)

TARGET_COUNT = 4000
INTERVAL = 2.0  # the default L4 interval: 2,000 probes/s
RATE = TARGET_COUNT / INTERVAL
WARMUP, WINDOW = 4.0, 10.0
SCRAPE_EVERY = 5.0
SCRAPER_CONNS = 64
HERE = Path(__file__).parent


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@pytest.fixture(scope="module")
def probe_targets() -> Iterator[tuple[int, int]]:
    tcp, udp = _free_port(), _free_port()
    proc = subprocess.Popen(_pinned(CLIENT_CORE, [sys.executable, "-c", TARGETS, str(tcp),
                                                  str(udp)]))
    time.sleep(0.5)
    try:
        yield tcp, udp
    finally:
        _stop(proc)


def _l4(kind: str, ports: tuple[int, int]) -> dict[str, object]:
    if kind == "tcp":
        return {"tcp_ports": [ports[0]]}
    return {"udp": [{"port": ports[1], "send_hex": DNS_QUERY.hex(),
                     "expect_hex": (DNS_QUERY[:2] + b"\x81\x80").hex()}]}


@pytest.fixture(scope="module")
def l4loop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compiled(tmp_path_factory, "l4loop")


def thread_cpu(task: Path) -> tuple[float, float]:
    """A thread's (``/proc/PID/task/TID``) user and system CPU seconds so far."""
    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS  # utime, stime


def thread_switches(task: Path) -> tuple[int, int]:
    """A thread's (``/proc/PID/task/TID``) voluntary and involuntary context switches so far."""
    found = dict(re.findall(r"^(\w*voluntary_ctxt_switches):\s+(\d+)",
                            (task / "status").read_text(), re.M))
    return int(found["voluntary_ctxt_switches"]), int(found["nonvoluntary_ctxt_switches"])


def context_switches(pid: int) -> tuple[int, int]:
    """Every live thread of ``pid``: voluntary and involuntary context switches so far."""
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            v, i = thread_switches(task)
        except OSError:
            continue
        voluntary, involuntary = voluntary + v, involuntary + i
    return voluntary, involuntary


def kernel_floor(l4loop: Path, kind: str, ports: tuple[int, int]) -> dict[str, float]:
    """The probes' own system calls alone (C, one epoll loop) at RATE for WINDOW seconds on the
    agent's core: CPU and context switches per probe."""
    port = ports[0] if kind == "tcp" else ports[1]
    out = subprocess.run(_pinned(SERVER_CORE, [str(l4loop), kind, str(port), str(RATE),
                                               str(WINDOW)]),
                         capture_output=True, text=True, check=True, timeout=WINDOW + 30)
    names = ("started", "done", "failed", "user_us", "system_us", "voluntary", "involuntary")
    return dict(zip(names, map(float, out.stdout.split()), strict=True))


def _agent_config(folder: Path, mesh: MeshProcess, kind: str, ports: tuple[int, int]) -> Path:
    targets = [{"id": f"n{i}", "pool": f"p{i // 100}", "pop": "pop0", "region": "eu",
                "address": "127.0.0.1", "l4": _l4(kind, ports)} for i in range(TARGET_COUNT)]
    config = {"agent": {"vantage": "bench", "state_dir": str(folder / "state")},
              "mesh": {"endpoints": [mesh.base], "key_id": "bench",
                       "key_file": str(folder / "mesh" / "bench.key")},
              "targets": targets}
    path = folder / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[MeshProcess]:
    port = _free_port()
    config = write_mesh_config(tmp_path / "mesh", TARGET_COUNT, ["bench"], port=port,
                               pool_of=100)
    proc = MeshProcess(config, port, cpu=int(CLIENT_CORE))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def _scrape_every(url: str, stop: threading.Event, seconds: float) -> None:
    while not stop.wait(seconds):
        with urllib.request.urlopen(url, timeout=10) as resp:
            resp.read()


def run_agent(config: Path, mesh: MeshProcess, profile: Path | None = None
              ) -> dict[str, float]:
    """The agent through one window: its CPU, the mesh's, and what the agent counted."""
    listen = f"127.0.0.1:{_free_port()}"
    argv = [sys.executable, str(HERE / "agent_run.py"), str(config), listen, str(WARMUP),
            str(WINDOW), *([str(profile)] if profile else [])]
    proc = subprocess.Popen(_pinned(SERVER_CORE, argv), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            cwd=HERE.parent.parent)
    assert proc.stdout is not None and proc.stdin is not None
    stop = threading.Event()
    try:
        assert proc.stdout.readline().strip() == "window-start"
        split0, switches0 = cpu_user_and_system(proc.pid), context_switches(proc.pid)
        agent0, mesh0 = sum(split0), mesh.cpu_seconds() + mesh.children_cpu_seconds()
        load = loadavg()
        scraper = threading.Thread(target=_scrape_every,
                                   args=(f"http://{listen}/metrics", stop, SCRAPE_EVERY))
        scraper.start()
        assert proc.stdout.readline().strip() == "window-end"
        split1, switches1 = cpu_user_and_system(proc.pid), context_switches(proc.pid)
        agent_cpu = sum(split1) - agent0
        mesh_cpu = mesh.cpu_seconds() + mesh.children_cpu_seconds() - mesh0
        counted = json.loads(proc.stdout.readline())
        stop.set()
        scraper.join()
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
    finally:
        stop.set()
        _stop(proc)  # type: ignore[arg-type]
    lags = [abs(lag) for lag in counted.pop("lags")]  # a start may be early by START_AHEAD
    return {**counted, "agent_cpu": agent_cpu, "agent_user": split1[0] - split0[0],
            "agent_system": split1[1] - split0[1], "mesh_cpu": mesh_cpu,
            "voluntary": switches1[0] - switches0[0],
            "involuntary": switches1[1] - switches0[1], "lag_n": len(lags),
            "lag_p50": pct(lags, .5), "lag_p99": pct(lags, .99), "lag_max": max(lags, default=0),
            "load_before": load, "load_after": loadavg()}  # type: ignore[dict-item]


def scrape_blackbox(httpload: Path, address: str, path: str, pid: int) -> dict[str, float]:
    """blackbox's /probe at RATE for WINDOW seconds: its CPU and the scraper's."""
    host, port = address.split(":")
    load = loadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = _cpu_seconds(pid)
    out = subprocess.run(_pinned(CLIENT_CORE, [str(httpload), host, port, path,
                                               str(SCRAPER_CONNS), str(WINDOW), str(RATE)]),
                         capture_output=True, text=True, check=True, timeout=WINDOW + 60)
    cpu = _cpu_seconds(pid) - cpu0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    done, failed, p50, p99, backlog = out.stdout.split()
    return {"done": int(done), "failed": int(failed), "cpu": cpu, "p50_us": float(p50),
            "p99_us": float(p99), "backlog": int(backlog),
            "scraper_cpu": (after.ru_utime + after.ru_stime) - (before.ru_utime
                                                                 + before.ru_stime),
            "load_before": load, "load_after": loadavg()}  # type: ignore[dict-item]


def print_profile(path: Path) -> None:
    stats = pstats.Stats(str(path))
    total = stats.total_tt  # type: ignore[attr-defined]
    print(f"  where the agent's CPU goes (cProfile of the window, {total:.2f} s profiled; "
          "top by own time):")
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    for (file, line, name), (_, calls, tottime, cumtime, _) in rows[:25]:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
        print(f"    {tottime / total:6.1%} own {cumtime / total:6.1%} cum {calls:>8} calls  "
              f"{name}  {where}")


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_full_agent_vs_scraped_blackbox(kind: str, tmp_path: Path, httpload: Path,
                                        l4loop: Path, probe_targets: tuple[int, int],
                                        mesh: MeshProcess, blackbox: tuple[str, int]) -> None:
    config = _agent_config(tmp_path, mesh, kind, probe_targets)
    if os.environ.get("TW_BENCH_PROFILE"):
        profiled = tmp_path / "agent.prof"
        run_agent(config, mesh, profiled)
        print(f"\nfull agent, {kind}, profiled run:")
        print_profile(profiled)
    a = run_agent(config, mesh)
    floor = kernel_floor(l4loop, kind, probe_targets)
    module, port = ("tcp_connect", probe_targets[0]) if kind == "tcp" else ("dns_udp",
                                                                          probe_targets[1])
    b = scrape_blackbox(httpload, blackbox[0], f"/probe?module={module}&target=127.0.0.1:{port}",
                        blackbox[1])
    started, overloaded = a["started"], a["overloaded"]
    expected = RATE * WINDOW
    print(f"\nfull scheduled agent vs blackbox_exporter scraped at the same rate, {kind}: "
          f"{TARGET_COUNT} targets every {INTERVAL:g} s = {RATE:.0f} probes/s for {WINDOW:g} s "
          f"(agent / blackbox alone on core {SERVER_CORE}, blackbox GOMAXPROCS=1; target, mesh "
          f"and scraper on core {CLIENT_CORE})")
    if started < 0.9 * expected:
        print(f"  the agent started only {started:.0f} of the {expected:.0f} probes due "
              f"({overloaded:.0f} refused as overloaded): the machine is too loaded for this "
              "figure to be the agent's own; its CPU per probe is printed anyway")
    per, n = a["agent_cpu"] / max(started, 1), max(started, 1)
    print(f"  agent: {started:.0f} probes started ({overloaded:.0f} refused, "
          f"{a['failures']:.0f} failed results in all), {a['sent']:.0f} observations accepted "
          f"by the mesh (spool depth {a['spool_depth']:.0f}); agent process {a['agent_cpu']:.2f} "
          f"CPU-s -> {per * 1e6:.1f} us per probe (user {a['agent_user'] / n * 1e6:.1f} + "
          f"system {a['agent_system'] / n * 1e6:.1f}), {1 / per:,.0f} probes/CPU-s; mesh "
          f"{a['mesh_cpu']:.2f} CPU-s ({a['mesh_cpu'] / max(started, 1) * 1e6:.1f} us per "
          f"probe, apart); start error p50 {a['lag_p50'] * 1e3:.3f} ms p99 "
          f"{a['lag_p99'] * 1e3:.3f} ms max {a['lag_max'] * 1e3:.1f} ms over {a['lag_n']:.0f} "
          f"starts (target p99 <= 2 ms); load average {a['load_before']} -> {a['load_after']}")
    print(f"  agent context switches per probe: voluntary {a['voluntary'] / n:.3f}, involuntary "
          f"{a['involuntary'] / n:.3f}; kernel floor (the probes' system calls alone from C at "
          f"{RATE:.0f}/s on core {SERVER_CORE}, tests/bench/l4loop.c): system "
          f"{floor['system_us']:.1f} us per probe (user {floor['user_us']:.1f}), switches "
          f"voluntary {floor['voluntary']:.3f}, {floor['failed']:.0f} of {floor['done']:.0f} "
          "failed")
    b_per = b["cpu"] / max(b["done"], 1)
    print(f"  blackbox: {b['done']:.0f} probes ({b['failed']:.0f} failed), {b['cpu']:.2f} "
          f"CPU-s -> {b_per * 1e6:.1f} us per probe, {1 / b_per:,.0f} probes/CPU-s; scraper "
          f"{b['scraper_cpu']:.2f} CPU-s (apart); latency from the due time p50 "
          f"{b['p50_us'] / 1e3:.2f} ms p99 {b['p99_us'] / 1e3:.2f} ms, most requests waiting "
          f"for a connection {b['backlog']:.0f}; load average {b['load_before']} -> "
          f"{b['load_after']}")
    target = " (target <= 90 us and >= 4x)" if kind == "tcp" else " (target >= 20,000/CPU-s)"
    print(f"  ratio agent/blackbox probes per CPU-s: {b_per / per:.2f}x{target}; counting the "
          f"mesh with the agent: {b_per / (per + a['mesh_cpu'] / max(started, 1)):.2f}x")
    unit = "probes/CPU-s"
    record(f"full scheduled agent, {kind}, 2,000/s ({per * 1e6:.0f} us/probe; mesh apart)",
           1 / per, unit, peer=1 / b_per, peer_name="blackbox scraped at the same rate",
           target=">= 4x, <= 90 us" if kind == "tcp" else ">= 20,000")
    record(f"full agent system CPU per probe, {kind}, 2,000/s", a["agent_system"] / n * 1e6, "us",
           peer=floor["system_us"], peer_name="the probes' system calls alone (l4loop.c)")
    record(f"full agent start error p99, {kind}, 2,000/s", a["lag_p99"] * 1e3, "ms",
           target="<= 2 ms")
    assert started > 0 and a["sent"] > 0
    assert b["done"] > 0 and b["failed"] == 0
