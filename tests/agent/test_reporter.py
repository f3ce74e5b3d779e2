"""Reporter: mesh down then back -> every observation arrives exactly once (seq numbers)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from probes.agent.metrics import ReporterStats
from probes.agent.reporter import Reporter
from probes.model import Observation, Reason, Tier
from probes.model.columnar import whole_batch
from tests.diskfull import fill, free, small_filesystem

from .helpers import Receiver, free_port, until

pytestmark = pytest.mark.agent

KEY = b"k" * 32


def _reporter(tmp_path: Path, port: int, stats: ReporterStats) -> Reporter:
    return Reporter(agent="vantage-1", endpoints=[f"http://127.0.0.1:{port}"], key_id="k1",
                    key=KEY, spool_path=tmp_path / "spool.sqlite", spool_max_bytes=10_000_000,
                    batch_max=50, flush_interval=0.1, stats=stats)


def _obs(seq: int) -> Observation:
    return Observation(node="n1", check="tcp:443", vantage="vantage-1", seq=seq,
                       wall_time=1.0, ok=True, reason=Reason.OK, duration_seconds=0.001)


async def _outage_then_recovery(tmp_path: Path, outage: float) -> None:
    port = free_port()
    stats = ReporterStats()
    reporter = _reporter(tmp_path, port, stats)
    receiver = Receiver(KEY, "vantage-1", lose_answers=2)
    await reporter.start()
    submitted: list[int] = []

    async def produce(seconds: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            submitted.append(reporter.submit(_obs))
            await asyncio.sleep(0.01)

    try:
        await produce(outage)  # the mesh is down all this time
        assert not receiver.seqs
        await receiver.start(port)
        await produce(1.0)  # and keeps coming after it is back
        await until(lambda: len(receiver.seqs) >= len(submitted), 60 + outage,
                    "every observation to arrive")
        await asyncio.sleep(0.3)  # a duplicate, if any, would arrive now
    finally:
        await reporter.close(drain_timeout=1)
        await receiver.stop()
    assert receiver.bad_signatures == 0
    assert sorted(receiver.seqs) == submitted == list(range(len(submitted)))
    assert len(receiver.seqs) == len(set(receiver.seqs))  # exactly once
    assert receiver.replays >= 2  # the two lost answers were retried and recognised ...
    assert stats.batches_total.get(("0", "duplicate"), 0) >= 2  # ... as committed earlier
    assert stats.batches_total.get(("0", "refused"), 0) == 0
    assert stats.batches_total.get(("0", "error"), 0) > 0  # the outage was seen
    assert stats.spool_depth == 0


async def test_mesh_outage_then_back_delivers_exactly_once(tmp_path: Path) -> None:
    await _outage_then_recovery(tmp_path, outage=3.0)


@pytest.mark.slow
async def test_mesh_outage_60s_then_back_delivers_exactly_once(tmp_path: Path) -> None:
    await _outage_then_recovery(tmp_path, outage=60.0)


async def test_restart_resumes_spool_and_sequence(tmp_path: Path) -> None:
    port = free_port()
    first = _reporter(tmp_path, port, ReporterStats())
    await first.start()
    seqs = [first.submit(_obs) for _ in range(120)]
    await first.close(drain_timeout=0)  # mesh down: everything stays in the spool
    receiver = Receiver(KEY, "vantage-1")
    await receiver.start(port)
    second = _reporter(tmp_path, port, ReporterStats())
    await second.start()
    try:
        seqs += [second.submit(_obs) for _ in range(30)]
        await until(lambda: len(receiver.seqs) >= 150, 30, "spooled observations")
    finally:
        await second.close(drain_timeout=1)
        await receiver.stop()
    assert seqs == list(range(150))  # the sequence continued across the restart
    assert sorted(receiver.seqs) == seqs and len(set(receiver.seqs)) == 150


async def test_a_full_disk_loses_nothing_once_space_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue #17 item 5: the spool's disk fills up while the agent reports; commits and batch
    bookkeeping fail for a while. Once space is back every observation arrives exactly once
    and the spool's accounting is true (before, it believed itself full and dropped one
    observation per commit)."""
    port = free_port()
    receiver = Receiver(KEY, "vantage-1")
    await receiver.start(port)
    with small_filesystem(tmp_path / "disk", 1024 * 1024) as disk:
        stats = ReporterStats()
        reporter = _reporter(disk, port, stats)
        await reporter.start()
        submitted: list[int] = []

        async def produce(seconds: float) -> None:
            loop = asyncio.get_running_loop()
            end = loop.time() + seconds
            while loop.time() < end:
                submitted.append(reporter.submit(_obs))
                await asyncio.sleep(0.005)

        try:
            await produce(0.5)
            filler = fill(disk)
            await produce(1.5)  # commits fail: kept in memory, retried
            free(filler)
            await produce(0.5)
            await until(lambda: len(receiver.seqs) >= len(submitted), 30,
                        "every observation to arrive")
            await until(lambda: stats.spool_depth == 0, 60, "the spool to drain")
        finally:
            await reporter.close(drain_timeout=1)
            await receiver.stop()
    assert sorted(receiver.seqs) == submitted == list(range(len(submitted)))
    assert stats.dropped_total == 0 and stats.spool_bytes == 0
    # ~15 failed commits in 1.5 s: one log line for them (rate-limited), not one each
    failed = [r for r in caplog.records if "spool commit failed" in r.getMessage()]
    assert 1 <= len(failed) <= 2, [r.getMessage() for r in failed]


