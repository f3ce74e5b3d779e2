"""The reporter alone, from ``Reporter.submit`` to a real mesh's accepting the batch: CPU per
observation by thread (issue #22).

    python tests/bench/reporter_run.py [SECONDS] [RATE]

A real ``tunnelwatch mesh`` (a subprocess on core 1, its CPU apart) takes the batches; in this
process, on core 0 and uvloop, a producer submits ``RATE`` TCP-like observations a second (in
steps of 10 ms, as the scheduler finishes them) to a :class:`Reporter` with the agent's
defaults (batch_max 500, flush_interval 1 s). After a 3 s warm-up, each thread's user and system
CPU (``/proc/self/task``), its context switches, and the producer's own cost (building the
observations, timed apart) are read over ``SECONDS``; printed per observation submitted, with
what the mesh took. Run it from a checkout's root with that checkout's code.

``REPORTER_COMMIT_INTERVAL=S``: group commits every S seconds instead of the reporter's 0.1
(what the per-cycle part of the cost comes to at another interval).
``REPORTER_NULL=1``: observations are built, not submitted (what the producer costs alone).
``REPORTER_PROFILE=FILE``: cProfile the window (wall-clock times: a loaded machine shows in
them). ``strace -f`` sees the window between ``stat`` calls on ``/reporter-bench-window-*``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from probes.agent import reporter as reporter_module
from probes.agent.metrics import ReporterStats
from probes.agent.reporter import Reporter
from probes.aio import run_fast
from probes.model import Observation, Reason, Tier, signing
from tests.bench.test_full_agent_bench import thread_cpu, thread_switches
from tests.mesh.helpers import write_mesh_config
from tests.mesh.process import MeshProcess, free_port

NODES = 4000


def threads(names: dict[int, str]) -> dict[str, dict[str, float]]:
    """Per thread (named by ``names``, by thread id; the rest summed as "other"): user, system
    (s), context switches (voluntary, involuntary)."""
    out: dict[str, dict[str, float]] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            user, system = thread_cpu(task)
            voluntary, involuntary = thread_switches(task)
        except OSError:
            continue
        row = out.setdefault(names.get(int(task.name), "other"),
                             {"user": 0.0, "system": 0.0, "cs": 0.0, "ncs": 0.0})
        row["user"] += user
        row["system"] += system
        row["cs"] += voluntary
        row["ncs"] += involuntary
    return out


def observation(i: int, seq: int, now: float) -> Observation:
    return Observation(node=f"n{i % NODES}", check="tcp-443", vantage="bench", seq=seq,
                       wall_time=now, ok=True, reason=Reason.OK,
                       duration_seconds=0.000123 + i * 1e-9,
                       kind="tcp", tier=Tier.L4, phases={"connect": 0.000117 + i * 1e-9})


async def main(seconds: float, rate: float) -> None:
    folder = Path(tempfile.mkdtemp(prefix="reporter-bench-"))
    port = free_port()
    mesh = MeshProcess(write_mesh_config(folder / "mesh", NODES, ["bench"], port=port,
                                         pool_of=100), port, cpu=1)
    mesh.start()
    os.sched_setaffinity(0, {0})
    if os.environ.get("REPORTER_COMMIT_INTERVAL"):
        reporter_module.COMMIT_INTERVAL = float(os.environ["REPORTER_COMMIT_INTERVAL"])
    stats = ReporterStats()
    reporter = Reporter(agent="bench", endpoints=[mesh.base], key_id="bench",
                        key=signing.load_key(folder / "mesh" / "bench.key"),
                        spool_path=folder / "agent" / "spool.sqlite",
                        spool_max_bytes=64 * 1024 * 1024, stats=stats)
    await reporter.start()
    if os.environ.get("REPORTER_NULL"):  # the producer's own cost: observations built, not sent
        reporter.submit = lambda make, urgent=False: make(0) and 0  # type: ignore[method-assign]
    names = {threading.get_native_id(): "loop",  # the spool's thread: its executor's one
             await asyncio.get_running_loop().run_in_executor(
                 reporter._io, threading.get_native_id): "spool"}
    loop = asyncio.get_running_loop()
    step = 0.01
    per_step = rate * step
    i = 0
    submitted = 0
    building = 0.0  # the producer's own time (making observations), not the reporter's

    async def produce(until: float) -> None:
        nonlocal i, submitted, building
        due = loop.time()
        carry = 0.0
        while loop.time() < until:
            carry += per_step
            now = time.time()
            n = int(carry)
            carry -= n
            for _ in range(n):
                k = i
                t0 = time.thread_time()
                reporter.submit(lambda seq, k=k, now=now: observation(k, seq, now))
                building += time.thread_time() - t0
                i += 1
            submitted += n
            due += step
            await asyncio.sleep(max(0.0, due - loop.time()))

    try:
        await produce(loop.time() + 3.0)
        before, mesh0, sent0, sub0 = threads(names), mesh.cpu_seconds(), sum(
            stats.sent_total.values()), submitted
        wall0 = time.monotonic()
        with contextlib.suppress(OSError):  # a mark for strace: the window starts
            os.stat("/reporter-bench-window-start")
        profile = None
        if os.environ.get("REPORTER_PROFILE"):
            import cProfile
            profile = cProfile.Profile()
            profile.enable()
        await produce(loop.time() + seconds)
        if profile is not None:
            profile.disable()
            profile.dump_stats(os.environ["REPORTER_PROFILE"])
        with contextlib.suppress(OSError):
            os.stat("/reporter-bench-window-end")
        after, mesh1, sent1 = threads(names), mesh.cpu_seconds(), sum(stats.sent_total.values())
        wall = time.monotonic() - wall0
        n = submitted - sub0
        rows = {}
        for name, row in after.items():
            b = before.get(name, {"user": 0.0, "system": 0.0, "cs": 0.0, "ncs": 0.0})
            rows[name] = {k: row[k] - b[k] for k in row}
        total_user = sum(r["user"] for r in rows.values())
        total_sys = sum(r["system"] for r in rows.values())
        print(f"reporter path: {n} observations submitted in {wall:.1f} s ({n / wall:.0f}/s), "
              f"{sent1 - sent0} accepted by the mesh, spool depth {stats.spool_depth}; "
              f"load {os.getloadavg()[0]:.2f}")
        for name, r in sorted(rows.items()):
            print(f"  thread {name:16s} user {r['user'] / n * 1e6:6.2f} us/obs  system "
                  f"{r['system'] / n * 1e6:6.2f} us/obs  switches {r['cs'] / n:.3f}+"
                  f"{r['ncs'] / n:.3f}/obs")
        print(f"  all threads: user {total_user / n * 1e6:.2f} + system {total_sys / n * 1e6:.2f}"
              f" = {(total_user + total_sys) / n * 1e6:.2f} us/obs (of it submit incl. building "
              f"the observation: {building / n * 1e6:.2f} us/obs); mesh "
              f"{(mesh1 - mesh0) / n * 1e6:.2f} us/obs apart")
        print(json.dumps({"n": n, "user": total_user, "system": total_sys,
                          "submit": building, "mesh": mesh1 - mesh0}))
    finally:
        await reporter.close(drain_timeout=2)
        mesh.stop()


if __name__ == "__main__":
    run_fast(main(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0,
                  float(sys.argv[2]) if len(sys.argv) > 2 else 2000.0))
