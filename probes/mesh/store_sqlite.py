"""The embedded store: one SQLite file in WAL mode.

Durability: every :meth:`SQLiteStore.commit` is one transaction. With ``synchronous=NORMAL`` (the
default) a committed transaction survives the process being killed (SIGKILL included: the WAL is
in the OS page cache); only a power cut can lose the last few. ``durability="full"`` fsyncs every
commit and survives that too, at a cost in throughput.

Checkpoints (copying the WAL into the database, with an fsync) run on a thread of their own with
a connection of their own (PASSIVE: they never block a commit), not inside a commit: done by
SQLite's autocheckpoint, the commit that crossed the threshold stalled for the whole copy (one
took 114 ms) and every request queued behind it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from probes.mesh.store import (
    AdminAction,
    AdminRecord,
    AgentPosition,
    EntryKind,
    JournalEntry,
    MeshStore,
    Recovery,
    StoredVerdict,
    StoreError,
)
from probes.model import Verdict, VerdictState, decode_verdict, encode

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, now REAL NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY, node TEXT NOT NULL, seq INTEGER NOT NULL, state TEXT NOT NULL,
    decided_at REAL NOT NULL, body BLOB NOT NULL, UNIQUE (node, seq));
CREATE TABLE IF NOT EXISTS nodes (
    node TEXT PRIMARY KEY, seq INTEGER NOT NULL, state TEXT NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS admin (
    node TEXT PRIMARY KEY, state TEXT NOT NULL, actor TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS agents (agent TEXT PRIMARY KEY, batch_seq INTEGER NOT NULL,
                                   epoch INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS publishers (name TEXT PRIMARY KEY, position INTEGER NOT NULL);
"""
SNAPSHOT_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshot (
    one INTEGER PRIMARY KEY CHECK (one = 1), journal_id INTEGER NOT NULL, blob BLOB NOT NULL);
"""
SCHEMA_VERSION = "2"


# pages of a database created by this build: a journal entry is a whole batch (~330 KB for 2,000
# observations), stored in overflow pages each written to the WAL, then checkpointed and pruned
# page by page. Measured per observation for commit + checkpoint + prune: 0.80 us at 4 KiB pages,
# 0.47 us at 16 KiB, 0.35 us at 64 KiB; but a small commit writes whole pages to the WAL (16 KB
# at 4 KiB pages, 39 KB at 16 KiB, 138 KB at 64 KiB), and a mesh with few agents commits small
# batches. (A database keeps the page size it was created with.)
PAGE_SIZE = 16384
PRUNE_STEP_BYTES = 2 * 1024 * 1024  # journal payload dropped per prune step, at most


def _connect(path: str, durability: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # before WAL: a new file only, else ignored
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
    db.execute("PRAGMA busy_timeout=10000")
    return db


# what a failed statement can raise besides sqlite3.Error: a value the driver cannot bind
# (an integer beyond 64 bits: OverflowError) must fail the call like any store error
_STORE_ERRORS = (sqlite3.Error, OverflowError, ValueError, TypeError)


class _Checkpointer:
    """Checkpoints the WAL from its own thread once it holds more than ``wal_bytes``."""

    def __init__(self, path: str, durability: str, wal_bytes: int = 16 * 1024 * 1024,
                 interval: float = 0.5) -> None:
        self.path = path
        self.durability = durability
        self.wal_bytes = wal_bytes
        self.interval = interval
        # held while checkpointing: a fork waits for it, so the child never inherits a SQLite
        # lock held by this thread (its first SQLite call would hang)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mesh-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        db: sqlite3.Connection | None = None
        while not self._stop.wait(self.interval):
            try:
                if os.path.getsize(self.path + "-wal") < self.wal_bytes:
                    continue
                with self.lock:
                    db = db or _connect(self.path, self.durability)
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except (OSError, sqlite3.Error):
                continue  # no WAL yet, or a full disk: the next round tries again
        if db is not None:
            db.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _add_agent_epochs(db: sqlite3.Connection) -> None:
    """A store from before agent epochs: its agents' positions are in epoch 0."""
    columns = {str(row[1]) for row in db.execute("PRAGMA table_info(agents)")}
    if "epoch" not in columns:
        db.execute("ALTER TABLE agents ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0")


def _write_snapshot(db: sqlite3.Connection, journal_id: int, blob: bytes) -> None:
    # never replace a newer snapshot with an older one: a snapshot child orphaned by a crash may
    # finish after the restarted mesh has snapshotted and pruned past it
    db.execute(
        "INSERT INTO snapshot (one, journal_id, blob) VALUES (1, ?, ?) ON CONFLICT (one)"
        " DO UPDATE SET journal_id=excluded.journal_id, blob=excluded.blob"
        " WHERE excluded.journal_id >= snapshot.journal_id",
        (journal_id, blob),
    )


