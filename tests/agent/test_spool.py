"""The SQLite spool: sequence numbers and in-flight batches survive reopening; capacity."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.agent.spool import CHUNK_MAX, Batch, Spool
from tests.diskfull import fill, free, small_filesystem

pytestmark = pytest.mark.agent

A, B = "http://a", "http://b"


def _records(first: int, n: int, size: int = 10) -> list[tuple[int, bytes]]:
    return [(seq, b"x" * size) for seq in range(first, first + n)]


def _stored(spool: Spool) -> tuple[int, int]:
    """(observations, bytes of their bodies) the spool's file holds."""
    count, size = spool.db.execute(
        "SELECT COALESCE(SUM(last_seq - first_seq + 1), 0), "
        "COALESCE(SUM(length(body) - (last_seq - first_seq + 1)), 0) FROM chunks").fetchone()
    return int(count), int(size)


def test_inflight_batch_is_resent_unchanged_after_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 10_000)
    spool.append(_records(0, 5))
    batch = spool.next_batch(A, limit=3)
    assert batch is not None and (batch.first_seq, batch.last_seq, batch.batch_seq) == (0, 2, 0)
    spool.close()
    spool = Spool(tmp_path / "s.db", 10_000)  # e.g. after SIGKILL: same batch, same batch_seq
    again = spool.next_batch(A, limit=3)
    assert again == batch
    assert spool.next_seq == 5
    spool.ack(again, [A])
    nxt = spool.next_batch(A, limit=3)
    assert nxt is not None and (nxt.first_seq, nxt.last_seq, nxt.batch_seq) == (3, 4, 1)


def test_prune_waits_for_every_endpoint(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 10_000)
    spool.append(_records(0, 4))
    batch_a = spool.next_batch(A, limit=10)
    assert batch_a is not None
    spool.ack(batch_a, [A, B])
    assert spool.depth([A, B]) == 4  # B has nothing yet
    batch_b = spool.next_batch(B, limit=10)
    assert batch_b is not None and batch_b.bodies == batch_a.bodies
    assert batch_b.batch_seq != batch_a.batch_seq  # batch_seq is per agent, never reused
    spool.ack(batch_b, [A, B])
    assert spool.depth([A, B]) == 0 and spool.bytes == 0


def test_overflow_drops_oldest_and_counts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 100)  # room for 10 records of 10 bytes
    dropped = spool.append(_records(0, 25))
    assert dropped == 15 and spool.dropped == 15 and spool.bytes == 100
    batch = spool.next_batch(A, limit=100)
    assert batch is not None and batch.first_seq == 15 and batch.last_seq == 24
    spool.close()
    assert Spool(tmp_path / "s.db", 100).dropped == 15


def test_accounting_stays_true_through_a_full_disk(tmp_path: Path) -> None:
    """Issue #17 item 5: a COMMIT that fails on a full disk (SQLite has already rolled back, so
    an explicit ROLLBACK raises) must leave the byte and drop counters true; before, the spool
    believed itself full and dropped one observation per commit ever after."""
    with small_filesystem(tmp_path / "disk", 2 * 1024 * 1024) as disk:
        spool = Spool(disk / "s.db", 1_000_000)
        spool.append(_records(0, 5, size=1000))
        batch = spool.next_batch(A, limit=2)
        assert batch is not None
        spool.ack(batch, [A])
        filler = fill(disk)
        failures = 0
        for seq in range(5, 205):  # more than the free space: commits fail, none is counted
            try:
                spool.append(_records(seq, 1, size=5000))
            except sqlite3.Error:
                failures += 1
        assert failures > 0
        for call in (lambda: spool.next_batch(A, limit=10), lambda: spool.ack(batch, [A])):
            with contextlib.suppress(sqlite3.Error):
                call()
        free(filler)
        count, size = _stored(spool)
        assert (spool.bytes, spool.dropped) == (size, 0)
        assert spool.next_seq == 5 + count - 3  # the rows that made it, after the 5 first
        assert spool.append(_records(spool.next_seq, 3, size=1000)) == 0  # nothing dropped
        spool.close()
        reopened = Spool(disk / "s.db", 1_000_000)
        assert (reopened.bytes, reopened.dropped) == (_stored(reopened)[1], 0)
        reopened.close()


