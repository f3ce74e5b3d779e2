"""Run the mesh's engines over a recorded stream (post-incident analysis, tests).

Input: JSON lines, each one of

* an :class:`probes.model.Observation`: applied at ``now = its wall_time``; observations sharing
  a wall time are applied as one batch;
* a whole :class:`probes.model.ObservationBatch`, as an agent sent it: applied as one batch at
  its ``sent_at``, as the live mesh applies a batch when it arrives;
* a journal record, ``{"now": T, "batch": {...}}``, ``{"now": T, "tick": true}`` or
  ``{"now": T, "admin": {"node": ..., "state": "DRAINING" | "MAINTENANCE" | null, "actor": ...}}``
  (optionally ``"epoch": E``, the store's epoch the verdicts are stamped with): one engine input
  exactly as a live mesh applied and journaled it, at the mesh's own ``now``. A stream of these
  (:func:`journal_record` writes one from a journal entry) replays that mesh's verdict log byte
  for byte.

Every input goes through :mod:`probes.mesh.inputs`, as in the live mesh: the decision engine,
the path evidence (traces in batches) and the weight engine (load reads, ``telemetry.load``).
Time never goes backwards (an input older than the one before is applied at the later time).
For observations and batches the engine ticks every ``tick_seconds`` of stream time in between,
as the live mesh does, so vantages go stale, damped checks are released and changes held by the
dwell are published on the same schedule; journal records carry their ticks themselves, so a
stream that has any is not ticked otherwise.

The output is the sequence of verdict changes (:func:`replay`) or of weight changes
(:func:`replay_weights`: a recorded load trace in, the same weights out, byte for byte).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import msgspec

from probes.mesh.decision import DecisionEngine, NodeInfo
from probes.mesh.inputs import (
    Changes,
    apply_admin,
    apply_batch,
    apply_tick,
    decode_admin,
    published,
)
from probes.mesh.paths import PathEngine, PathPolicy
from probes.mesh.policy import DecisionPolicy
from probes.mesh.store import AdminAction, EntryKind, JournalEntry
from probes.mesh.weight_policy import WeightPolicy
from probes.mesh.weights import WeightEngine, WeightNode
from probes.model import (
    SCHEMA_VERSION,
    Observation,
    ObservationBatch,
    SchemaError,
    Verdict,
    WeightChange,
    decode_batch,
    decode_recorded,
)
from probes.model.columnar import whole_batch
from probes.paths.asn import EMPTY

MAX_TICKS_PER_GAP = 10_000  # a long silence ticks at its end instead of once per second


class JournalRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One engine input as a live mesh journaled it, with the ``now`` it was applied at: exactly
    one of ``tick``, ``batch``, ``admin``. ``epoch``: the store's epoch at that time."""

    now: float
    tick: bool = False
    batch: ObservationBatch | None = None
    admin: AdminAction | None = None
    epoch: int = 0


Recorded = Observation | ObservationBatch | JournalRecord

_record_decoder = msgspec.json.Decoder(JournalRecord)


def journal_record(entry: JournalEntry, epoch: int = 0) -> bytes:
    """The JSON line that replays one journal entry (what a live mesh applied, at its ``now``)."""
    if entry.kind == EntryKind.BATCH:
        record = JournalRecord(entry.now, batch=whole_batch(entry.payload), epoch=epoch)
    elif entry.kind == EntryKind.TICK:
        record = JournalRecord(entry.now, tick=True, epoch=epoch)
    else:
        record = JournalRecord(entry.now, admin=decode_admin(entry.payload), epoch=epoch)
    return msgspec.json.encode(record)


def _decode(line: bytes) -> list[Recorded]:
    try:
        head = msgspec.json.decode(line)
    except msgspec.DecodeError:
        head = None
    if isinstance(head, dict) and "now" in head:
        try:
            record = _record_decoder.decode(line)
        except msgspec.ValidationError as exc:
            text = str(exc)
            path = text.split(" - at `", 1)[1].rstrip("`") if " - at `" in text else "$"
            raise SchemaError(text, path) from None
        if record.tick + (record.batch is not None) + (record.admin is not None) != 1:
            raise SchemaError("a journal record is exactly one of tick, batch, admin", "$")
        if record.batch is not None and record.batch.version != SCHEMA_VERSION:
            raise SchemaError(f"unsupported schema version {record.batch.version}",
                              "$.batch.version")
        return [record]
    if isinstance(head, dict) and "observations" in head:
        return [decode_batch(line)]
    return list(decode_recorded(line))


