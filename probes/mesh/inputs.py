"""The one way each mesh input meets the engines (decision, weights, path evidence).

The live mesh (:mod:`probes.mesh.service`), its restart replay of the journal and
``tunnelwatch mesh replay`` all apply inputs through here, in one order: a batch's traces, then
its observations (a verdict the batch causes carries what the traces say), then its load reads
and the verdicts' states into the weights (a tick: then the weights' step). So a recorded stream
replays to the verdicts the live mesh logged, byte for byte. Pure: no I/O, time is ``now``.

The live mesh applies a heavy batch's observations, and a tick's staleness wheel, in parts
(:func:`entry_in_parts`), serving other requests between them, and settles once after the last
part: the same verdicts as the input applied at once, which is how a replay applies it.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from typing import TypeVar

import msgspec

from probes.mesh.decision import DecisionEngine, whole
from probes.mesh.paths import PathEngine
from probes.mesh.store import AdminAction, EntryKind, JournalEntry
from probes.mesh.weights import WeightEngine, follow, split_load
from probes.model import (
    NodeLoad,
    Observation,
    ObservationBatch,
    PathTrace,
    Verdict,
    VerdictState,
    WeightChange,
)
from probes.model.columnar import ColumnarBatch, Row, decode_received, observation_row

Changes = tuple[list[Verdict], list[WeightChange]]
T = TypeVar("T")
# an input applied in parts: pauses (yields None) between them, returns the input's result
Steps = Generator[None, None, T]


def observe_with_paths(engine: DecisionEngine, paths: PathEngine, rows: Iterable[Row],
                       traces: Sequence[PathTrace], now: float, *, count: int = 0,
                       part: int = 0) -> Steps[list[Verdict]]:
    """A batch's traces, then its observations: a verdict the batch causes carries what the
    traces say. Only state changes are verdicts, so when traces change where the vantages lose
    a node that is already DOWN or DEGRADED, that goes to the audit notes (and the API and
    metrics, which always show the latest): agents trace at the first failure of a check, so the
    traces usually come before or with the verdict they explain, but not always. More than
    ``part`` rows (``count``: how many at most) are applied ``part`` at a time, pausing between
    parts (:meth:`DecisionEngine.observe_rows_in_parts`); 0: at once."""
    changed = paths.ingest(traces, now) if traces else []
    if 0 < part < count:
        verdicts = yield from engine.observe_rows_in_parts(rows, now, count=count, part=part)
    else:
        verdicts = engine.observe_rows(rows, now)
    published = {v.node for v in verdicts}
    for node in changed:
        if node not in published and engine.nodes[node].state in _EXPLAINED:
            paths.note_news(node, now)
    return verdicts


_EXPLAINED = (VerdictState.DOWN, VerdictState.DEGRADED)


def apply_batch(engine: DecisionEngine, weights: WeightEngine | None, paths: PathEngine,
                observations: Sequence[Observation], *, traces: Sequence[PathTrace] = (),
                now: float) -> Changes:
    return whole(batch_in_parts(engine, weights, paths, observations, traces=traces, now=now))


def batch_in_parts(engine: DecisionEngine, weights: WeightEngine | None, paths: PathEngine,
                   observations: Sequence[Observation], *, traces: Sequence[PathTrace] = (),
                   now: float, part: int = 0) -> Steps[Changes]:
    """:func:`apply_batch`, its observations ``part`` at a time (0: at once), pausing between
    parts; the same changes (:meth:`DecisionEngine.observe_rows_in_parts`)."""
    checks, loads = split_load(observations)
    return (yield from _rows_in_parts(engine, weights, paths, map(observation_row, checks),
                                      loads=loads, traces=traces, now=now, count=len(checks),
                                      part=part))


def _rows_in_parts(engine: DecisionEngine, weights: WeightEngine | None, paths: PathEngine,
                   rows: Iterable[Row], *, loads: Sequence[tuple[str, NodeLoad]],
                   traces: Sequence[PathTrace], now: float, count: int, part: int,
                   ) -> Steps[Changes]:
    verdicts = yield from observe_with_paths(engine, paths, rows, traces, now, count=count,
                                             part=part)
    return verdicts, _follow(weights, loads, verdicts, now, ticked=False)


def apply_tick(engine: DecisionEngine, weights: WeightEngine | None, now: float) -> Changes:
    return whole(tick_in_parts(engine, weights, now))


def tick_in_parts(engine: DecisionEngine, weights: WeightEngine | None, now: float,
                  part: int = 0) -> Steps[Changes]:
    """:func:`apply_tick`, pausing every ``part`` pairs of the staleness wheel (0: never):
    :meth:`DecisionEngine.tick_in_parts`."""
    verdicts = yield from engine.tick_in_parts(now, part)
    return verdicts, _follow(weights, (), verdicts, now, ticked=True)


def apply_admin(engine: DecisionEngine, weights: WeightEngine | None, action: AdminAction,
                now: float) -> Changes:
    verdicts = engine.set_admin(action.node, action.state, now, action.actor)
    return verdicts, _follow(weights, (), verdicts, now, ticked=False)


def apply_entry(engine: DecisionEngine, weights: WeightEngine | None, paths: PathEngine,
                entry: JournalEntry, batch: ObservationBatch | ColumnarBatch | None = None,
                ) -> Changes:
    """Apply one journaled input; ``batch``: a batch entry's, when the caller decoded it. A
    batch body is JSON or columnar (:mod:`probes.model.columnar`); both apply alike."""
    return whole(entry_in_parts(engine, weights, paths, entry, batch))


def entry_in_parts(engine: DecisionEngine, weights: WeightEngine | None, paths: PathEngine,
                   entry: JournalEntry, batch: ObservationBatch | ColumnarBatch | None = None,
                   *, part: int = 0, tick_part: int = 0) -> Steps[Changes]:
    """:func:`apply_entry`, a batch's observations ``part`` at a time and a tick's staleness
    wheel ``tick_part`` pairs at a time (0: at once), pausing between parts (see
    :func:`batch_in_parts`, :func:`tick_in_parts`); an admin action at once."""
    if entry.kind == EntryKind.BATCH:
        if batch is None:
            batch = decode_received(entry.payload)
        # a new instance epoch restarts the agent's observation seqs: the engine must not take
        # them for old duplicates (deterministic: the epoch is in the journal)
        engine.agent_epoch(batch.agent, batch.epoch)
        if isinstance(batch, ColumnarBatch):
            return (yield from _rows_in_parts(
                engine, weights, paths, batch.rows(), loads=batch.loads(), traces=batch.traces,
                now=entry.now, count=batch.count, part=part))
        return (yield from batch_in_parts(engine, weights, paths, batch.observations,
                                          traces=batch.traces, now=entry.now, part=part))
    if entry.kind == EntryKind.TICK:
        return (yield from tick_in_parts(engine, weights, entry.now, tick_part))
    return apply_admin(engine, weights, decode_admin(entry.payload), entry.now)


def published(verdicts: Sequence[Verdict], weights: WeightEngine | None,
              epoch: int) -> list[Verdict]:
    """Verdicts as logged and published: with the store's epoch, and the node's weight as it
    is after them (weights enabled)."""
    out = []
    for verdict in verdicts:
        node = weights.nodes.get(verdict.node) if weights is not None else None
        weight = node.published if node is not None else verdict.weight
        out.append(msgspec.structs.replace(verdict, weight=weight, epoch=epoch))
    return out


def decode_admin(payload: bytes) -> AdminAction:
    return msgspec.json.decode(payload, type=AdminAction)


def _follow(weights: WeightEngine | None, loads: Sequence[tuple[str, NodeLoad]],
            verdicts: list[Verdict], now: float, *, ticked: bool) -> list[WeightChange]:
    if weights is None:
        return []
    return follow(weights, loads, verdicts, now, ticked)