def test_the_instance_epoch_is_kept_by_the_spool_and_newer_without_it(tmp_path: Path) -> None:
    """A reopened spool keeps its epoch and in-flight batch; a lost one (a new file) starts a
    newer epoch; a refused batch goes out again in a new epoch above the mesh's (batch_seq
    carries on: a mesh from before epochs still sees it increase)."""
    clock = [1_800_000_000.0]
    spool = Spool(tmp_path / "s.db", 10_000, wall=lambda: clock[0])
    assert spool.epoch == 1_800_000_000_000
    spool.append(_records(0, 5))
    batch = spool.next_batch(A, limit=3)
    assert batch is not None and (batch.epoch, batch.batch_seq) == (spool.epoch, 0)
    spool.close()
    clock[0] += 60
    spool = Spool(tmp_path / "s.db", 10_000, wall=lambda: clock[0])
    assert spool.epoch == 1_800_000_000_000  # a restart is the same instance
    again = spool.next_batch(A, limit=3)
    assert again == batch
    assert spool.new_epoch(1_900_000_000_000) == 1_900_000_000_001  # the mesh's was newer
    spool.requeue(A)
    refused = spool.next_batch(A, limit=3)
    assert refused is not None
    assert (refused.epoch, refused.batch_seq, refused.first_seq) == (1_900_000_000_001, 1, 0)
    spool.close()
    lost = Spool(tmp_path / "lost.db", 10_000, wall=lambda: clock[0])
    assert lost.epoch == 1_800_000_060_000  # a new state directory: the clock's epoch
    lost.close()


# the spool's tables before chunks (one row per observation); ``epoch``: the in-flight batch's
# epoch column, which came after the first of them
_ROW_PER_OBSERVATION_SCHEMA = (
    "CREATE TABLE obs (seq INTEGER PRIMARY KEY, body BLOB NOT NULL);"
    "CREATE TABLE acked (endpoint TEXT PRIMARY KEY, seq INTEGER NOT NULL);"
    "CREATE TABLE inflight (endpoint TEXT PRIMARY KEY, batch_seq INTEGER NOT NULL,"
    " first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL{epoch});"
    "CREATE TABLE meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);")


