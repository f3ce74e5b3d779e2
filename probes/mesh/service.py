"""The mesh's stateful core: the decision engine bound to a store.

Every engine input goes through here: it is applied, journaled and committed together with the
verdicts it caused, in one transaction. On start the engine is rebuilt from the store's snapshot
plus journal (replayed silently: those verdicts are already in the log), then a fresh snapshot is
taken so the journal always follows a snapshot made by this very engine — a later config change
(policy, nodes) applies from that point on and never makes an old journal replay differently.

Time: ``now`` is the mesh's wall clock when an input is applied, never allowed to go backwards
(a clock step back would otherwise un-expire staleness and damping).

Inputs are applied one at a time on the event loop, light ones (ticks, a low-rate agent's or a
verdict-changing batch) before bulk, agents taking turns (:mod:`probes.mesh.inputqueue`); the
store's work (commit, snapshot, prune, reads) runs on the store thread
(:mod:`probes.mesh.storethread`), so the loop keeps serving. A heavy batch's observations are
applied in parts, the loop serving other requests between them, and decided once at the end
(:meth:`MeshService._apply_live`); an apply that stops between parts leaves nothing behind.

A failed commit never leaves the engine and the store apart: the engine is rebuilt from what
was really stored — reading only, so a full disk cannot stop it — and until the store commits
again every input is refused (:class:`StoreUnavailable`: agents get 503 and resend) and
``/healthz`` and ``/metrics`` say so (:mod:`probes.mesh.storehealth`). If even the rebuild
fails, nothing is decided and no snapshot is written (it would save the unstored change) until
it succeeds. Before, recovery began with a snapshot: on a full disk it failed, the engine kept
the uncommitted verdict, and after a restart its seq existed nowhere.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from probes.logutil import RateLimitedLog
from probes.mesh.decision import AuditNote, DecisionEngine, NodeInfo
from probes.mesh.inputqueue import LIGHT_OBSERVATIONS, InputQueue
from probes.mesh.inputs import apply_entry, entry_in_parts, published
from probes.mesh.paths import PathEngine, PathPolicy
from probes.mesh.policy import DecisionPolicy
from probes.mesh.snapshot import ForkSnapshotter, dump_engine, load_snapshot
from probes.mesh.store import (
    AdminAction,
    AgentPosition,
    EntryKind,
    JournalEntry,
    MeshStore,
    StoreError,
)
from probes.mesh.storehealth import StoreHealth
from probes.mesh.storethread import StoreOutbox, StoreThread
from probes.mesh.weight_policy import WeightPolicy
from probes.mesh.weights import WeightEngine, WeightNode
from probes.model import (
    ObservationBatch,
    Verdict,
    VerdictState,
    WeightChange,
    encode,
)
from probes.model.columnar import ColumnarBatch
from probes.paths.asn import EMPTY, AsnTable

log = logging.getLogger(__name__)
audit_log = logging.getLogger("probes.mesh.audit")
AUDIT_RECENT = 1000
# a heavy batch's observations are applied this many at a time (~0.5 ms each), and a tick's
# staleness wheel looked at this many (node, vantage) pairs at a time (~1 ms), the event loop
# serving other requests between parts
APPLY_PART = 500
TICK_PART = 5_000
trouble = RateLimitedLog(log)
T = TypeVar("T")


class StoreUnavailable(StoreError):
    """The store cannot commit right now; the input was not applied. Retry later."""


class Replay(Exception):
    """A batch at or below the agent's position: ``epoch`` and ``last`` (its batch_seq)."""

    def __init__(self, epoch: int, last: int) -> None:
        super().__init__(f"(epoch, batch_seq) not above ({epoch}, {last})")
        self.epoch = epoch
        self.last = last


@dataclass
class _Loaded:
    """The engines as the store has them (snapshot + journal), and where that leaves us."""

    engine: DecisionEngine
    weights: WeightEngine | None
    paths: PathEngine
    journal_id: int
    last_now: float
    agents: dict[str, tuple[int, int]]
    replayed_entries: int
    replayed_verdicts: int


