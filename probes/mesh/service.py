"""The mesh's stateful core: the decision engine bound to a store.

Every engine input goes through here: it is applied, journaled and committed together with the
verdicts it caused, in one transaction. On start the engine is rebuilt from the store's snapshot
plus journal (replayed silently: those verdicts are already in the log), then a fresh snapshot is
taken so the journal always follows a snapshot made by this very engine — a later config change
(policy, nodes) applies from that point on and never makes an old journal replay differently.

Time: ``now`` is the mesh's wall clock when an input is applied, never allowed to go backwards
(a clock step back would otherwise un-expire staleness and damping).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from probes.mesh.decision import AuditNote, DecisionEngine, NodeInfo
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
from probes.mesh.weight_policy import WeightPolicy
from probes.mesh.weights import WeightEngine, WeightNode
from probes.model import (
    NodeLoad,
    Observation,
    ObservationBatch,
    Verdict,
    VerdictState,
    WeightChange,
    decode_batch,
    encode,
)

log = logging.getLogger(__name__)
audit_log = logging.getLogger("probes.mesh.audit")
AUDIT_RECENT = 1000


def split_load(
    observations: Sequence[Observation],
) -> tuple[Sequence[Observation], list[tuple[str, NodeLoad]]]:
    """Check results for the decision engine, load reads for the weight engine: a load read is
    never evidence of a node's health (its absence says nothing about the service)."""
    loads = [(o.node, o.load) for o in observations if o.load is not None]
    if not loads:
        return observations, loads
    return [o for o in observations if o.load is None], loads


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
    ) -> None:
        self.store = store
        self.snapshot_every = snapshot_every
        self.snapshot_bytes = snapshot_bytes
        self.last_snapshot_seconds = 0.0  # how long the last snapshot blocked (for /metrics)
        # snapshot in a forked child when the backend supports it (POSIX only)
        self.background_snapshots = (
            background_snapshots and hasattr(os, "fork") and store.supports_detached_snapshot
        )
        self.snapshotter = ForkSnapshotter(store)
        self._bytes_since_snapshot = 0
        self.agent_seq: dict[str, int] = {}
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
        self.engine = self._recover(policy, nodes)

    # ---- start-up -------------------------------------------------------------------------

    def _recover(self, policy: DecisionPolicy, nodes: Sequence[NodeInfo]) -> DecisionEngine:
        rec = self.store.recover()
        saved_weights = None
        if rec.snapshot is not None:
            engine, saved_weights = load_snapshot(rec.snapshot)
        else:
            engine = DecisionEngine(policy, nodes)
        weights = None
        if self._weight_policy is not None:
            weights = (WeightEngine.restore(saved_weights) if saved_weights is not None
                       else WeightEngine(self._weight_policy, self._weight_nodes))
        self._last_journal_id = rec.snapshot_journal_id
        for entry in rec.entries:
            self.replayed_verdicts += len(self._apply(engine, weights, entry)[0])
            self.last_now = max(self.last_now, entry.now)
            self._last_journal_id = entry.id
        self.replayed_entries = len(rec.entries)
        engine.take_audit()  # the replayed inputs' notes were logged when first applied
        self.agent_seq = dict(rec.agents)
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
                weights.set_state(node_id, node.state, self.last_now)
        self.weights = weights
        self._snapshot(engine)
        return engine

    @staticmethod
    def _apply(engine: DecisionEngine, weights: WeightEngine | None, entry: JournalEntry,
               observations: Sequence[Observation] | None = None,
               ) -> tuple[list[Verdict], list[WeightChange]]:
        """Apply one journaled input to both engines; (verdict changes, weight changes).
        ``observations``: a batch entry's, when the caller decoded them already."""
        now = entry.now
        if entry.kind == EntryKind.BATCH:
            if observations is None:
                observations = decode_batch(entry.payload).observations
            checks, loads = split_load(observations)
            verdicts = engine.observe(checks, now)
            if weights is not None and loads:
                weights.load(loads, now)
        elif entry.kind == EntryKind.TICK:
            verdicts = engine.tick(now)
        else:
            action = _decode_admin(entry.payload)
            verdicts = engine.set_admin(action.node, action.state, now, action.actor)
        if weights is None:
            return verdicts, []
        changes: list[WeightChange] = []
        for verdict in verdicts:
            changes += weights.set_state(verdict.node, verdict.state, now)
        if entry.kind == EntryKind.TICK:
            changes += weights.tick(now)
        return verdicts, changes

    def _snapshot(self, engine: DecisionEngine | None = None) -> None:
        started = time.perf_counter()
        blob = dump_engine(engine or self.engine, self._weights_state())
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
        if not self.snapshotter.start(
                lambda: dump_engine(self.engine, self._weights_state()), self._last_journal_id):
            return False
        self._since_snapshot = 0
        self._bytes_since_snapshot = 0
        self.last_snapshot_seconds = time.perf_counter() - started
        return True

    @property
    def snapshots_background_total(self) -> int:
        return self.snapshotter.completed_total

    def housekeeping(self) -> None:
        """Reap a snapshot child and drop the journal it covers, a little at a time."""
        self.snapshotter.reap()

    def _weights_state(self) -> dict[str, object] | None:
        return self.weights.to_builtins() if self.weights is not None else None

    def _commit(
        self,
        entry: JournalEntry,
        verdicts: list[Verdict],
        agent: AgentPosition | None = None,
        admin: AdminAction | None = None,
        weight_changes: list[WeightChange] | None = None,
    ) -> None:
        try:
            self._last_journal_id = self.store.commit(entry, verdicts, agent, admin, entry.now)
        except StoreError:
            # the engine is now ahead of the store: rebuild it from what was really stored
            log.exception("commit failed; rebuilding the engine from the store")
            self.engine = self._recover(self._policy, self._nodes)
            raise
        self._since_snapshot += 1
        self._bytes_since_snapshot += len(entry.payload)
        # bound both what a restart replays and the journal's disk use
        due = (
            self._since_snapshot >= self.snapshot_every
            or self._bytes_since_snapshot >= self.snapshot_bytes
        )
        if due and not (self.background_snapshots and self._fork_snapshot()):
            self._snapshot()
        for note in self.engine.take_audit():
            self.audit.append(note)
            audit_log.info("%s", encode(note).decode())
        if verdicts:
            self._announce(self.listeners, verdicts)
        if weight_changes:
            self._announce(self.weight_listeners, weight_changes)

    def _with_weights(self, verdicts: list[Verdict]) -> list[Verdict]:
        """Verdicts carrying their node's weight as it is after them (weights enabled)."""
        weights = self.weights
        if weights is None:
            return verdicts
        out = []
        for verdict in verdicts:
            node = weights.nodes.get(verdict.node)
            weight = node.published if node is not None else None
            out.append(msgspec.structs.replace(verdict, weight=weight) if weight is not None
                       else verdict)
        return out

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

    def accept_batch(self, body: bytes, batch: ObservationBatch, now: float) -> list[Verdict]:
        """Apply an already authenticated and validated batch; commit it with its effects."""
        now = self._now(now)
        entry = JournalEntry(EntryKind.BATCH, now, body)
        try:
            verdicts, changes = self._apply_live(entry, batch.observations)
        except Exception:
            # a bug must not leave half a batch in the engine: rebuild it from the store
            log.exception("engine failed on a batch from %s; rebuilding", batch.agent)
            self.engine = self._recover(self._policy, self._nodes)
            raise
        self._commit(entry, verdicts, agent=AgentPosition(batch.agent, batch.batch_seq),
                     weight_changes=changes)
        self.agent_seq[batch.agent] = batch.batch_seq
        return verdicts

    def _apply_live(self, entry: JournalEntry,
                    observations: Sequence[Observation] | None = None,
                    ) -> tuple[list[Verdict], list[WeightChange]]:
        """:meth:`_apply` on the live engines (a batch's observations already decoded)."""
        verdicts, changes = self._apply(self.engine, self.weights, entry, observations)
        return self._with_weights(verdicts), changes

    def tick(self, now: float) -> list[Verdict]:
        now = self._now(now)
        entry = JournalEntry(EntryKind.TICK, now)
        verdicts, changes = self._apply_live(entry)
        self._commit(entry, verdicts, weight_changes=changes)
        return verdicts

    def set_admin(
        self, node: str, state: VerdictState | None, actor: str, now: float
    ) -> list[Verdict]:
        """Operator action. Raises KeyError for an unknown node."""
        if node not in self.engine.nodes:
            raise KeyError(node)
        now = self._now(now)
        action = AdminAction(node, state, actor)
        entry = JournalEntry(EntryKind.ADMIN, now, encode(action))
        verdicts, changes = self._apply_live(entry)
        self._commit(entry, verdicts, admin=action, weight_changes=changes)
        return verdicts

    def close(self) -> None:
        """Snapshot (so the next start replays nothing) and close the store."""
        try:
            self.snapshotter.wait()
            self._snapshot()
        finally:
            self.store.close()


def _decode_admin(payload: bytes) -> AdminAction:
    return msgspec.json.decode(payload, type=AdminAction)