def test_a_spool_from_before_epochs_resends_its_inflight_batch_in_epoch_0(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(
            _ROW_PER_OBSERVATION_SCHEMA.format(epoch="") +
            "INSERT INTO obs VALUES (0, x'7878'), (1, x'7878');"
            "INSERT INTO inflight VALUES ('http://a', 41, 0, 1);"
            "INSERT INTO meta VALUES ('next_seq', 2), ('next_batch_seq', 42), ('bytes', 4);")
        db.commit()
    spool = Spool(path, 10_000, wall=lambda: 1_800_000_000.0)
    batch = spool.next_batch(A, limit=10)
    assert batch is not None and (batch.epoch, batch.batch_seq) == (0, 41)  # as first sent
    spool.ack(batch, [A])
    spool.append(_records(2, 1))
    after = spool.next_batch(A, limit=10)
    assert after is not None and (after.epoch, after.batch_seq) == (1_800_000_000_000, 42)
    spool.close()


def test_a_commit_is_one_row_and_batches_take_whole_chunks(tmp_path: Path) -> None:
    """A group commit is one row per run of consecutive seqs (CHUNK_MAX at most); a batch takes
    whole chunks while they fit, or the head of one larger than its limit; an acknowledgement in
    the middle of a chunk frees exactly its head."""
    spool = Spool(tmp_path / "s.db", 10_000)
    spool.append(_records(0, 4))
    spool.append(_records(4, 3))
    spool.append([*_records(7, 2), *_records(20, 1)])  # a gap (held in memory, dropped)
    spool.append(_records(21, CHUNK_MAX + 2))
    rows = spool.db.execute("SELECT first_seq, last_seq FROM chunks ORDER BY first_seq")
    assert rows.fetchall() == [(0, 3), (4, 6), (7, 8), (20, 20), (21, 20 + CHUNK_MAX),
                               (21 + CHUNK_MAX, 22 + CHUNK_MAX)]
    batch = spool.next_batch(A, limit=6)  # 4 fit, 4 + 3 do not
    assert batch is not None and (batch.first_seq, batch.last_seq, len(batch.bodies)) == (0, 3, 4)
    spool.ack(batch, [A])
    batch = spool.next_batch(A, limit=100)
    assert batch is not None and (batch.first_seq, batch.last_seq, len(batch.bodies)) == (4, 20, 6)
    spool.ack(batch, [A])
    batch = spool.next_batch(A, limit=10)  # the head of a larger chunk
    assert batch is not None and (batch.first_seq, batch.last_seq, len(batch.bodies)) == (21, 30,
                                                                                          10)
    spool.ack(batch, [A])
    assert spool.depth([A]) == CHUNK_MAX + 2 - 10
    assert _stored(spool) == (CHUNK_MAX + 2 - 10, spool.bytes)
    assert spool.bytes == 10 * (CHUNK_MAX + 2 - 10)
    with pytest.raises(ValueError, match="newline"):
        spool.append([(CHUNK_MAX + 23, b'{"a":\n1}')])


def test_a_spool_from_before_chunks_is_read_and_moved_into_chunks(tmp_path: Path) -> None:
    """One row per observation (the spool before chunks): opened, its rows become chunks in
    one transaction; offsets, the in-flight batch, bytes and depth carry on."""
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(
            _ROW_PER_OBSERVATION_SCHEMA.format(epoch=", epoch INTEGER NOT NULL DEFAULT 0") +
            "INSERT INTO acked VALUES ('http://a', 5), ('http://b', 2);"
            "INSERT INTO inflight VALUES ('http://a', 7, 6, 7, 1700000000000);"
            "INSERT INTO meta VALUES ('next_seq', 10), ('next_batch_seq', 8), ('bytes', 54),"
            " ('epoch', 1700000000000);")
        db.executemany("INSERT INTO obs VALUES (?, ?)",
                       [(seq, f'{{"seq":{seq}}}'.encode()) for seq in (3, 4, 5, 6, 7, 9)])
        db.commit()
    spool = Spool(path, 10_000)
    assert (spool.next_seq, spool.bytes, spool.depth([A, B])) == (10, 54, 6)
    assert spool.db.execute("SELECT name FROM sqlite_master WHERE name = 'obs'").fetchone() is None
    batch = spool.next_batch(A, limit=100)
    assert batch is not None and (batch.batch_seq, batch.epoch) == (7, 1_700_000_000_000)
    assert batch.bodies == [b'{"seq":6}', b'{"seq":7}']
    spool.ack(batch, [A, B])
    batch = spool.next_batch(B, limit=100)
    assert batch is not None and batch.bodies == [f'{{"seq":{s}}}'.encode() for s in (3, 4, 5, 6,
                                                                                       7, 9)]
    spool.ack(batch, [A, B])
    assert spool.depth([A, B]) == 1 and spool.bytes == 9  # A has not had seq 9 yet
    spool.close()


class _Model:
    """The spool as one row per observation (what it was before chunks), and its endpoints."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.kept: dict[int, bytes] = {}  # seq -> body of what the spool holds
        self.acked = {A: -1, B: -1}
        self.inflight: dict[str, Batch] = {}  # endpoint -> its batch not acknowledged
        self.dropped = 0
        self.seq = 0

    def records(self, n: int, gap: int, size: int) -> list[tuple[int, bytes]]:
        """The next ``n`` records (after ``gap`` seqs held in memory and dropped), kept."""
        self.seq += gap
        records = [(s, bytes([97 + s % 26]) * size) for s in range(self.seq, self.seq + n)]
        self.seq += n
        self.kept.update(records)
        over = sum(map(len, self.kept.values())) - self.capacity
        for s in sorted(self.kept):
            if over <= 0:
                break
            over -= len(self.kept.pop(s))
            self.dropped += 1
        return records

    def check_batch(self, endpoint: str, batch: Batch | None, limit: int) -> None:
        """``batch``: the endpoint's in-flight batch again, or its next observations."""
        after = [s for s in sorted(self.kept) if s > self.acked[endpoint]]
        if endpoint in self.inflight:
            assert batch is not None and batch.first_seq == self.inflight[endpoint].first_seq
            assert batch.bodies == [self.kept[s] for s in after if s <= batch.last_seq]
        elif not after:
            assert batch is None
            return
        else:
            assert batch is not None and batch.first_seq == after[0]
            assert 1 <= len(batch.bodies) <= limit
            assert batch.bodies == [self.kept[s] for s in after[:len(batch.bodies)]]
            assert batch.last_seq == after[len(batch.bodies) - 1]
        self.inflight[endpoint] = batch

    def ack(self, endpoint: str) -> Batch:
        batch = self.inflight.pop(endpoint)
        self.acked[endpoint] = max(self.acked[endpoint], batch.last_seq)
        for s in [s for s in self.kept if s <= min(self.acked.values())]:
            del self.kept[s]
        return batch

    def check(self, spool: Spool) -> None:
        low = min(self.acked.values())
        assert spool.depth([A, B]) == sum(1 for s in self.kept if s > low)
        assert spool.bytes == sum(map(len, self.kept.values())) == _stored(spool)[1]
        assert spool.dropped == self.dropped


SPOOL_STEPS = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(1, 40), st.integers(0, 3), st.integers(1, 30)),
    st.tuples(st.just("send"), st.sampled_from([A, B]), st.integers(1, 60), st.booleans()),
    # what the reporter's group commit does: append, acknowledge, take the next batches
    st.tuples(st.just("commit"), st.integers(0, 40), st.integers(0, 3), st.integers(1, 30),
              st.sets(st.sampled_from([A, B])), st.sets(st.sampled_from([A, B])),
              st.integers(1, 60)),
    st.tuples(st.just("reopen"))), max_size=30)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(SPOOL_STEPS)