async def test_an_urgent_observation_does_not_wait_for_the_group_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure (what a verdict may wait on) is committed and sent at once; the others wait for
    the group commit, here stretched to a minute so that only the urgent path can deliver."""
    monkeypatch.setattr("probes.agent.reporter.COMMIT_INTERVAL", 60.0)
    port = free_port()
    reporter = _reporter(tmp_path, port, ReporterStats())
    receiver = Receiver(KEY, "vantage-1")
    await receiver.start(port)
    await reporter.start()
    try:
        await asyncio.sleep(0.2)  # the writer is now waiting out its (stretched) interval
        plain = reporter.submit(_obs)
        await asyncio.sleep(0.5)
        assert receiver.seqs == []  # the group commit has not come
        urgent = reporter.submit(_obs, urgent=True)
        await until(lambda: len(receiver.seqs) >= 2, 60, "the urgent commit")
        assert sorted(receiver.seqs) == [plain, urgent]  # what waited went along with it
    finally:
        await reporter.close(drain_timeout=1)
        await receiver.stop()


async def _deliver(tmp_path: Path, receiver: Receiver, count: int) -> ReporterStats:
    """``count`` observations through a reporter to ``receiver``, one batch at a time (each
    waits for the previous one to be answered), every one delivered."""
    port = free_port()
    stats = ReporterStats()
    reporter = _reporter(tmp_path, port, stats)
    await receiver.start(port)
    await reporter.start()
    try:
        for i in range(count):
            reporter.submit(_obs)
            await reporter.commit()
            await until(lambda i=i: len(receiver.seqs) > i, 30, f"observation {i}")
    finally:
        await reporter.close(drain_timeout=1)
        await receiver.stop()
    assert receiver.seqs == list(range(count))  # in order, exactly once
    return stats


async def test_batches_go_columnar_once_the_mesh_lists_it(tmp_path: Path) -> None:
    receiver = Receiver(KEY, "vantage-1", columnar="takes")
    await _deliver(tmp_path, receiver, 3)
    # the first batch to a mesh not heard from yet is JSON, which every mesh takes
    assert receiver.formats == ["json", "columnar", "columnar"]


async def test_a_mesh_that_does_not_list_columnar_gets_json(tmp_path: Path) -> None:
    receiver = Receiver(KEY, "vantage-1")
    await _deliver(tmp_path, receiver, 3)
    assert receiver.formats == ["json"] * 3


async def test_a_refused_columnar_batch_goes_again_as_json(tmp_path: Path) -> None:
    receiver = Receiver(KEY, "vantage-1", columnar="refuses")
    stats = await _deliver(tmp_path, receiver, 3)
    assert receiver.formats == ["json", "columnar", "json", "columnar", "json"]
    assert stats.batches_total.get(("0", "rejected"), 0) == 0  # none dropped


class _Recording(Receiver):
    """A receiver that also keeps every observation it took, whole."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.observations: list[Observation] = []

    async def handle(self, request: web.Request) -> web.Response:
        response = await super().handle(request)
        if response.status == 200:
            self.observations.extend(whole_batch(await request.read()).observations)
        return response


