"""The SQLite spool: sequence numbers and in-flight batches survive reopening; capacity."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from probes.agent.spool import Spool
from tests.diskfull import fill, free, small_filesystem

pytestmark = pytest.mark.agent

A, B = "http://a", "http://b"


def _records(first: int, n: int, size: int = 10) -> list[tuple[int, bytes]]:
    return [(seq, b"x" * size) for seq in range(first, first + n)]


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
        rows = spool.db.execute("SELECT COUNT(*), COALESCE(SUM(length(body)), 0) FROM obs")
        count, size = rows.fetchone()
        assert (spool.bytes, spool.dropped) == (size, 0)
        assert spool.next_seq == 5 + count - 3  # the rows that made it, after the 5 first
        assert spool.append(_records(spool.next_seq, 3, size=1000)) == 0  # nothing dropped
        spool.close()
        reopened = Spool(disk / "s.db", 1_000_000)
        again = reopened.db.execute("SELECT COALESCE(SUM(length(body)), 0) FROM obs").fetchone()
        assert (reopened.bytes, reopened.dropped) == (again[0], 0)
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


def test_a_spool_from_before_epochs_resends_its_inflight_batch_in_epoch_0(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(
            "CREATE TABLE obs (seq INTEGER PRIMARY KEY, body BLOB NOT NULL);"
            "CREATE TABLE acked (endpoint TEXT PRIMARY KEY, seq INTEGER NOT NULL);"
            "CREATE TABLE inflight (endpoint TEXT PRIMARY KEY, batch_seq INTEGER NOT NULL,"
            " first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL);"
            "CREATE TABLE meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);"
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