class SQLiteStore(MeshStore):
    supports_detached_snapshot = True

    def __init__(self, path: str | Path, durability: Literal["normal", "full"] = "normal") -> None:
        self.path = str(path)
        # snapshots live in their own file: a forked child writes one without ever holding the
        # main database's write lock, so ingest does not stall behind a 50 MB blob
        self.snapshot_path = self.path + ".snapshot"
        self.durability = durability
        # the mesh is single-threaded (asyncio); the lock only guards stray readers in tests
        self._lock = threading.Lock()
        try:
            self._db = self._open_main()
            self._db.executescript(SCHEMA)
            _add_agent_epochs(self._db)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise StoreError(f"{self.path}: schema {row[0]}, this build reads {SCHEMA_VERSION}")
            self._snap = _connect(self.snapshot_path, durability)
            self._snap.executescript(SNAPSHOT_SCHEMA)
            # journal ids are given here, never by SQLite: once the journal is pruned empty,
            # SQLite would hand out 1 again, below the snapshot's id, and a restart would skip
            # those entries as "covered" (the engine and the store apart)
            top = self._db.execute("SELECT max(id) FROM journal").fetchone()[0]
            covered = self._snap.execute("SELECT journal_id FROM snapshot").fetchone()
            self._next_journal_id = max(int(top or 0), int(covered[0]) if covered else 0) + 1
            self.epoch = self._new_epoch()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        self._checkpointer = _Checkpointer(self.path, durability)

    def _new_epoch(self) -> int:
        """This start's epoch: the wall clock in ms, never at or below the last one. One store
        file is written by one mesh at a time, so its history may have restarted (a reset or a
        restored file) only across a start: every start begins a new epoch. The verdict log
        keeps each verdict's own epoch, and a restored file's starts above everything the
        receivers saw from it."""
        row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        epoch = max(int(row[0]) + 1 if row else 1, int(time.time() * 1000))
        # on a full disk the start goes on (inputs are refused until it can commit); the next
        # start's clock is later anyway
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?)",
                             (str(epoch),))
        return epoch

    def close(self) -> None:
        self._checkpointer.stop()
        with self._lock:
            self._db.close()
            self._snap.close()

    def quiet(self) -> contextlib.AbstractContextManager[None]:
        return self._checkpoint_held()

    @contextlib.contextmanager
    def _checkpoint_held(self) -> Iterator[None]:
        with self._checkpointer.lock:
            yield

    # ---- writes ---------------------------------------------------------------------------

    def commit(
        self,
        entry: JournalEntry,
        verdicts: Sequence[Verdict],
        agent: AgentPosition | None = None,
        admin: AdminAction | None = None,
        at: float = 0.0,
    ) -> int:
        journal_id = self._next_journal_id
        with self._transaction("commit") as db:
            db.execute(
                "INSERT INTO journal (id, kind, now, payload) VALUES (?, ?, ?, ?)",
                (journal_id, entry.kind.value, entry.now, entry.payload),
            )
            if verdicts:
                bodies = [encode(v) for v in verdicts]
                db.executemany(
                    "INSERT INTO verdicts (node, seq, state, decided_at, body)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [
                        (v.node, v.seq, v.state.value, v.decided_at, b)
                        for v, b in zip(verdicts, bodies, strict=True)
                    ],
                )
                db.executemany(
                    "INSERT INTO nodes (node, seq, state, body) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (node) DO UPDATE SET"
                    " seq=excluded.seq, state=excluded.state, body=excluded.body",
                    [
                        (v.node, v.seq, v.state.value, b)
                        for v, b in zip(verdicts, bodies, strict=True)
                    ],
                )
            if agent is not None:
                db.execute(
                    "INSERT INTO agents (agent, batch_seq, epoch) VALUES (?, ?, ?)"
                    " ON CONFLICT (agent) DO UPDATE SET batch_seq=excluded.batch_seq,"
                    " epoch=excluded.epoch",
                    (agent.agent, agent.batch_seq, agent.epoch),
                )
            if admin is not None:
                if admin.state is None:
                    db.execute("DELETE FROM admin WHERE node=?", (admin.node,))
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO admin (node, state, actor, at)"
                        " VALUES (?, ?, ?, ?)",
                        (admin.node, admin.state.value, admin.actor, at),
                    )
        self._next_journal_id = journal_id + 1
        return journal_id

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction. On any failure — in a statement, in COMMIT (a full disk), or
        a value the driver refuses — it is rolled back before the error leaves, so the next
        call starts clean (a transaction left open once answered every later request with
        "cannot start a transaction within a transaction")."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                self._rollback()
                if isinstance(exc, _STORE_ERRORS):
                    raise StoreError(f"{self.path}: {what} failed: {exc}") from exc
                raise

    def _rollback(self) -> None:
        """Roll back whatever is open. SQLite may already have rolled back on its own (a failed
        COMMIT on a full disk does), then ROLLBACK itself fails; if the connection is still in
        a transaction after all, it is replaced (closing it discards the transaction)."""
        db = self._db
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.close()
            self._db = self._open_main()

    def _open_main(self) -> sqlite3.Connection:
        db = _connect(self.path, self.durability)
        # no checkpoint inside a commit: the checkpointer thread does them (see the module);
        # past 256 MiB of WAL (it fell behind, or is stuck) commits checkpoint again themselves
        page = int(db.execute("PRAGMA page_size").fetchone()[0])
        db.execute(f"PRAGMA wal_autocheckpoint={256 * 1024 * 1024 // page}")
        return db

    def probe_write(self) -> None:
        # a page's worth, rewritten in place: it needs WAL room as a small commit does
        with self._transaction("probe") as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', ?)",
                       ("x" * 2048,))

    def save_snapshot(self, journal_id: int, blob: bytes) -> None:
        with self._lock:
            try:
                _write_snapshot(self._snap, journal_id, blob)
            except _STORE_ERRORS as exc:
                raise StoreError(f"{self.snapshot_path}: snapshot failed: {exc}") from exc

    def write_snapshot_detached(self, journal_id: int, blob: bytes) -> None:
        db = _connect(self.snapshot_path, self.durability)
        try:
            _write_snapshot(db, journal_id, blob)
        finally:
            db.close()

    def prune_journal(self, upto: int, limit: int = 1000) -> int:
        """At most ``limit`` entries and :data:`PRUNE_STEP_BYTES` of payload (at least one
        entry): a step runs after a commit, before its batch is answered, and 32 entries of
        2,000-observation batches were 10 MB of pages to free in one step."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT id, length(payload) FROM journal WHERE id <= ? ORDER BY id LIMIT ?",
                    (upto, limit)).fetchall()
                if not rows:
                    return 0
                cutoff, spent = rows[0][0], 0
                for journal_id, size in rows:
                    spent += size
                    if spent > PRUNE_STEP_BYTES and journal_id != rows[0][0]:
                        break
                    cutoff = journal_id
                cur = self._db.execute("DELETE FROM journal WHERE id <= ?", (cutoff,))
            except _STORE_ERRORS as exc:
                raise StoreError(f"{self.path}: prune failed: {exc}") from exc
            return int(cur.rowcount)

    def ack(self, publisher: str, position: int) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO publishers (name, position) VALUES (?, ?) ON CONFLICT (name)"
                    " DO UPDATE SET position=max(position, excluded.position)",
                    (publisher, position),
                )
            except _STORE_ERRORS as exc:
                raise StoreError(f"{self.path}: ack failed: {exc}") from exc

    # ---- reads ----------------------------------------------------------------------------

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except _STORE_ERRORS as exc:
                raise StoreError(f"{self.path}: {exc}") from exc

    def recover(self) -> Recovery:
        with self._lock:
            try:
                snap = self._snap.execute(
                    "SELECT journal_id, blob FROM snapshot WHERE one = 1"
                ).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"{self.snapshot_path}: {exc}") from exc
        snapshot_id = int(snap[0][0]) if snap else 0
        blob = bytes(snap[0][1]) if snap else None
        rows = self._query(
            "SELECT id, kind, now, payload FROM journal WHERE id > ? ORDER BY id", (snapshot_id,)
        )
        entries = [
            JournalEntry(EntryKind(str(k)), float(n), bytes(p), int(i)) for i, k, n, p in rows
        ]
        agents = {str(a): (int(e), int(s))
                  for a, e, s in self._query("SELECT agent, epoch, batch_seq FROM agents")}
        return Recovery(blob, snapshot_id, entries, agents)

    def verdicts(
        self, after: int = 0, limit: int = 1000, node: str | None = None
    ) -> list[StoredVerdict]:
        if node is None:
            rows = self._query(
                "SELECT id, body FROM verdicts WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
            )
        else:
            rows = self._query(
                "SELECT id, body FROM verdicts WHERE id > ? AND node = ? ORDER BY id LIMIT ?",
                (after, node, limit),
            )
        return [StoredVerdict(int(i), decode_verdict(bytes(b))) for i, b in rows]

    def node_verdicts(self) -> dict[str, Verdict]:
        return {
            str(n): decode_verdict(bytes(b)) for n, b in self._query("SELECT node, body FROM nodes")
        }

    def admin_states(self) -> dict[str, AdminRecord]:
        return {
            str(n): AdminRecord(str(n), VerdictState(str(s)), str(a), float(t))
            for n, s, a, t in self._query("SELECT node, state, actor, at FROM admin")
        }

    def position(self, publisher: str) -> int:
        rows = self._query("SELECT position FROM publishers WHERE name = ?", (publisher,))
        return int(rows[0][0]) if rows else 0

    def journal_length(self) -> int:
        rows = self._query("SELECT count(*) FROM journal")
        return int(rows[0][0])

    def verdict_count(self) -> int:
        rows = self._query("SELECT count(*) FROM verdicts")
        return int(rows[0][0])
