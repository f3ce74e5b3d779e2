"""Where the full agent's kernel time goes: the full-agent benchmark's setup, traced.

    flock /work/.bench.lock .venv/bin/python tests/bench/agent_kernel_trace.py tcp|udp [TREE]

Starts what tests/bench/test_full_agent_bench.py starts (the probe target and a real mesh on
core 1, the agent with 4,000 targets every 2 s alone on core 0; no blackbox, no scrapes) from
the code in ``TREE`` (default: this checkout), and after a warm-up measures the agent process in
windows one after the other, each divided by the probes it started in that window:

* ``cpu``: user and system CPU and context switches of each thread (``/proc``), and core 0's
  softirq time and NET_RX softirqs (``/proc/stat``, ``/proc/softirqs``);
* ``perf stat --per-thread``: system calls, context switches, wake-ups of each thread;
* ``perf trace -s``: system calls by kind and thread (its overhead slows the agent; the counts
  per probe are the figure, not the time);
* with ``TW_TRACE_RECORD=1``, ``perf record -g``: the functions the agent's time goes to.

Prints figures per probe; asserts nothing (a tool, not a test).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent))

from tests.bench.test_agent_bench import TARGETS, TICKS, _free_port, _stop  # noqa: E402
from tests.bench.test_full_agent_bench import (  # noqa: E402
    TARGET_COUNT,
    _agent_config,
    loadavg,
    thread_cpu,
    thread_switches,
)
from tests.bench.test_probe_http_bench import CLIENT_CORE, SERVER_CORE, _pinned  # noqa: E402
from tests.mesh.helpers import write_mesh_config  # noqa: E402
from tests.mesh.process import MeshProcess  # noqa: E402

WARMUP, WINDOW = 6.0, 5.0


class Agent:
    """This checkout's ``agent_run.py`` on the code of ``tree``, asked for its start count."""

    def __init__(self, tree: Path, config: Path) -> None:
        argv = [sys.executable, str(HERE / "agent_run.py"), str(config),
                f"127.0.0.1:{_free_port()}", str(WARMUP), "0.1"]
        self.proc = subprocess.Popen(_pinned(SERVER_CORE, argv), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=tree,
                                     env={**os.environ, "PYTHONPATH": str(tree)})
        assert self.proc.stdout is not None
        for _ in range(3):  # window-start, window-end, the window's figures
            self.proc.stdout.readline()

    @property
    def pid(self) -> int:
        """The Python process (``taskset`` execs it: same pid)."""
        return self.proc.pid

    def started(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return int(json.loads(self.proc.stdout.readline())["started"])

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        self.proc.wait(30)


def threads(pid: int) -> dict[int, dict[str, float | str]]:
    """Each thread's name, user and system seconds, voluntary and involuntary switches."""
    out: dict[int, dict[str, float | str]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            user, system = thread_cpu(task)
            voluntary, involuntary = thread_switches(task)
            name = (task / "comm").read_text().strip()
        except OSError:
            continue
        out[int(task.name)] = {"name": name, "user": user, "system": system,
                               "vol": float(voluntary), "invol": float(involuntary)}
    return out


def core_counters(core: int) -> dict[str, float]:
    """Core ``core``'s softirq seconds and NET_RX / TIMER softirq counts so far."""
    line = next(x for x in Path("/proc/stat").read_text().splitlines()
                if x.startswith(f"cpu{core} "))
    cpu = line.split()
    out = {"softirq_s": int(cpu[7]) / TICKS, "system_s": int(cpu[3]) / TICKS}
    for row in Path("/proc/softirqs").read_text().splitlines()[1:]:
        name, *counts = row.split()
        if name.rstrip(":") in ("NET_RX", "TIMER", "HRTIMER", "SCHED"):
            out[name.rstrip(":")] = float(counts[core])
    return out


def cpu_window(agent: Agent) -> None:
    started0, threads0, core0 = agent.started(), threads(agent.pid), core_counters(0)
    time.sleep(WINDOW)
    started1, threads1, core1 = agent.started(), threads(agent.pid), core_counters(0)
    n = started1 - started0
    print(f"cpu window {WINDOW:g} s, {n} probes ({n / WINDOW:.0f}/s); per probe:")
    total: dict[str, float] = defaultdict(float)
    for tid, after in sorted(threads1.items()):
        before = threads0.get(tid, {"user": 0.0, "system": 0.0, "vol": 0.0, "invol": 0.0})
        d = {k: float(after[k]) - float(before[k]) for k in ("user", "system", "vol", "invol")}
        for k, v in d.items():
            total[k] += v
        if any(d.values()):
            print(f"  thread {tid} {after['name']:<16} user {d['user'] / n * 1e6:6.1f} us  "
                  f"system {d['system'] / n * 1e6:6.1f} us  switches voluntary "
                  f"{d['vol'] / n:.3f} involuntary {d['invol'] / n:.3f}")
    print(f"  all threads          user {total['user'] / n * 1e6:6.1f} us  system "
          f"{total['system'] / n * 1e6:6.1f} us  switches voluntary {total['vol'] / n:.3f} "
          f"involuntary {total['invol'] / n:.3f}")
    print("  core 0: " + ", ".join(
        f"{k} {(core1[k] - core0[k]) / n * (1e6 if k.endswith('_s') else 1):.2f}"
        + (" us" if k.endswith("_s") else "") for k in core1))


def perf_stat_window(agent: Agent) -> None:
    events = ("raw_syscalls:sys_enter,context-switches,cpu-migrations,sched:sched_wakeup,"
              "sched:sched_waking")
    started0 = agent.started()
    out = subprocess.run(["perf", "stat", "--per-thread", "-x", ",", "-e", events, "-p",
                          str(agent.pid), "--", "sleep", str(WINDOW)],
                         capture_output=True, text=True, check=True).stderr
    n = agent.started() - started0
    print(f"perf stat window {WINDOW:g} s, {n} probes; per probe, by thread:")
    rows: dict[str, dict[str, float]] = defaultdict(dict)
    for line in out.splitlines():
        parts = line.split(",")
        if len(parts) > 4 and parts[1].replace(".", "").isdigit():
            rows[parts[0]][parts[3]] = float(parts[1])
    total: dict[str, float] = defaultdict(float)
    for thread, counts in sorted(rows.items()):
        if any(counts.values()):
            print(f"  {thread:<24} " + "  ".join(f"{k.split(':')[-1]} {v / n:.3f}"
                                                 for k, v in counts.items()))
        for k, v in counts.items():
            total[k] += v
    print("  all threads              " + "  ".join(f"{k.split(':')[-1]} {v / n:.3f}"
                                                   for k, v in total.items()))


def perf_trace_window(agent: Agent) -> None:
    started0 = agent.started()
    with tempfile.NamedTemporaryFile("r", suffix=".trace") as log:
        subprocess.run(["perf", "trace", "-s", "-o", log.name, "-p", str(agent.pid), "--",
                        "sleep", str(WINDOW)], capture_output=True, check=True)
        text = log.read()
    n = agent.started() - started0
    print(f"perf trace window {WINDOW:g} s, {n} probes (slowed by tracing); system calls per "
          "probe, by thread:")
    thread = ""
    for line in text.splitlines():
        head = re.match(r"\s*(\S.*) \((\d+)\), (\d+) events", line)
        if head:
            thread = f"{head.group(1)} ({head.group(2)})"
            print(f"  {thread}: {int(head.group(3)) / 2 / n:.3f} calls")
            continue
        row = re.match(r"\s+(\w+)\s+(\d+)\s+(\d+)\s", line)
        if row and thread and int(row.group(2)) / n >= 0.005:
            errors = f" ({int(row.group(3)) / n:.3f} failing)" if int(row.group(3)) else ""
            print(f"    {row.group(1):<16} {int(row.group(2)) / n:.3f}{errors}")


def perf_record_window(agent: Agent) -> None:
    """Where the agent's kernel time goes, by function (own time), from ``perf record``."""
    started0 = agent.started()
    with tempfile.NamedTemporaryFile(suffix=".data") as data:
        subprocess.run(["perf", "record", "-q", "-F", "4999", "-g", "-o", data.name, "-p",
                        str(agent.pid), "--", "sleep", str(WINDOW)], capture_output=True,
                       check=True)
        n = agent.started() - started0
        if os.environ.get("TW_TRACE_KEEP"):  # for perf report by hand
            subprocess.run(["cp", data.name, os.environ["TW_TRACE_KEEP"]], check=True)
        report = subprocess.run(["perf", "report", "-i", data.name, "--stdio", "--no-children",
                                 "--sort", "sym", "-g", "none", "--percent-limit", "0.7"],
                                capture_output=True, text=True, check=True).stdout
    print(f"perf record window {WINDOW:g} s, {n} probes; top functions by own time:")
    for line in report.splitlines():
        if "%" in line and not line.startswith("#"):
            print("  " + line.strip())


def main(kind: str, tree: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ports = (_free_port(), _free_port())
        target = subprocess.Popen(_pinned(CLIENT_CORE, [sys.executable, "-c", TARGETS,
                                                        str(ports[0]), str(ports[1])]))
        port = _free_port()
        mesh = MeshProcess(write_mesh_config(folder / "mesh", TARGET_COUNT, ["bench"],
                                             port=port, pool_of=100), port,
                           cpu=int(CLIENT_CORE))
        mesh.start()
        try:
            agent = Agent(tree, _agent_config(folder, mesh, kind, ports))
            print(f"{kind}, code of {tree}, load {loadavg()}")
            try:
                cpu_window(agent)
                perf_stat_window(agent)
                perf_trace_window(agent)
                if os.environ.get("TW_TRACE_RECORD"):
                    perf_record_window(agent)
                cpu_window(agent)
            finally:
                agent.stop()
            print(f"load {loadavg()}")
        finally:
            mesh.stop()
            _stop(target)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2] if len(sys.argv) > 2 else HERE.parent.parent).resolve())
