"""What a Prometheus scrape of the mesh costs its event loop at 15,000 nodes (22 vantages
report on each, as in test_mesh_bench.py): the single ``generate_latest`` the mesh used to
answer ``/metrics`` with, against the sliced writer with per-node lines kept between scrapes
(probes/mesh/exposition.py), alternating in one process on uvloop (as the mesh runs).

Printed for both: the longest loop stall a scrape causes (a ticker coroutine asking for a turn
every millisecond measures how late it gets each one) and CPU per scrape (taken apart, without
the ticker). No p99: a dozen scrapes per side give a dozen stalls, printed as their median and
maximum; the same ticker's longest lag over 30 ms without a scrape is printed beside them (what
the machine's other work adds). Between two scrapes 1 % of the nodes are
decided again with other votes; a cold scrape (every node written) and one after every node
changed are printed too. Twice: weights off, and on (ten more families per node, all six load
signals fresh, written again at every scrape).

    flock /work/.bench.lock .venv/bin/pytest -m slow -s tests/bench/test_mesh_scrape_bench.py
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from probes.aio import run_fast
from probes.mesh.exposition import MeshExposition
from probes.mesh.ingest import IngestStats
from probes.mesh.metrics import MeshCollector, WeightCollector
from probes.mesh.policy import DecisionPolicy
from probes.mesh.server import tune_gc
from probes.mesh.service import MeshService
from probes.mesh.store_sqlite import SQLiteStore
from probes.mesh.weight_policy import WeightPolicy
from probes.mesh.weights import WeightEngine, WeightNode
from probes.model import VerdictState, Votes
from probes.selfmetrics import ConfigReloads, self_registry
from tests.bench.figures import record
from tests.mesh.helpers import fleet, obs

pytestmark = [pytest.mark.slow, pytest.mark.mesh]

NODES = 15_000
ROUNDS = 12  # scrapes per side, alternating
CHANGED_SHARE = 0.01  # nodes decided again between two scrapes
TICK = 0.001  # the ticker's interval: its lateness is the loop's lag
STATES = list(VerdictState)
SIGNALS = ("cpu", "drops", "effective_sessions", "sessions", "packets", "bytes")
VANTAGES = tuple(f"v{i}" for i in range(22))  # as many as test_mesh_bench.py's agents


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def decide_some(svc: MeshService, rnd: random.Random, share: float) -> None:
    """Decisions on ``share`` of the nodes: new votes, maybe a new state and quorum flag."""
    nodes = list(svc.engine.nodes.values())
    for node in rnd.sample(nodes, int(share * len(nodes))):
        node.votes = Votes(*(rnd.randrange(8) for _ in range(5)))
        node.state = rnd.choice(STATES)
        node.quorum_lost = rnd.random() < 0.05


def mesh_lines(body: bytes) -> list[bytes]:
    return [line for line in body.splitlines() if b"tunnelwatch_mesh_" in line]


class Ticker:
    """Asks the loop for a turn every TICK; how late each turn comes is the loop's lag."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(TICK)
            self.lags.append(time.perf_counter() - start - TICK)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def stall_of(scrape: Callable[[], Awaitable[bytes]], ticker: Ticker) -> tuple[float, int]:
    """The longest loop lag the ticker saw while one scrape ran, and the body's size."""
    await asyncio.sleep(0.02)  # the ticker's turns before this scrape
    seen = len(ticker.lags)
    body = await scrape()
    await asyncio.sleep(2 * TICK)  # the turn the ticker was late for when the scrape ended
    return max(ticker.lags[seen:], default=0.0), len(body)


def weigh(svc: MeshService, rnd: random.Random) -> None:
    """The weight engine on, every node published with all six load signals fresh."""
    svc.weights = WeightEngine(WeightPolicy(enabled=True), [
        WeightNode(info.node, info.pool) for info in (n.info for n in svc.engine.nodes.values())])
    svc.last_now = 2.0
    for node in svc.weights.nodes.values():
        node.published = rnd.randrange(101)
        node.seq = rnd.randrange(1000)
        node.load_at = 1.5
        node.ewma = {signal: rnd.random() * 1e6 for signal in SIGNALS}


