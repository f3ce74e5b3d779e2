"""Mesh benchmark: HTTP ingest + engine throughput, decision latency, memory per check state.

Run with ``flock /work/.bench.lock pytest -m slow -s tests/bench/test_mesh_bench.py``. A real
``tunnelwatch mesh`` process (pinned to CPU 0 with taskset, SQLite on disk, the product's default
snapshot settings: a forked snapshot every 256 MiB journaled) takes signed batches of 2,000
observations from 20 agents over 10,000 nodes (each with the phase its check's run records,
as a real agent's observations carry theirs: a handshake phase here, as TCP's ``connect``); the
client runs pinned to CPU 1 and writes each body as it sends it, as agents send them to a mesh
that takes columnar batches (``TW_BENCH_MESH_WIRE=json``: the canonical JSON of older agents;
both checked below). Printed,
each with the load average:

* **throughput**: at least 16 rounds (3.2 M observations; two snapshot cycles with JSON bodies,
  and with columnar ones as many more rounds as include one) sent as fast as the mesh takes them
  (4 requests in flight): observations per second of wall clock (the mesh's maximum
  rate on one core here), per CPU-second of the mesh process, and per CPU-second counting the
  forked snapshot children too (issue #22 target: >= 450,000);
* **decision latency at 80 % of that rate**: the same agents paced to 80 % of the measured rate
  (open loop, in a process of its own on CPU 1: building and signing their bodies never delays
  the timed requests' loop), while two more agents flip nodes of their own: each of their
  requests carries the observation that changes a verdict (alternately DOWN and, after the
  dwell, UP), and its round trip, from sending it to the mesh's answer (given once the verdict
  is committed and handed to the publishers), is timed until at least 1,000 have been (target
  p99 <= 20 ms); the paced batches' own round trips beside it;
* the same decisions on an idle mesh;
* memory per (node, vantage, check) state, measured in-process with tracemalloc.

The test asserts correctness (every batch accepted, the expected verdicts), never timing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import os
import pickle
import time
import tracemalloc
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from probes.mesh.decision import DecisionEngine, NodeInfo
from probes.mesh.policy import DecisionPolicy
from probes.mesh.snapshot import dump_engine, load_engine
from probes.model import (
    Observation,
    ObservationBatch,
    Reason,
    decode_batch,
    encode,
    signing,
)
from probes.model.columnar import COLUMNAR_VERSION, decode_received, whole_batch
from tests.bench.beside import Beside
from tests.bench.figures import record
from tests.mesh.helpers import write_mesh_config
from tests.mesh.process import MeshProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.mesh]

NODES = 10_000
AGENTS = [f"v{i:02d}" for i in range(20)]
BATCH = 2_000
# measured rounds after the warm-up round: two snapshots at the default 256 MiB journaled with
# JSON bodies; columnar bodies are ~4x smaller, so the rounds go on until a forked snapshot is
# among them (the figure "counting them" pays for one), at most MAX_ROUNDS
ROUNDS = 16
MAX_ROUNDS = 48
IN_FLIGHT = 4  # concurrent requests: enough to keep the mesh busy, not a 20-deep queue
FAILING_EVERY = 100  # 1 % of the nodes fail everywhere in the measured rounds
LOAD_SHARE = 0.8  # the decision latency is measured at this share of the measured rate
MIN_DECISIONS = 1000
FLIPPERS = ("f1", "f2")  # the agents whose requests change verdicts
FLIP_NODES = 2500  # nodes only they observe, per latency phase, each flipped once
DWELL = 4.0  # decision.min_dwell_seconds (default): an UP waits this long after the DOWN
MAX_PACED_IN_FLIGHT = 32
WIRE = os.environ.get("TW_BENCH_MESH_WIRE", "columnar")  # or "json": what older agents send


def node_name(i: int) -> str:
    return f"n{i}"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def phase_seconds(seq: int) -> float:
    """The handshake phase of observation ``seq``: a real run's phases are monotonic-clock
    differences, every one a different float with all its digits (below the 4 ms duration)."""
    return 0.003 + (seq * 7919 % 1_000_003) * 9.99997e-10


class Sender:
    """An agent's bodies, written directly as an agent sends them (a body per request: the
    client keeps up without pre-encoding millions of observations): columnar, as to a mesh that
    takes it, or (``TW_BENCH_MESH_WIRE=json``) the canonical JSON of older agents."""

    def __init__(self, name: str, key: bytes) -> None:
        self.name = name
        self.key = key
        self.obs_seq = 0
        self.batch_seq = 0
        self.columnar = WIRE == "columnar"

    def body(self, results: Iterable[tuple[str, bool]], at: float) -> tuple[bytes, dict[str, str]]:
        if self.columnar:
            body = self.columnar_body(list(results), round(at, 3))
            return body, signing.signed_headers(self.name, self.name, self.key, body, time.time())
        wall = repr(round(at, 3))
        head = f'"check":"wg","vantage":"{self.name}","seq":'
        ok_tail = f',"wall_time":{wall},"ok":true,"reason":"ok","duration_seconds":0.004,' \
            '"kind":"wireguard.handshake","phases":{"handshake":'
        fail_tail = f',"wall_time":{wall},"ok":false,"reason":"timeout",' \
            '"duration_seconds":0.004,"kind":"wireguard.handshake","phases":{"handshake":'
        parts = []
        seq = self.obs_seq
        for node, ok in results:
            seq += 1
            parts.append(f'{{"node":"{node}",{head}{seq}{ok_tail if ok else fail_tail}'
                         f'{phase_seconds(seq)!r}}}}}')
        self.obs_seq = seq
        self.batch_seq += 1
        body = (f'{{"version":1,"agent":"{self.name}","batch_seq":{self.batch_seq},'
                f'"sent_at":{wall},"observations":[{",".join(parts)}]}}').encode()
        return body, signing.signed_headers(self.name, self.name, self.key, body, time.time())


    def columnar_body(self, results: list[tuple[str, bool]], wall: float) -> bytes:
        """The columnar body (probes.model.columnar) of these results, column by column."""
        n = len(results)
        seq = self.obs_seq
        self.obs_seq += n
        self.batch_seq += 1
        oks = bytes(ok for _, ok in results)  # also the reasons: 0 timeout, 1 ok (the table)
        return msgspec.msgpack.encode((
            COLUMNAR_VERSION, n, self.name, self.batch_seq, 0, wall,
            [node for node, _ in results], ["wg"], ["wireguard.handshake"],
            [Reason.TIMEOUT, Reason.OK], ["handshake"], array("I", range(n)).tobytes(),
            bytes(2 * n), bytes(2 * n), bytes(n),
            array("q", range(seq + 1, seq + n + 1)).tobytes(),
            (array("d", [wall]) * n).tobytes(), oks, oks, (array("d", [0.004]) * n).tobytes(),
            b"\x01" * n, bytes(2 * n),
            array("d", map(phase_seconds, range(seq + 1, seq + n + 1))).tobytes(), b"", b""))


def check_canonical(sender: Sender) -> None:
    """The bodies are what an agent sends: a JSON body is what the schema's encoder writes (the
    mesh's duplicate-key check then takes its fast path, as for a real agent's batch); a
    columnar body says what the JSON one says."""
    probe = Sender(sender.name, sender.key)
    probe.columnar = False
    at = time.time()
    body, _ = probe.body([("n0", True), ("n1", False)], at)
    assert encode(decode_batch(body)) == body
    if sender.columnar:
        probe = Sender(sender.name, sender.key)
        columnar, _ = probe.body([("n0", True), ("n1", False)], at)
        assert whole_batch(columnar) == decode_batch(body)


def heavy_batches(sender: Sender, failing: bool) -> Iterator[list[tuple[str, bool]]]:
    """One round of ``sender``: its observation of every node, BATCH at a time."""
    for lo in range(0, NODES, BATCH):
        yield [(node_name(i), not (failing and i % FAILING_EVERY == 0))
               for i in range(lo, min(lo + BATCH, NODES))]


async def post(session: aiohttp.ClientSession, url: str, sender: Sender,
               results: list[tuple[str, bool]]) -> tuple[float, int]:
    """(round trip, verdicts it caused) of one batch, body written at send time."""
    body, headers = sender.body(results, time.time())
    start = time.perf_counter()
    async with session.post(url, data=body, headers=headers) as resp:
        reply = await resp.json()
        assert resp.status == 200, reply
    return time.perf_counter() - start, int(reply["verdicts"])


async def closed_loop(session: aiohttp.ClientSession, url: str, senders: list[Sender],
                      failing: bool) -> tuple[list[float], int]:
    """One round as fast as the mesh takes it: each agent sends its batches in order, agents
    concurrently, IN_FLIGHT requests at most. (Round trips of deciding requests, verdicts.)"""
    deciding: list[float] = []
    verdicts = 0
    in_flight = asyncio.Semaphore(IN_FLIGHT)

    async def agent(sender: Sender) -> None:
        nonlocal verdicts
        for results in heavy_batches(sender, failing):
            async with in_flight:
                took, v = await post(session, url, sender, results)
            if v:
                deciding.append(took)
                verdicts += v

    await asyncio.gather(*(agent(s) for s in senders))
    return deciding, verdicts


def paced_load(url: str, senders: list[Sender], obs_per_second: float, ready: Any, stop: Any,
               report: Any) -> None:
    """:func:`paced` in a process of its own (:class:`Beside`)."""
    async def run() -> dict[str, Any]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
            ready.set()
            return await paced(session, url, senders, obs_per_second, stop)

    report.put(asyncio.run(run()))


async def paced(session: aiohttp.ClientSession, url: str, senders: list[Sender],
                obs_per_second: float, stop: Any) -> dict[str, Any]:
    """The agents' rounds at ``obs_per_second`` (open loop: a batch is sent when it is due,
    whatever is in flight, up to MAX_PACED_IN_FLIGHT) until ``stop``."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    late = 0
    slots = asyncio.Semaphore(MAX_PACED_IN_FLIGHT)
    # one agent's batches in order: a queue per agent, its batches sent one after another
    queues = {s.name: asyncio.Queue[list[tuple[str, bool]] | None]() for s in senders}

    async def agent(sender: Sender) -> None:
        queue = queues[sender.name]
        while (results := await queue.get()) is not None:
            async with slots:
                took, _ = await post(session, url, sender, results)
            latencies.append(took)

    workers = [asyncio.create_task(agent(s)) for s in senders]
    rounds = [heavy_batches(s, False) for s in senders]
    gap = BATCH / obs_per_second
    start = loop.time()
    k = 0
    while not stop.is_set():
        due = start + k * gap
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        elif loop.time() - due > gap:
            late += 1
        i = k % len(senders)
        try:
            results = next(rounds[i])
        except StopIteration:
            rounds[i] = heavy_batches(senders[i], False)
            results = next(rounds[i])
        queues[senders[i].name].put_nowait(results)
        k += 1
    for queue in queues.values():
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    return {"batches": k, "late": late, "latencies": latencies,
            "seconds": loop.time() - start}