def test_the_spool_keeps_what_one_row_per_observation_kept(tmp_path_factory: pytest.TempPathFactory,
                                                          steps: list[tuple[Any, ...]]) -> None:
    """Against a model of the spool as one row per observation (what it was before chunks):
    every batch is the next observations of its endpoint in seq order (the same again until
    acknowledged), and depth, bytes and drops (oldest first beyond capacity) are the model's;
    also when a group commit appends, acknowledges and takes batches in one transaction."""
    path = tmp_path_factory.mktemp("spool") / "s.db"
    model = _Model(capacity=600)
    spool = Spool(path, model.capacity)
    for step in steps:
        if step[0] == "append":
            _, n, gap, size = step
            spool.append(model.records(n, gap, size))
        elif step[0] == "send":
            _, endpoint, limit, ack = step
            batch = spool.next_batch(endpoint, limit)
            model.check_batch(endpoint, batch, limit)
            if ack and batch is not None:
                spool.ack(model.ack(endpoint), [A, B])
        elif step[0] == "commit":
            _, n, gap, size, acking, wanting, limit = step
            records = model.records(n, gap, size) if n else []
            acks = [model.ack(e) for e in sorted(acking) if e in model.inflight]
            done = spool.commit(records, acks, sorted(wanting), [A, B], limit)
            for endpoint in sorted(wanting):
                model.check_batch(endpoint, done.batches.get(endpoint), limit)
            assert done.top == spool.next_seq - 1
            low = min(model.acked.values())
            assert done.depth == sum(1 for s in model.kept if s > low)
        else:
            spool.close()
            spool = Spool(path, model.capacity)
        model.check(spool)
    spool.close()