@pytest.mark.parametrize("weights", [False, True], ids=["weights-off", "weights-on"])
def test_mesh_scrape_stall_and_cpu(tmp_path: Path, weights: bool) -> None:
    async def main() -> None:
        svc = MeshService(SQLiteStore(tmp_path / "m.db"), DecisionPolicy(), fleet(NODES, 100))
        for vantage in VANTAGES:  # each reports on every node, as a mesh's agents do
            svc.engine.observe([obs(f"n{i}", vantage, True, at=1.0) for i in range(NODES)], 1.0)
        rnd = random.Random(22)
        decide_some(svc, rnd, 1.0)
        if weights:
            weigh(svc, rnd)
        collector = MeshCollector(lambda: svc, IngestStats())
        rest = CollectorRegistry()
        self_registry("mesh", ConfigReloads(), rest)
        single = CollectorRegistry()  # what /metrics rendered before: every collector, one go
        single.register(collector)
        single.register(WeightCollector(lambda: svc))
        self_registry("mesh", ConfigReloads(), single)
        sliced = MeshExposition(collector, WeightCollector(lambda: svc), rest)
        tune_gc()  # as the mesh's serve() does before it serves

        async def idle() -> bytes:  # no scrape: the ticker's lag from the machine alone
            await asyncio.sleep(0.03)
            return b""

        async def before() -> bytes:
            return generate_latest(single)

        async def cold() -> bytes:  # a mesh's first scrape: every node's lines written
            return await MeshExposition(collector, WeightCollector(lambda: svc), rest).render()

        sides: dict[str, Callable[[], Awaitable[bytes]]] = {
            "single generate_latest (before)": before, "sliced, 1 % changed (after)":
            sliced.render, "sliced, first scrape (after)": cold, "no scrape (30 ms idle)": idle}
        # the same series (the process's own, its CPU time and collections, move meanwhile)
        assert mesh_lines(await before()) == mesh_lines(await sliced.render())
        stalls: dict[str, list[float]] = {name: [] for name in sides}
        ticker = Ticker()
        ticker.start()
        size = 0
        for _ in range(ROUNDS):
            for name, scrape in sides.items():
                decide_some(svc, rnd, CHANGED_SHARE)
                stall, length = await stall_of(scrape, ticker)
                size = max(size, length)
                stalls[name].append(stall)
        decide_some(svc, rnd, 1.0)
        every_changed, _ = await stall_of(sliced.render, ticker)
        await ticker.stop()
        cpu: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(ROUNDS):
            for name, scrape in sides.items():
                decide_some(svc, rnd, CHANGED_SHARE)
                start = time.process_time()
                await scrape()
                cpu[name].append(time.process_time() - start)
        await svc.close()

        print(f"\nmesh /metrics at {NODES:,} nodes, {len(VANTAGES)} vantages reporting on each, "
              f"weights {'on' if weights else 'off'} "
              f"({size / 1e6:.1f} MB body), {ROUNDS} "
              f"scrapes per side alternating, uvloop; load {load()}")
        for name in sides:
            s, c = stalls[name], cpu[name]
            print(f"  {name:32s} longest loop stall per scrape: median "
                  f"{statistics.median(s) * 1e3:8.1f} ms, max {max(s) * 1e3:8.1f} ms; CPU per "
                  f"scrape median {statistics.median(c) * 1e3:7.1f} ms "
                  f"({min(c) * 1e3:.1f}-{max(c) * 1e3:.1f})")
        print(f"  {'sliced, every node changed':32s} longest loop stall "
              f"{every_changed * 1e3:8.1f} ms")
        old, new = "single generate_latest (before)", "sliced, 1 % changed (after)"
        on = ", weights on" if weights else ""
        record(f"mesh /metrics longest loop stall, {NODES:,} nodes{on}",
               statistics.median(stalls[new]) * 1e3, "ms",
               peer=statistics.median(stalls[old]) * 1e3, peer_name="one generate_latest")
        record(f"mesh /metrics CPU per scrape, {NODES:,} nodes{on}, 1 % changed",
               statistics.median(cpu[new]) * 1e3, "ms",
               peer=statistics.median(cpu[old]) * 1e3, peer_name="one generate_latest")
        assert max(stalls[new]) < statistics.median(stalls[old])

    run_fast(main())