async def flip(session: aiohttp.ClientSession, url: str, flippers: tuple[Sender, Sender],
               nodes: list[str]) -> list[float]:
    """Round trips of requests that change a verdict, until MIN_DECISIONS (or the nodes run
    out). Step j: the first flipper fails node j three times (its check goes down; one of two
    voters: no change) and passes the node that went DOWN longest ago, if that was more than
    the dwell ago (two passes: its check is up again, the vote no longer DOWN: UP); then the
    second flipper fails node j (two of two: DOWN) and passes that same node."""
    first, second = flippers
    deciding: list[float] = []
    went_down: collections.deque[tuple[str, float]] = collections.deque()
    for node in nodes:
        if len(deciding) >= MIN_DECISIONS:
            break
        up = []
        if went_down and time.monotonic() - went_down[0][1] > DWELL + 0.5:
            up = [(went_down.popleft()[0], True)] * 2
        fails = [(node, False)] * 3
        for sender in (first, second):
            took, verdicts = await post(session, url, sender, fails + up)
            if verdicts:
                deciding.append(took)
        went_down.append((node, time.monotonic()))
    return deciding


def wire_floor(senders: list[Sender]) -> float:
    """CPU seconds per observation to verify and decode one round of bodies in this process
    (signature, JSON to structs, duplicate-key check): what any mesh taking these bodies pays
    before deciding anything, the floor beside the mesh's own figure."""
    copies = [Sender(s.name, s.key) for s in senders]
    bodies = [c.body(results, time.time()) for c in copies for results in heavy_batches(c, False)]
    start = time.process_time()
    for body, headers in bodies:
        assert signing.verify(_key_of(copies, headers),
                              headers[signing.HEADER_TIMESTAMP], body,
                              headers[signing.HEADER_SIGNATURE])
        decode_received(body)
    return (time.process_time() - start) / (NODES * len(senders))