async def test_a_group_commit_is_one_spool_transaction(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Appending what was submitted, acknowledging the batch the mesh took and recording the
    next batch in flight is one SQLite transaction (one fsync) per group commit (it was three),
    and the mesh takes, columnar and from memory, exactly the observations submitted. The spool
    depth gauge drops as the mesh takes a batch, not at the next commit."""
    monkeypatch.setattr("probes.agent.reporter.COMMIT_INTERVAL", 60.0)  # commits: the test's
    port = free_port()
    stats = ReporterStats()
    reporter = _reporter(tmp_path, port, stats)
    receiver = _Recording(KEY, "vantage-1", columnar="takes")
    await receiver.start(port)
    await reporter.start()
    assert reporter._spool is not None
    commits: list[str] = []
    reporter._spool.db.set_trace_callback(
        lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
    submitted: list[Observation] = []

    def observation(seq: int) -> Observation:
        made = Observation(node=f"n{seq % 3}", check="tcp:443", vantage="vantage-1", seq=seq,
                           wall_time=1_764_000_000.125 + seq / 7, ok=seq % 5 != 0,
                           reason=Reason.OK if seq % 5 else Reason.REFUSED,
                           duration_seconds=seq / 3000, kind="tcp", tier=Tier.L4,
                           phases={"connect": seq / 3001}, detail="" if seq % 5 else "refused")
        submitted.append(made)
        return made

    try:
        cycles = 6
        for cycle in range(cycles):
            for _ in range(7):
                reporter.submit(observation)
            if cycle == 1:  # the first batch went as JSON, the rest columnar: count from here
                commits.clear()
            await reporter.commit()
            await until(lambda c=cycle: stats.sent_total.get("0", 0) == 7 * (c + 1), 30,
                        f"cycle {cycle}'s batch accepted")
            # accepted: no longer counted as waiting, though its acknowledgement is not
            # committed until the next group commit
            assert stats.spool_depth == 0
        assert len(commits) == cycles - 1
    finally:
        await reporter.close(drain_timeout=1)
        await receiver.stop()
    assert receiver.formats == ["json"] + ["columnar"] * (cycles - 1)
    assert receiver.observations == submitted


async def _kill(reporter: Reporter) -> None:
    """Stop ``reporter`` as a SIGKILL would: nothing more reaches its spool (no last commit)."""
    tasks = [*reporter._tasks, *reporter._senders.values()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert reporter._session is not None and reporter._spool is not None
    await reporter._session.close()
    await asyncio.get_running_loop().run_in_executor(reporter._io, reporter._spool.close)
    reporter._io.shutdown(wait=True)


async def test_a_batch_taken_but_not_yet_acknowledged_on_disk_is_resent_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The acknowledgement of a batch the mesh took waits for the next group commit. A SIGKILL
    before it: the restarted agent resends that batch under its batch_seq, the mesh answers 409
    replay, it is counted a duplicate, and the mesh has every observation once."""
    monkeypatch.setattr("probes.agent.reporter.COMMIT_INTERVAL", 60.0)  # commits: the test's
    port = free_port()
    receiver = Receiver(KEY, "vantage-1")
    await receiver.start(port)
    first = _reporter(tmp_path, port, ReporterStats())
    await first.start()
    try:
        for _ in range(5):
            first.submit(_obs)
        await first.commit()
        await until(lambda: first.stats.sent_total.get("0", 0) == 5, 30, "the batch taken")
        await _kill(first)
        assert receiver.seqs == [0, 1, 2, 3, 4] and receiver.replays == 0
        stats = ReporterStats()
        second = _reporter(tmp_path, port, stats)
        await second.start()
        try:
            await until(lambda: receiver.replays == 1, 30, "the batch sent again")
            seqs = [second.submit(_obs) for _ in range(3)]
            await second.commit()
            await until(lambda: len(receiver.seqs) == 8, 30, "the new observations")
        finally:
            await second.close(drain_timeout=1)
    finally:
        await receiver.stop()
    assert seqs == [5, 6, 7]
    assert receiver.seqs == list(range(8))  # once each, in order
    assert stats.batches_total.get(("0", "duplicate"), 0) == 1
    assert stats.spool_depth == 0
