"""Run the decision engine over a recorded stream of observations (post-incident analysis, tests).

Input: JSON lines, each either one :class:`probes.model.Observation` or a whole
:class:`probes.model.ObservationBatch` (its observations are taken in order). Time comes from the
observations: each is applied at ``now = its wall_time`` (never earlier than the one before), and
the engine ticks every ``tick_seconds`` of stream time in between, as the live mesh would, so
vantages go stale and damped checks are released on the same schedule. Observations sharing a
wall time are applied as one batch. The output is the sequence of verdict changes.

With a weight engine (:func:`replay_weights`) the load reads in the stream (``telemetry.load``)
drive it as in the live mesh (:func:`probes.mesh.weights.follow`: load, then the verdicts'
states, then a tick's step), and the output is the sequence of weight changes: a recorded load
trace in, the same weights out, byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

from probes.mesh.decision import DecisionEngine, NodeInfo
from probes.mesh.policy import DecisionPolicy
from probes.mesh.weight_policy import WeightPolicy
from probes.mesh.weights import WeightEngine, WeightNode, follow, split_load
from probes.model import Observation, SchemaError, Verdict, WeightChange, decode_recorded

MAX_TICKS_PER_GAP = 10_000  # a long silence ticks at its end instead of once per second


def parse_lines(lines: Iterable[bytes]) -> Iterator[Observation]:
    """Observations from JSON lines; raise :class:`SchemaError` naming the line and field."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield from decode_recorded(line)
        except SchemaError as exc:
            raise SchemaError(f"line {number}: {exc}", f"line {number}: {exc.path}") from None


def replay(
    policy: DecisionPolicy,
    nodes: Sequence[NodeInfo],
    observations: Iterable[Observation],
    tick_seconds: float = 1.0,
) -> Iterator[Verdict]:
    """The verdict changes of a recorded stream."""
    for change in _drive(DecisionEngine(policy, nodes), None, observations, tick_seconds):
        if isinstance(change, Verdict):
            yield change


def replay_weights(
    policy: DecisionPolicy,
    nodes: Sequence[NodeInfo],
    weight_policy: WeightPolicy,
    weight_nodes: Sequence[WeightNode],
    observations: Iterable[Observation],
    *,
    tick_seconds: float = 1.0,
) -> Iterator[WeightChange]:
    """The weight changes of a recorded stream (its load reads and the verdicts they meet)."""
    weights = WeightEngine(weight_policy, weight_nodes)
    for change in _drive(DecisionEngine(policy, nodes), weights, observations, tick_seconds):
        if isinstance(change, WeightChange):
            yield change


def _drive(engine: DecisionEngine, weights: WeightEngine | None,
           observations: Iterable[Observation],
           tick_seconds: float) -> Iterator[Verdict | WeightChange]:
    def apply(batch: list[Observation], at: float) -> Iterator[Verdict | WeightChange]:
        checks, loads = split_load(batch)
        verdicts = engine.observe(checks, at)
        yield from verdicts
        if weights is not None:
            yield from follow(weights, loads, verdicts, at, ticked=False)

    def tick(at: float) -> Iterator[Verdict | WeightChange]:
        verdicts = engine.tick(at)
        yield from verdicts
        if weights is not None:
            yield from follow(weights, (), verdicts, at, ticked=True)

    now = -math.inf
    next_tick = math.inf
    pending: list[Observation] = []
    for obs in observations:
        at = max(obs.wall_time, now)
        if pending and at > now:
            yield from apply(pending, now)
            pending = []
        if at > now:
            if next_tick == math.inf:
                next_tick = at + tick_seconds
            ticks = 0
            while next_tick <= at:
                ticks += 1
                if ticks > MAX_TICKS_PER_GAP:
                    skipped = math.floor((at - next_tick) / tick_seconds)
                    next_tick += skipped * tick_seconds
                yield from tick(next_tick)
                next_tick += tick_seconds
            now = at
        pending.append(obs)
    if pending:
        yield from apply(pending, now)
