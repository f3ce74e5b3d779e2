"""The SQLite spool: sequence numbers and in-flight batches survive reopening; capacity."""

from __future__ import annotations

from pathlib import Path

import pytest

from probes.agent.spool import Spool

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
