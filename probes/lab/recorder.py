"""Watches a running :class:`probes.lab.stack.Stack`: the mesh's verdict log and HAProxy's server
states, polled every ``interval`` (50 ms) on a thread, each change stamped with wall-clock time.

Times: verdicts carry the mesh's ``decided_at`` (wall clock, the instant the engine decided);
balancer changes are stamped when a poll first sees them, so they are late by at most one poll
interval (plus the poll's own duration). Fault times come from the scenario, same clock.

With ``journal=True`` it keeps every journal entry (batches, ticks, admin actions, with the
``now`` the mesh applied them at), from the mesh's start: written as journal records
(:func:`probes.mesh.replay.journal_record`) they replay to the mesh's verdict log.

With ``probes=True`` it also taps the mesh's journal (its SQLite database, read-only) for every
observation the mesh applied: when the probe started and ended at the agent, and when the mesh
applied it. That splits a detection time into its parts (waiting for a probe slot, the probe
itself, reporting, deciding, publishing): see :func:`detection_path`. Rows are read within a
poll or two of their commit, long before a snapshot prunes them.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probes.mesh.store import EntryKind, JournalEntry
from probes.model.columnar import whole_batch

if TYPE_CHECKING:
    from probes.lab.stack import Stack


@dataclass(frozen=True, slots=True)
class VerdictEvent:
    at: float  # decided_at
    node: str
    state: str
    previous: str
    seq: int
    seen_at: float  # when the recorder saw it in the log
    why: str = ""  # the verdict's evidence, compact: "what vantage/check=reason; ..."


@dataclass(frozen=True, slots=True)
class BalancerEvent:
    at: float
    backend: str
    server: str
    in_rotation: bool
    admin: str
    op_state: int


@dataclass(frozen=True, slots=True)
class ProbeEvent:
    """One observation the mesh applied (from its journal)."""

    node: str
    vantage: str
    check: str
    started: float  # agent wall clock at the probe's start
    ended: float  # started + the probe's duration
    applied: float  # mesh wall clock when the engine took it (a verdict's decided_at)
    ok: bool
    reason: str


@dataclass
class Recorder:
    stack: Stack
    interval: float = 0.05
    verdicts: list[VerdictEvent] = field(default_factory=list)
    balancer: list[BalancerEvent] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)  # latest mesh view, for tables
    details: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> /v1/nodes/{id}
    errors: int = 0
    probes: bool = False  # tap the mesh journal for every applied observation
    probe_events: list[ProbeEvent] = field(default_factory=list)
    journal: bool = False  # keep every journal entry (batches, ticks, admin) to replay the run
    journal_entries: list[JournalEntry] = field(default_factory=list)
    _journal: sqlite3.Connection | None = None
    _journal_id: int = 0
    _log_id: int = 0  # the last verdict-log entry read
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Recorder:
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._journal is not None:
            self._journal.close()

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def catch_up(self, timeout: float = 60.0) -> None:
        """Wait until the polls have read every verdict-log entry (and, when tapping it, every
        journal row) the mesh had written when this was called: the end of a run, without
        guessing how many poll intervals a busy machine needs."""
        log = self.stack.log(after=self._log_id)
        latest_log = max((int(e["id"]) for e in log), default=0)
        latest_journal = 0
        if self.probes or self.journal:
            path = Path(self.stack.dir) / "mesh.db"
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                latest_journal = int(db.execute(
                    "SELECT COALESCE(MAX(id), 0) FROM journal").fetchone()[0])
        deadline = time.monotonic() + timeout
        while self._log_id < latest_log or self._journal_id < latest_journal:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the recorder did not catch up in {timeout:g}s (log "
                                   f"{self._log_id}/{latest_log}, journal "
                                   f"{self._journal_id}/{latest_journal})")
            time.sleep(0.02)

    def _run(self) -> None:
        rotation: dict[tuple[str, str], bool] = {}
        next_view = 0.0
        while not self._stop.is_set():
            started = time.time()
            try:
                for (backend, server), row in self.stack.haproxy.states().items():
                    if rotation.get((backend, server)) != row.in_rotation:
                        rotation[(backend, server)] = row.in_rotation
                        with self._lock:
                            self.balancer.append(BalancerEvent(started, backend, server,
                                                               row.in_rotation, row.admin,
                                                               row.op_state))
                for entry in self.stack.log(after=self._log_id):
                    v = entry["verdict"]
                    with self._lock:
                        self.verdicts.append(VerdictEvent(float(v["decided_at"]), v["node"],
                                                          v["state"], v["previous"],
                                                          int(v["seq"]), time.time(),
                                                          _why(v.get("reasons", []))))
                    self._log_id = max(self._log_id, int(entry["id"]))
                if self.probes or self.journal:
                    self._read_journal()
                if started >= next_view:
                    nodes = self.stack.nodes()
                    details = {n["node"]: self.stack.node_view(n["node"]) for n in nodes}
                    with self._lock:
                        self.nodes, self.details = nodes, details
                    next_view = started + 1.0
            except Exception:  # a poll that failed (mesh restarting, ...) is retried
                self.errors += 1
            with contextlib.suppress(ValueError):
                self._stop.wait(max(0.0, self.interval - (time.time() - started)))

    def _read_journal(self) -> None:
        if self._journal is None:
            path = Path(self.stack.dir) / "mesh.db"
            self._journal = sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                            check_same_thread=False)
        rows = self._journal.execute(
            "SELECT id, kind, now, payload FROM journal WHERE id > ? ORDER BY id",
            (self._journal_id,)).fetchall()
        events = []
        entries = []
        read_to = self._journal_id
        for row_id, kind, now, payload in rows:
            read_to = max(read_to, int(row_id))
            if self.journal:
                entries.append(JournalEntry(EntryKind(kind), float(now), bytes(payload or b""),
                                            int(row_id)))
            if not self.probes or kind != EntryKind.BATCH.value:
                continue
            for o in whole_batch(bytes(payload)).observations:
                events.append(ProbeEvent(o.node, o.vantage, o.check, o.wall_time,
                                         o.wall_time + o.duration_seconds, float(now), o.ok,
                                         o.reason.value))
        with self._lock:
            self.probe_events.extend(events)
            self.journal_entries.extend(entries)
        self._journal_id = read_to  # after the entries are kept: catch_up waits on it

    # ------------------------------------------------------------------ queries

    def probes_of(self, node: str, start: float, end: float) -> list[ProbeEvent]:
        """Observations of ``node`` the mesh applied in [start, end], in order of application."""
        with self._lock:
            return [p for p in self.probe_events if p.node == node and start <= p.applied <= end]

    def first_verdict(self, node: str, state: str, after: float) -> VerdictEvent | None:
        with self._lock:
            return next((v for v in self.verdicts
                         if v.node == node and v.state == state and v.at >= after), None)

    def first_balancer(self, backend: str, server: str, in_rotation: bool,
                       after: float) -> BalancerEvent | None:
        with self._lock:
            return next((b for b in self.balancer if b.backend == backend and b.server == server
                         and b.in_rotation == in_rotation and b.at >= after), None)

    def verdicts_between(self, start: float, end: float) -> list[VerdictEvent]:
        with self._lock:
            return [v for v in self.verdicts if start <= v.at <= end]

    def in_rotation(self, backend: str, server: str) -> bool | None:
        with self._lock:
            for b in reversed(self.balancer):
                if b.backend == backend and b.server == server:
                    return b.in_rotation
        return None

    def view(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.nodes)

    def failing_checks(self, node: str) -> list[str]:
        """``check=reason`` for every check some vantage sees failing on ``node`` (sorted)."""
        with self._lock:
            detail = self.details.get(node, {})
        failing: set[str] = set()
        for view in detail.get("vantages", {}).values():
            for name, check in view.get("checks", {}).items():
                if check.get("effective") == "DOWN":
                    # a check held down by flap damping (RFC 2439) says so: it is not failing
                    damped = " (damped)" if check.get("suppressed_until") is not None else ""
                    failing.add(f"{name}={check.get('reason', '?')}{damped}")
                elif check.get("quality_breach"):
                    failing.add(f"{name}=quality")
        return sorted(failing)


def _why(reasons: list[dict[str, Any]]) -> str:
    parts = []
    for r in reasons[:8]:
        where = "/".join(x for x in (r.get("vantage", ""), r.get("check", "")) if x)
        text = r.get("what", "?") + (f" {where}" if where else "")
        if r.get("reason"):
            text += f"={r['reason']}"
        elif r.get("note"):
            text += f" ({r['note']})"
        parts.append(text)
    return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class DetectionPath:
    """Where the time from a fault (or repair) to the verdict went, from the journal tap.

    All figures in seconds from the fault; ``None`` when the tap saw nothing to explain."""

    first_result: float | None  # the first probe result showing the change ended (any vantage)
    deciding_result: float | None  # the probe whose report tipped the verdict ended
    deciding_started: float | None  # ... and started (the wait for its slot, from the fault)
    applied: float | None  # the mesh applied that report (= the verdict, decided at ingest)
    results: int  # results showing the change the mesh applied before the verdict
    reasons: str  # their reasons, counted: "icmp-unreachable x4, timeout x1"

    @property
    def reporting(self) -> float | None:
        """Deciding probe's end -> the mesh applied its report (agent spool, batching, POST)."""
        if self.applied is None or self.deciding_result is None:
            return None
        return self.applied - self.deciding_result


def detection_path(rec: Recorder, node: str, fault_at: float, verdict_at: float | None,
                   ok: bool) -> DetectionPath:
    """Split fault -> verdict for ``node``: the probe results with outcome ``ok`` the mesh
    applied between the fault and the verdict, and the one(s) applied at the verdict's instant."""
    if verdict_at is None:
        return DetectionPath(None, None, None, None, 0, "")
    shown = [p for p in rec.probes_of(node, fault_at, verdict_at + 1e-3)
             if p.ok == ok and p.ended >= fault_at]
    deciding = [p for p in shown if abs(p.applied - verdict_at) < 1e-3]
    counts: dict[str, int] = {}
    for p in shown:
        counts[p.reason] = counts.get(p.reason, 0) + 1
    reasons = ", ".join(f"{r} x{n}" for r, n in sorted(counts.items(), key=lambda x: -x[1]))
    if not deciding:
        return DetectionPath(min((p.ended for p in shown), default=fault_at) - fault_at
                             if shown else None, None, None, None, len(shown), reasons)
    last = max(deciding, key=lambda p: p.ended)
    return DetectionPath(min(p.ended for p in shown) - fault_at, last.ended - fault_at,
                         last.started - fault_at, last.applied - fault_at, len(shown), reasons)
