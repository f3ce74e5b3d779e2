"""The whole agent (``probes.agent.runtime.Agent`` on uvloop, as ``tunnelwatch agent`` runs it)
for the full-agent benchmark, with a measurement window the benchmark can time from outside.

    python tests/bench/agent_run.py CONFIG LISTEN WARMUP SECONDS [PROFILE_OUT]

After ``WARMUP`` seconds it prints ``window-start``, after ``SECONDS`` more ``window-end`` and
one JSON line of what the agent itself counted in the window (probes started and refused, every
start lag sample, observations accepted by the mesh, spool depth); then it waits for a line on
stdin before it stops, so the benchmark reads every process's CPU at the window's edges without
the agent's start-up or shutdown in it (a ``count`` line before it prints the probes started
so far, for tools that attach to the agent for windows of their own:
tests/bench/agent_kernel_trace.py). ``PROFILE_OUT``: cProfile the window into that file
(a profiled run is slower: its CPU figures are not the benchmark's).
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import sys
from pathlib import Path

from probes.agent.runtime import Agent
from probes.aio import run_fast


async def main(config: Path, listen: str, warmup: float, seconds: float,
               profile_out: str | None) -> None:
    agent = Agent(config, listen=listen)
    stats = agent.scheduler.stats
    stats.keep_lag_samples = 10**7
    await agent.start()
    loop = asyncio.get_running_loop()
    await asyncio.sleep(warmup)
    started, overloaded = stats.started_total, stats.overloaded_total
    sent, first_lag = sum(agent.reporter_stats.sent_total.values()), len(stats.lag_samples)
    profile = cProfile.Profile() if profile_out else None
    print("window-start", flush=True)
    if profile is not None:
        profile.enable()
    await asyncio.sleep(seconds)
    if profile is not None:
        profile.disable()
        profile.dump_stats(profile_out)
    print("window-end", flush=True)
    print(json.dumps({
        "started": stats.started_total - started,
        "overloaded": stats.overloaded_total - overloaded,
        "lags": stats.lag_samples[first_lag:],
        "sent": sum(agent.reporter_stats.sent_total.values()) - sent,
        "spool_depth": agent.reporter_stats.spool_depth,
        "checks": len(agent.checks),
        "failures": sum(sum(s.failures.values()) for s in agent.probe_stats.series.values()),
    }), flush=True)
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "count":
        print(json.dumps({"started": stats.started_total}), flush=True)
    await agent.stop(drain_timeout=0)


if __name__ == "__main__":
    run_fast(main(Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4]),
                  sys.argv[5] if len(sys.argv) > 5 else None))