def _key_of(senders: list[Sender], headers: dict[str, str]) -> bytes:
    return next(s.key for s in senders if s.name == headers[signing.HEADER_AGENT])


def flip_infos(count: int) -> list[NodeInfo]:
    # each in a pool of its own: the pool guard always lets one node of a pool go DOWN
    return [NodeInfo(f"f{i}", f"fp{i}", pop="pop0", region="eu") for i in range(count)]


@contextlib.contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """This process on ``cpu`` (the mesh has the other), when there are two."""
    if (os.cpu_count() or 1) < 2:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def test_mesh_ingest_throughput_and_latency(tmp_path: Path) -> None:
    port = free_port()
    heavy_nodes = [NodeInfo(node_name(i), f"p{i // 100}", pop="pop0", region="eu")
                   for i in range(NODES)]
    config = write_mesh_config(
        tmp_path, 0, [*AGENTS, *FLIPPERS], port=port,
        infos=heavy_nodes + flip_infos(2 * FLIP_NODES), extra="max_body_bytes: 16777216\n")
    mesh = MeshProcess(config, port, cpu=0 if (os.cpu_count() or 1) > 1 else None)
    senders = [Sender(a, signing.load_key(tmp_path / f"{a}.key")) for a in AGENTS]
    flippers = (Sender("f1", signing.load_key(tmp_path / "f1.key")),
                Sender("f2", signing.load_key(tmp_path / "f2.key")))
    check_canonical(senders[0])
    url = f"{mesh.base}/v1/batches"
    print(f"\nmesh benchmark: mesh on CPU 0, client on CPU 1, {WIRE} batches; load average "
          f"{loadavg()}")
    try:
        mesh.start()

        async def run() -> None:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
                # the flippers' nodes: UP first (a node's first verdict starts no dwell)
                flip_nodes = [f"f{i}" for i in range(2 * FLIP_NODES)]
                for sender in flippers:
                    for lo in range(0, len(flip_nodes), BATCH):
                        await post(session, url, sender,
                                   [(n, True) for n in flip_nodes[lo:lo + BATCH]])
                t = time.perf_counter()
                cpu = mesh.cpu_seconds()
                _, warm_verdicts = await closed_loop(session, url, senders, False)
                warm_s, warm_cpu = time.perf_counter() - t, mesh.cpu_seconds() - cpu
                assert warm_verdicts == NODES  # UNKNOWN -> UP once per node
                n_warm = NODES * len(AGENTS)
                print(f"warm-up (first sight of {n_warm:,} states): {n_warm / warm_s:,.0f} obs/s "
                      f"wall, {n_warm / max(warm_cpu, 1e-9):,.0f} obs/CPU-s")

                rate = await throughput(session, url, senders)
                await latency(session, url, senders, flippers, flip_nodes, rate)

        async def throughput(session: aiohttp.ClientSession, url: str,
                             senders: list[Sender]) -> float:
            load_before = loadavg()
            snaps_before = snapshots()
            t = time.perf_counter()
            cpu = mesh.cpu_seconds()
            child_cpu = mesh.children_cpu_seconds()
            total_verdicts = 0
            rounds = 0
            # a snapshot child running or reaped, seen in /proc (a /metrics scrape per round
            # would cost the mesh ~40 ms of CPU here, ~0.5 s before 26c12b6: docs/mesh.md)
            while rounds < ROUNDS or (rounds < MAX_ROUNDS and not snapshot_running()
                                      and mesh.children_cpu_seconds() == child_cpu):
                _, v = await closed_loop(session, url, senders, True)
                total_verdicts += v
                rounds += 1
            wall = time.perf_counter() - t
            cpu_used = mesh.cpu_seconds() - cpu
            # snapshot children still writing count too: wait until they are reaped
            await asyncio.sleep(1.0)
            deadline = time.monotonic() + 30
            while snapshot_running() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            cpu_tail = mesh.cpu_seconds() - cpu - cpu_used
            child_used = mesh.children_cpu_seconds() - child_cpu
            snaps = snapshots() - snaps_before
            n = NODES * len(AGENTS) * rounds
            assert total_verdicts == NODES // FAILING_EVERY  # the failing 1 % went DOWN
            both = cpu_used + cpu_tail + child_used
            print(f"throughput ({rounds} rounds, {n:,} observations, load average {load_before} "
                  f"-> {loadavg()}):")
            print(f"  {n / wall:,.0f} obs/s wall (the mesh's maximum rate here); mesh process "
                  f"{cpu_used:.2f} CPU-s = {n / cpu_used:,.0f} obs/CPU-s")
            print(f"  {snaps} forked snapshots, children {child_used:.2f} CPU-s "
                  f"({child_used / max(snaps, 1):.2f} each), mesh {cpu_tail:.2f} CPU-s after the "
                  f"last batch: {n / both:,.0f} obs/CPU-s counting them (target 450,000; "
                  f"ratio {n / both / 450_000:.2f}); mesh RSS {mesh.rss_bytes() / 2**20:.0f} MiB")
            floor = wire_floor(senders)
            print(f"  floor beside it, this process on CPU 1: verify + decode "
                  f"{floor * 1e6:.2f} us per observation; the mesh's whole path "
                  f"{both / n * 1e6:.2f} us = {both / n / floor:.1f}x that floor")
            record(f"mesh ingest ({n / both:,.0f} obs/CPU-s, snapshots counted)", both / n * 1e6,
                   "us/obs", peer=floor * 1e6, peer_name="verify + decode floor",
                   target=">= 450,000 obs/CPU-s")
            return n / wall

        async def latency(session: aiohttp.ClientSession, url: str, senders: list[Sender],
                          flippers: tuple[Sender, Sender], flip_nodes: list[str],
                          rate: float) -> None:
            target = LOAD_SHARE * rate
            load_before = loadavg()
            cpu = mesh.cpu_seconds()
            with Beside(paced_load, url, senders, target) as load:
                await load.under_way()
                await asyncio.sleep(2.0)  # the paced load under way
                loaded = await flip(session, url, flippers, flip_nodes[:FLIP_NODES])
            got = await load.result()
            cpu_used = mesh.cpu_seconds() - cpu
            heavy = got["latencies"]
            print(f"decision latency at {LOAD_SHARE:.0%} of that rate ({target:,.0f} obs/s "
                  f"offered, {got['batches'] * BATCH / got['seconds']:,.0f} sent, "
                  f"{got['late']} batches sent late; mesh busy "
                  f"{cpu_used / got['seconds']:.0%} of its core; load average {load_before} -> "
                  f"{loadavg()}):")
            print(f"  {len(loaded)} deciding requests: p50 {pct(loaded, 0.5) * 1e3:.2f} ms, "
                  f"p99 {pct(loaded, 0.99) * 1e3:.2f} ms, max {max(loaded) * 1e3:.1f} ms "
                  f"(target p99 <= 20 ms; ratio {pct(loaded, 0.99) / 0.020:.2f})")
            print(f"  the paced {BATCH}-observation batches ({len(heavy)}): p50 "
                  f"{pct(heavy, 0.5) * 1e3:.1f} ms, p99 {pct(heavy, 0.99) * 1e3:.1f} ms")
            load_before = loadavg()
            idle = await flip(session, url, flippers, flip_nodes[FLIP_NODES:])
            print(f"decision latency on an idle mesh ({len(idle)} deciding requests; load "
                  f"average {load_before} -> {loadavg()}): p50 {pct(idle, 0.5) * 1e3:.2f} ms, "
                  f"p99 {pct(idle, 0.99) * 1e3:.2f} ms")
            record(f"mesh decision p99 at {LOAD_SHARE:.0%} of max rate", pct(loaded, 0.99) * 1e3,
                   "ms", peer=pct(idle, 0.99) * 1e3, peer_name="idle mesh", target="<= 20 ms")
            assert len(loaded) >= MIN_DECISIONS and len(idle) >= MIN_DECISIONS

        def metric(name: str) -> float:
            for line in mesh.get_text("/metrics").splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
            return 0.0

        def snapshots() -> int:
            return int(metric("tunnelwatch_mesh_snapshots_background_total"))

        def snapshot_running() -> bool:
            """A forked snapshot child is still alive (a child of any of the mesh's threads)."""
            assert mesh.proc is not None
            tasks = Path(f"/proc/{mesh.proc.pid}/task")
            return any((task / "children").read_text().strip() for task in tasks.iterdir())

        with pinned(1):
            asyncio.run(run())
    finally:
        mesh.stop()