class MeshService:
    def __init__(
        self,
        store: MeshStore,
        policy: DecisionPolicy,
        nodes: Sequence[NodeInfo],
        *,
        snapshot_every: int = 10_000,
        snapshot_bytes: int = 256 * 1024 * 1024,
        background_snapshots: bool = False,
        weight_policy: WeightPolicy | None = None,
        weight_nodes: Sequence[WeightNode] = (),
        clock: Callable[[], float] = time.time,
        path_policy: PathPolicy | None = None,
        asn_table: AsnTable = EMPTY,
    ) -> None:
        self.store = store
        self.thread = StoreThread()
        self.outbox = StoreOutbox(store, self.thread)  # what the publishers read
        self.health = StoreHealth()
        self._clock = clock
        self._inputs = InputQueue()  # one input at a time: apply, then commit
        self._running: set[asyncio.Future[None]] = set()  # inputs in their turn (_serially)
        self.snapshot_every = snapshot_every
        self.snapshot_bytes = snapshot_bytes
        self.last_snapshot_seconds = 0.0  # how long the last snapshot blocked (for /metrics)
        # snapshot in a forked child when the backend supports it (POSIX only)
        self.background_snapshots = (
            background_snapshots and hasattr(os, "fork") and store.supports_detached_snapshot
        )
        self.snapshotter = ForkSnapshotter(store)
        self._bytes_since_snapshot = 0
        self.agent_seq: dict[str, int] = {}  # agent -> batch_seq of its last batch ...
        self.agent_epoch: dict[str, int] = {}  # ... and the instance epoch it came in
        self.last_now = 0.0
        self.replayed_entries = 0
        self.replayed_verdicts = 0
        self._since_snapshot = 0
        self._last_journal_id = 0
        # called with the verdict changes of every committed input (e.g. to wake publishers)
        self.listeners: list[Callable[[list[Verdict]], None]] = []
        # called with the weight changes of every committed input (weights enabled only)
        self.weight_listeners: list[Callable[[list[WeightChange]], None]] = []
        # the engine's audit notes (quorum, impairment, dwell: nothing a balancer sees), newest
        # last, for GET /v1/audit; each is also logged on the "probes.mesh.audit" logger
        self.audit: deque[AuditNote] = deque(maxlen=AUDIT_RECENT)
        self._policy = policy
        self._nodes = list(nodes)
        enabled = weight_policy is not None and weight_policy.enabled
        self._weight_policy = weight_policy if enabled else None
        self._weight_nodes = list(weight_nodes)
        self.weights: WeightEngine | None = None
        self._path_policy = path_policy or PathPolicy()
        self._table = asn_table
        self._install(self.thread.run(self._load))
        try:
            # config changes apply from here on: the journal always follows a snapshot made
            # with the running config
            self.thread.run(self._snapshot)
        except StoreError as exc:  # e.g. a full disk at start: serve reads, refuse inputs
            trouble("snapshot", "start-up snapshot not written (inputs refused until it is): %s",
                    exc)
            self.health.snapshot_required = True
            self.health.failed(str(exc), clock(), time.monotonic())

    # ---- start-up and rebuilds --------------------------------------------------------------

    def _load(self) -> _Loaded:
        """The engines as stored (snapshot, then the journal replayed silently: those verdicts
        are logged already), reconfigured to the running config. Reads only."""
        policy, nodes = self._policy, self._nodes
        rec = self.store.recover()
        saved_weights = saved_paths = None
        if rec.snapshot is not None:
            engine, saved_weights, saved_paths = load_snapshot(rec.snapshot)
        else:
            engine = DecisionEngine(policy, nodes)
        # the path engine knows the nodes configured now: traces of others are not kept
        ids = [info.node for info in nodes]
        paths = PathEngine.from_rows(saved_paths or {}, self._path_policy, self._table, ids)
        engine.extra_evidence = paths.evidence
        weights = None
        if self._weight_policy is not None:
            weights = (WeightEngine.restore(saved_weights) if saved_weights is not None
                       else WeightEngine(self._weight_policy, self._weight_nodes))
        journal_id = rec.snapshot_journal_id
        last_now = self.last_now
        replayed_verdicts = 0
        for entry in rec.entries:
            replayed_verdicts += len(apply_entry(engine, weights, paths, entry)[0])
            last_now = max(last_now, entry.now)
            journal_id = entry.id
        engine.take_audit()  # the replayed inputs' notes were logged when first applied
        paths.take_notes()
        # never re-announce: the engine's per-node seq must be at least the logged one
        for node_id, verdict in self.store.node_verdicts().items():
            behind = engine.catch_up_seq(node_id, verdict.seq)
            if behind is not None:
                log.warning("node %s: engine seq %d behind log %d", node_id, behind, verdict.seq)
        # config changes apply from here on
        for node_id in engine.reconfigure(policy, nodes):
            log.info("node %s is no longer configured: forgotten", node_id)
        if weights is not None and self._weight_policy is not None:
            weights.reconfigure(self._weight_policy, self._weight_nodes)
            for node_id, node in engine.nodes.items():  # states of nodes new to the weights
                weights.set_state(node_id, node.state, last_now)
        paths.policy = self._path_policy
        paths.table = self._table  # new traces are looked up in the table configured now
        paths.set_nodes(ids)
        return _Loaded(engine, weights, paths, journal_id, last_now, dict(rec.agents),
                       len(rec.entries), replayed_verdicts)

    def _install(self, loaded: _Loaded) -> None:
        self.engine = loaded.engine
        self.weights = loaded.weights
        self.paths = loaded.paths
        self._last_journal_id = loaded.journal_id
        self.last_now = max(self.last_now, loaded.last_now)
        self.agent_seq = {agent: seq for agent, (_, seq) in loaded.agents.items()}
        self.agent_epoch = {agent: epoch for agent, (epoch, _) in loaded.agents.items()}
        self.replayed_entries = loaded.replayed_entries
        self.replayed_verdicts = loaded.replayed_verdicts

    async def _rebuild(self) -> bool:
        """Replace the engines with what the store holds; False when the store cannot even be
        read (then nothing is decided until a later rebuild works)."""
        try:
            loaded = await self.thread.call(self._load)
        except Exception as exc:  # whatever it is, the engine stays suspect
            self.health.diverged = True
            self.health.failed(f"engine not rebuilt: {exc}", self._clock(), time.monotonic())
            trouble("rebuild", "engine not rebuilt from the store (inputs refused): %s", exc)
            return False
        self._install(loaded)
        self.health.diverged = False
        self.health.rebuilds_total += 1
        return True

    def _snapshot(self) -> None:
        """Write the engines as of the last committed journal id (on the store thread)."""
        if self.health.diverged:
            raise StoreError("the engine may hold an input the store does not: not saved")
        started = time.perf_counter()
        blob = self._dump()
        self.store.save_snapshot(self._last_journal_id, blob)
        self.snapshotter.covered(self._last_journal_id)  # the journal it covers: dropped in steps
        self._since_snapshot = 0
        self._bytes_since_snapshot = 0
        self.last_snapshot_seconds = time.perf_counter() - started

    def _fork_snapshot(self) -> bool:
        """Snapshot in a forked child (see :class:`ForkSnapshotter`); False when fork failed and
        the caller snapshots in-process."""
        if self.snapshotter.running:
            return True  # one at a time; the journal keeps growing meanwhile
        started = time.perf_counter()
        if not self.snapshotter.start(self._dump, self._last_journal_id):
            return False
        self._since_snapshot = 0
        self._bytes_since_snapshot = 0
        self.last_snapshot_seconds = time.perf_counter() - started
        return True

    @property
    def snapshots_background_total(self) -> int:
        return self.snapshotter.completed_total

    async def housekeeping(self) -> None:
        """Every tick: reap a snapshot child, drop a step of the journal it covers; while the
        store is failing, probe it (with backoff) and come back once it commits again."""
        if self.health.ok:
            await self.thread.call(self.snapshotter.reap)
            return
        if not self.health.due(time.monotonic()):
            return
        async with self._inputs.turn():
            await self._try_recover()

    async def _try_recover(self) -> None:
        health = self.health
        try:
            await self.thread.call(self.store.probe_write)
            if health.diverged and not await self._rebuild():
                raise StoreError(health.error)
            if health.snapshot_required:
                await self.thread.call(self._snapshot)
        except StoreError as exc:
            health.failed(str(exc), self._clock(), time.monotonic())
            return
        log.warning("store commits again after failing since %.0f: inputs accepted",
                    health.since)
        health.recovered()

    def _dump(self) -> bytes:
        """The engines as a snapshot blob."""
        weights = self.weights.to_builtins() if self.weights is not None else None
        return dump_engine(self.engine, weights, self.paths.to_rows())

    def _commit_step(self, entry: JournalEntry, verdicts: list[Verdict],
                     agent: AgentPosition | None, admin: AdminAction | None) -> int:
        """Commit, then drop a step of covered journal (on the store thread)."""
        journal_id = self.store.commit(entry, verdicts, agent, admin, entry.now)
        self.snapshotter.prune_step()
        return journal_id

    async def _commit(
        self,
        entry: JournalEntry,
        verdicts: list[Verdict],
        agent: AgentPosition | None = None,
        admin: AdminAction | None = None,
        weight_changes: list[WeightChange] | None = None,
    ) -> None:
        try:
            journal_id = await self.thread.call(self._commit_step, entry, verdicts, agent, admin)
        except StoreError as exc:
            # the engine is now ahead of the store: rebuild it from what was really stored,
            # and take no input until the store commits again
            self.health.commit_failures_total += 1
            self.health.failed(str(exc), self._clock(), time.monotonic())
            trouble("commit", "commit failed; inputs refused until the store commits: %s", exc)
            await self._rebuild()
            raise StoreUnavailable(str(exc)) from exc
        self._last_journal_id = journal_id
        self._since_snapshot += 1
        self._bytes_since_snapshot += len(entry.payload)
        # bound both what a restart replays and the journal's disk use
        due = (
            self._since_snapshot >= self.snapshot_every
            or self._bytes_since_snapshot >= self.snapshot_bytes
        )
        if due:
            await self.thread.call(self._snapshot_due)
        for note in [*self.engine.take_audit(), *self.paths.take_notes()]:
            self.audit.append(note)
            audit_log.info("%s", encode(note).decode())
        if verdicts:
            self._announce(self.listeners, verdicts)
        if weight_changes:
            self._announce(self.weight_listeners, weight_changes)

    def _snapshot_due(self) -> None:
        """A snapshot in a forked child, or in-process (on the store thread: no other store
        call is in flight, so the child inherits no half-held SQLite lock)."""
        if self.background_snapshots and self._fork_snapshot():
            return
        try:
            self._snapshot()
        except StoreError as exc:  # the journal grows until the next one works
            self._since_snapshot = 0
            self._bytes_since_snapshot = 0
            trouble("snapshot", "snapshot not written: %s", exc)

    def _now(self, now: float) -> float:
        self.last_now = max(self.last_now, float(now))
        return self.last_now

    @property
    def journal_since_snapshot(self) -> int:
        return self._since_snapshot

    @staticmethod
    def _announce(listeners: list[Callable[[list[Any]], None]], changes: list[Any]) -> None:
        for listener in listeners:
            try:
                listener(changes)
            except Exception:  # a broken listener must not undo a committed input
                log.exception("listener failed")

    # ---- inputs ---------------------------------------------------------------------------

    def check_replay(self, batch: ObservationBatch | ColumnarBatch) -> None:
        """The replay rule: a batch is taken only if its ``(epoch, batch_seq)`` is above the
        agent's last accepted one (raises :class:`Replay`): a newer instance epoch (an agent
        that lost its state directory), or the same epoch and a higher batch_seq. Checked under
        the input lock, so a resent batch racing its first attempt is taken once."""
        epoch = self.agent_epoch.get(batch.agent, 0)
        last = self.agent_seq.get(batch.agent, -1)
        if (batch.epoch, batch.batch_seq) <= (epoch, last):
            raise Replay(epoch, last)

    async def _serially(self, step: Callable[[], Awaitable[T]], source: str = "",
                        size: int = 0, admit: Callable[[], object] | None = None) -> T:
        """Run an input in its turn (``source`` and ``size``: see :class:`InputQueue`), to
        completion: once applied, its commit (and the rebuild if that fails) finishes even if
        the caller is cancelled. ``admit`` runs first in the turn, before the store's health
        is asked (a batch's decoding: a malformed body is refused as such, store or not).

        The turn is taken in the caller's task (at once when it is free), the input then runs in
        a task of its own, which hands the caller its answer before it hands the turn on: the
        next input's decoding and apply (milliseconds each for a heavy batch) run after the
        answer is on its way, never before it."""
        await self._inputs.acquire(source, size)
        answer: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        async def run() -> None:
            try:
                if admit is not None:
                    heavy = size > LIGHT_OBSERVATIONS
                    # a heavy body's decoding and its apply are milliseconds each: let the
                    # loop serve what came meanwhile before and after the decoding (still this
                    # input's turn)
                    if heavy:
                        await asyncio.sleep(0)
                    admit()
                    if heavy:
                        await asyncio.sleep(0)
                if not self.health.ok or self.health.diverged:
                    raise StoreUnavailable(f"the store cannot commit: {self.health.error}")
                result = await step()
            except asyncio.CancelledError:
                answer.cancel()
                raise
            except Exception as exc:  # the caller's to answer (or gone: nobody's)
                if not answer.done():
                    answer.set_exception(exc)
            else:
                if not answer.done():
                    answer.set_result(result)
            finally:
                self._inputs.release()

        running = asyncio.ensure_future(run())
        self._running.add(running)  # a task nobody refers to may be collected before its end
        running.add_done_callback(self._running.discard)
        return await answer

    async def accept_batch(self, body: bytes, batch: ObservationBatch, now: float
                           ) -> list[Verdict]:
        """Apply an already authenticated and validated batch; commit it with its effects.
        Raises :class:`Replay`, or :class:`StoreUnavailable` (nothing applied)."""
        return await self.accept_body(body, lambda _body: batch, batch.agent,
                                      len(batch.observations) + len(batch.traces), now)

    async def accept_body(self, body: bytes,
                          decode: Callable[[bytes], ObservationBatch | ColumnarBatch],
                          source: str, size: int, now: float) -> list[Verdict]:
        """:meth:`accept_batch` for an authenticated body not decoded yet: ``decode`` (which
        validates it, raising whatever the caller answers with) runs in the input's turn, so a
        heavy body's decoding (milliseconds for 2,000 observations) waits its turn by deadline
        like its apply, and a small verdict-changing input passes it instead of queueing behind
        it on the event loop. ``size``: the body's observations, estimated (the queue's
        deadline)."""
        decoded: list[ObservationBatch | ColumnarBatch] = []

        async def step() -> list[Verdict]:
            batch = decoded[0]
            self.check_replay(batch)
            entry = JournalEntry(EntryKind.BATCH, self._now(now), body)
            verdicts, changes = await self._apply_live(entry, batch)
            await self._commit(entry, verdicts, weight_changes=changes,
                               agent=AgentPosition(batch.agent, batch.batch_seq, batch.epoch))
            if batch.epoch != self.agent_epoch.get(batch.agent, 0):
                log.info("agent %s: new instance epoch %d (its state was lost or reset)",
                         batch.agent, batch.epoch)
            self.agent_seq[batch.agent] = batch.batch_seq
            self.agent_epoch[batch.agent] = batch.epoch
            return verdicts

        return await self._serially(step, source, size,
                                    lambda: decoded.append(decode(body)))

    async def _apply_live(self, entry: JournalEntry,
                          batch: ObservationBatch | ColumnarBatch | None = None,
                          ) -> tuple[list[Verdict], list[WeightChange]]:
        """:func:`apply_entry` on the live engines (a batch already decoded), a heavy batch's
        observations ``APPLY_PART`` at a time and a tick's staleness wheel ``TICK_PART`` pairs
        at a time: between parts the loop serves other requests (2,000 observations applied
        at once held it ~2-5 ms, a tick with every pair due ~40 ms, and a verdict-changing
        request was read only after). Nothing else is applied meanwhile (this input holds the
        turn), and nothing is decided before the last part: verdicts come from the one settle
        at the end, as when a restart or ``mesh replay`` applies the journaled input at
        once."""
        steps = entry_in_parts(self.engine, self.weights, self.paths, entry, batch,
                               part=APPLY_PART, tick_part=TICK_PART)
        try:
            while True:
                next(steps)
                await asyncio.sleep(0)
        except StopIteration as done:
            verdicts, changes = done.value
        except BaseException:
            # an engine bug, or the task cancelled between parts: part of the input may be in
            # the engine, and until it is rebuilt from the store nothing may be decided,
            # taken or snapshotted from it
            self.health.diverged = True
            log.exception("%s input not applied whole; rebuilding the engine", entry.kind.value)
            await self._rebuild()
            raise
        return published(verdicts, self.weights, self.store.epoch), changes

    async def tick(self, now: float) -> list[Verdict]:
        async def step() -> list[Verdict]:
            entry = JournalEntry(EntryKind.TICK, self._now(now))
            verdicts, changes = await self._apply_live(entry)
            await self._commit(entry, verdicts, weight_changes=changes)
            return verdicts

        return await self._serially(step)

    async def set_admin(
        self, node: str, state: VerdictState | None, actor: str, now: float
    ) -> list[Verdict]:
        """Operator action. Raises KeyError for an unknown node."""
        if node not in self.engine.nodes:
            raise KeyError(node)

        async def step() -> list[Verdict]:
            action = AdminAction(node, state, actor)
            entry = JournalEntry(EntryKind.ADMIN, self._now(now), encode(action))
            verdicts, changes = await self._apply_live(entry)
            await self._commit(entry, verdicts, admin=action, weight_changes=changes)
            return verdicts

        return await self._serially(step)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """A store read (``fn`` a method of :attr:`store`) on the store thread."""
        return await self.thread.call(fn, *args)

    async def close(self) -> None:
        """Snapshot (so the next start replays nothing) and close the store. No snapshot while
        the engine may hold what the store does not."""
        async with self._inputs.turn():
            try:
                await self.thread.call(self._close_in_thread)
            finally:
                self.thread.close()

    def _close_in_thread(self) -> None:
        try:
            self.snapshotter.wait()
            if not self.health.diverged:
                self._snapshot()
        except StoreError as exc:
            log.error("no snapshot at shutdown (the journal is replayed at start): %s", exc)
        finally:
            self.store.close()