def parse_lines(lines: Iterable[bytes]) -> Iterator[Recorded]:
    """Records from JSON lines; raise :class:`SchemaError` naming the line and field."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield from _decode(line)
        except SchemaError as exc:
            raise SchemaError(f"line {number}: {exc}", f"line {number}: {exc.path}") from None


class _Replay:
    """The engines and the stream's clock: every input applied as the live mesh applies it."""

    def __init__(self, engine: DecisionEngine, weights: WeightEngine | None, paths: PathEngine,
                 tick_seconds: float) -> None:
        self.engine = engine
        self.weights = weights
        self.paths = paths
        engine.extra_evidence = paths.evidence
        self.tick_seconds = tick_seconds
        self.now = -math.inf
        self.next_tick = math.inf
        self.explicit = False  # journal records seen: they carry the ticks
        self.epoch = 0
        self.pending: list[Observation] = []

    def _out(self, changes: Changes) -> list[Verdict | WeightChange]:
        verdicts, weight_changes = changes
        return [*published(verdicts, self.weights, self.epoch), *weight_changes]

    def flush(self) -> list[Verdict | WeightChange]:
        if not self.pending:
            return []
        batch, self.pending = self.pending, []
        return self._out(apply_batch(self.engine, self.weights, self.paths, batch, now=self.now))

    def advance(self, at: float) -> list[Verdict | WeightChange]:
        """Move stream time to ``at`` (never back), ticking on the way unless explicit."""
        at = max(at, self.now)
        out: list[Verdict | WeightChange] = []
        if at > self.now:
            out += self.flush()
            if not self.explicit:
                out += self._ticks_until(at)
            self.now = at
        return out

    def _ticks_until(self, at: float) -> list[Verdict | WeightChange]:
        out: list[Verdict | WeightChange] = []
        step = self.tick_seconds
        if self.next_tick == math.inf:
            self.next_tick = at + step
        ticks = 0
        while self.next_tick <= at:
            ticks += 1
            if ticks > MAX_TICKS_PER_GAP:
                self.next_tick += math.floor((at - self.next_tick) / step) * step
            out += self._out(apply_tick(self.engine, self.weights, self.next_tick))
            self.next_tick += step
        return out

    def apply(self, item: Recorded) -> list[Verdict | WeightChange]:
        if isinstance(item, JournalRecord):
            self.explicit = True
            out = self.advance(item.now)
            out += self.flush()
            self.epoch = item.epoch
            if item.batch is not None:
                b = item.batch
                changes = apply_batch(self.engine, self.weights, self.paths, b.observations,
                                      traces=b.traces, now=self.now)
            elif item.admin is not None:
                if item.admin.node not in self.engine.nodes:
                    raise SchemaError(f"admin action on unknown node {item.admin.node!r}",
                                      "$.admin.node")
                changes = apply_admin(self.engine, self.weights, item.admin, self.now)
            else:
                changes = apply_tick(self.engine, self.weights, self.now)
            return out + self._out(changes)
        if isinstance(item, ObservationBatch):
            out = self.advance(item.sent_at)
            out += self.flush()
            return out + self._out(apply_batch(self.engine, self.weights, self.paths,
                                               item.observations, traces=item.traces,
                                               now=self.now))
        out = self.advance(item.wall_time)
        self.pending.append(item)
        return out


def _drive(state: _Replay, records: Iterable[Recorded]) -> Iterator[Verdict | WeightChange]:
    for item in records:
        yield from state.apply(item)
    yield from state.flush()


def replay(
    policy: DecisionPolicy,
    nodes: Sequence[NodeInfo],
    records: Iterable[Recorded],
    tick_seconds: float = 1.0,
    *,
    weights: WeightEngine | None = None,
    paths: PathEngine | None = None,
) -> Iterator[Verdict]:
    """The verdict changes of a recorded stream, as the live mesh logged them (with the live
    mesh's weight engine and path engine, when given, the verdicts carry their weights and path
    evidence as the live ones did)."""
    if paths is None:
        paths = PathEngine(PathPolicy(), EMPTY, {n.node for n in nodes})
    state = _Replay(DecisionEngine(policy, nodes), weights, paths, tick_seconds)
    for change in _drive(state, records):
        if isinstance(change, Verdict):
            yield change


def replay_weights(
    policy: DecisionPolicy,
    nodes: Sequence[NodeInfo],
    weight_policy: WeightPolicy,
    weight_nodes: Sequence[WeightNode],
    records: Iterable[Recorded],
    *,
    tick_seconds: float = 1.0,
) -> Iterator[WeightChange]:
    """The weight changes of a recorded stream (its load reads and the verdicts they meet)."""
    paths = PathEngine(PathPolicy(), EMPTY, {n.node for n in nodes})
    state = _Replay(DecisionEngine(policy, nodes), WeightEngine(weight_policy, weight_nodes),
                    paths, tick_seconds)
    for change in _drive(state, records):
        if isinstance(change, WeightChange):
            yield change