def test_mesh_memory_per_check_state() -> None:
    nodes = [NodeInfo(node_name(i), f"p{i // 100}") for i in range(NODES)]
    batches = []
    seq = 0
    for vantage in AGENTS:
        obs = []
        for i in range(NODES):
            seq += 1
            obs.append(
                Observation(
                    node=node_name(i),
                    check="wg",
                    vantage=vantage,
                    seq=seq,
                    wall_time=1.0,
                    ok=True,
                    reason=Reason.OK,
                    duration_seconds=0.01,
                    kind="wireguard.handshake",
                )
            )
        batches.append(
            decode_batch(
                encode(
                    ObservationBatch(
                        version=1, agent=vantage, batch_seq=1, sent_at=1.0, observations=obs
                    )
                )
            )
        )
    gc.collect()
    tracemalloc.start()
    engine = DecisionEngine(DecisionPolicy(), nodes)
    base = tracemalloc.get_traced_memory()[0]
    for b in batches:
        engine.observe(b.observations, 1.0)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    states = engine.check_count()
    assert states == NODES * len(AGENTS)
    print(
        f"\nmemory: {used / 2**20:.1f} MiB for {states:,} (node, vantage, check) states = "
        f"{used / states:.0f} bytes/state including the per-(node, vantage) and per-node state "
        f"(target <= 1024; ratio {used / states / 1024:.2f})"
    )
    start = time.perf_counter()
    blob = dump_engine(engine)
    took = time.perf_counter() - start
    start = time.perf_counter()
    load_engine(blob)
    load_took = time.perf_counter() - start
    start = time.perf_counter()
    pickled = pickle.dumps(engine, protocol=pickle.HIGHEST_PROTOCOL)
    pickle_took = time.perf_counter() - start
    print(
        f"snapshot of that engine: {len(blob) / 2**20:.0f} MiB written in {took:.2f} s, read in "
        f"{load_took:.2f} s (pickle, for comparison: {len(pickled) / 2**20:.0f} MiB in "
        f"{pickle_took:.2f} s; ratio {pickle_took / took:.1f}x)"
    )
    later = [  # the same picture one round later: new sequence numbers, nothing changes
        [msgspec.structs.replace(o, seq=o.seq + 10**7, wall_time=2.0) for o in b.observations]
        for b in batches
    ]
    start = time.perf_counter()
    for observations in later:
        engine.observe(observations, 2.0)
    took = time.perf_counter() - start
    print(
        f"engine alone, steady (no change): {states / took:,.0f} obs/s "
        f"(observations decoded beforehand)"
    )
