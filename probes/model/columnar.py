"""The columnar batch: an agent's observations as one array per field (wire format 2).

An agent sends it to a mesh whose batch answers list ``"columnar"`` in ``accepts``; to any other
mesh (and for its first batch) it sends the JSON :class:`probes.model.ObservationBatch`, which
every mesh keeps taking. The signature covers the body's exact bytes, as for JSON.

The body is a msgpack array whose elements are, in this order (:data:`FIELDS`):

=============  ==============================================================================
``version``    2 (:data:`COLUMNAR_VERSION`); any other value is refused
``count``      the number of observations
``agent``      the sending agent, which is every observation's vantage
``batch_seq``  as in JSON; also ``epoch`` and ``sent_at``
``nodes``      table of node names; ``checks``, ``kinds`` (check kinds, ``""`` for none),
               ``reasons`` (:class:`probes.model.Reason` values) and ``phases`` (phase names)
               likewise
``node``       per observation, an index into ``nodes``: unsigned 32-bit little-endian
``check``      index into ``checks``, unsigned 16-bit; ``kind``: into ``kinds``, 16-bit
``tier``       unsigned 8-bit: 0 none sent, else 1 + the position in :data:`TIER_CODES`
``seq``        signed 64-bit; ``wall_time`` and ``duration_seconds``: IEEE float64
``ok``         unsigned 8-bit, 0 or 1; ``reason``: index into ``reasons``, unsigned 8-bit
``phase_count`` per observation, how many phases it has (at most 32), unsigned 8-bit
``phase``      per phase, observation after observation in their order: an index into
               ``phases``, unsigned 16-bit; ``phase_seconds``: its seconds, IEEE float64
``extras``     JSON: ``[[index, {"quality": ..., "detail": ..., "load": ...}]]``
               for the observations that have any of these (indices increasing); may be empty
``traces``     JSON: a list of :class:`probes.model.PathTrace`; may be empty
=============  ==============================================================================

Why this shape: a JSON batch costs the mesh a struct, four strings, a dict and a few numbers per
observation to decode, a re-encode to refuse duplicate keys, and as much again to free; here a
batch decodes to a few tables and flat arrays, and the engine reads its rows straight from
them. Phases are in columns too, as nearly every check's run records some (TCP its
``connect``): as JSON they cost the mesh a dict per observation, several times the rest of
its decode. The rare per-observation objects (quality, detail, load) and the traces stay JSON,
decoded by the same strict decoder as a JSON batch (bounds, duplicate keys refused).

A body says which format it is: it begins with a msgpack array header, which no JSON text
begins with, so the journal keeps bodies as received and replays either.
"""

from __future__ import annotations

import math
import operator
import struct
import sys
from array import array
from collections.abc import Callable, Iterator, Sequence
from itertools import compress, repeat
from typing import Annotated, Any, NoReturn

import msgspec

from probes.model import (
    MAX_DETAIL,
    MAX_PHASE_NAME,
    MAX_PHASES,
    MAX_SECONDS,
    MAX_WALL_TIME,
    SCHEMA_VERSION,
    Name,
    NodeLoad,
    Observation,
    ObservationBatch,
    PathTrace,
    Quality,
    Reason,
    SchemaError,
    Seq,
    Tier,
    WallTime,
    check_traces,
    decode_batch,
    strict_decode,
    traces_decoder,
)

COLUMNAR_VERSION = 2
# a tier's code on the wire is 1 + its position here: append new tiers, never reorder
TIER_CODES: tuple[Tier, ...] = (Tier.L4, Tier.FUNCTIONAL, Tier.SESSION, Tier.TELEMETRY,
                                Tier.LOAD, Tier.POLICY)
_TIER_OF: tuple[Tier | None, ...] = (None, *TIER_CODES)
_CODE_OF_TIER = {tier: code for code, tier in enumerate(_TIER_OF)}
# the first byte of a msgpack array: fixarray, array 16, array 32 (no JSON text begins so)
_ARRAY_HEADS = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])
_LITTLE = sys.byteorder == "little"

# (field, array typecode, the table its values index) of each column, in wire order
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("node", "I", "nodes"),
    ("check", "H", "checks"),
    ("kind", "H", "kinds"),
    ("tier", "B", ""),
    ("seq", "q", ""),
    ("wall_time", "d", ""),
    ("ok", "B", ""),
    ("reason", "B", "reasons"),
    ("duration_seconds", "d", ""),
)
# what each float column holds at most (a value outside [0, bound], or not finite, is refused)
_FLOAT_BOUNDS = {"wall_time": MAX_WALL_TIME, "duration_seconds": MAX_SECONDS,
                 "phase_seconds": MAX_SECONDS}

Table = Annotated[list[Name], msgspec.Meta(max_length=65_535)]
PhaseName = Annotated[str, msgspec.Meta(max_length=MAX_PHASE_NAME)]
# the phase columns, after COLUMNS: one count per observation, then one entry per phase
PHASE_COLUMNS: tuple[tuple[str, str], ...] = (("phase", "H"), ("phase_seconds", "d"))


class _Wire(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True):
    """The body as msgpack decodes it (columns still bytes)."""

    version: int
    count: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
    agent: Name
    batch_seq: Seq
    epoch: Seq
    sent_at: WallTime
    nodes: Annotated[list[Name], msgspec.Meta(max_length=2**32 - 1)]
    checks: Table
    kinds: Table
    reasons: Annotated[list[Reason], msgspec.Meta(max_length=255)]
    phases: Annotated[list[PhaseName], msgspec.Meta(max_length=65_535)]
    node: bytes
    check: bytes
    kind: bytes
    tier: bytes
    seq: bytes
    wall_time: bytes
    ok: bytes
    reason: bytes
    duration_seconds: bytes
    phase_count: bytes
    phase: bytes
    phase_seconds: bytes
    extras: bytes
    traces: bytes


FIELDS: tuple[str, ...] = _Wire.__struct_fields__


class _Head(msgspec.Struct, array_like=True):
    """The first two elements, read before the body's turn (the rest is skipped unchecked)."""

    version: int
    count: int


class Extra(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True,
            gc=False):
    """An observation's fields beyond the columns, where it has any."""

    quality: Quality | None = None
    detail: Annotated[str, msgspec.Meta(max_length=MAX_DETAIL)] = ""
    load: NodeLoad | None = None


_wire_decoder = msgspec.msgpack.Decoder(_Wire)
_head_decoder = msgspec.msgpack.Decoder(_Head)
_extras_decoder = msgspec.json.Decoder(list[tuple[Annotated[int, msgspec.Meta(ge=0)], Extra]])
_encoder = msgspec.msgpack.Encoder()
_json = msgspec.json.Encoder()
_NO_EXTRA = Extra()

# what the decision engine reads of one observation, in this order (a row)
ROW_FIELDS = ("node", "vantage", "check", "seq", "wall_time", "ok", "reason", "quality", "kind",
              "tier")
observation_row = operator.attrgetter(*ROW_FIELDS)
Row = tuple[str, str, str, int, float, Any, Reason, Quality | None, str, Tier | None]


def is_columnar(body: bytes) -> bool:
    """Whether ``body`` is a columnar batch (else it is read as JSON)."""
    return bool(body) and body[0] in _ARRAY_HEADS


def columnar_count(body: bytes) -> int | None:
    """The observation count a columnar body declares, read without decoding the rest (None:
    not readable; the full decode then says why)."""
    try:
        return _head_decoder.decode(body).count
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


class ColumnarBatch:
    """A decoded and validated columnar batch. Its observations are read as :meth:`rows` (the
    engine), :meth:`loads` (the weights) or, whole, :meth:`observations`."""

    __slots__ = ("_extras", "_named", "_numbers", "_phases", "agent", "batch_seq", "count",
                 "epoch", "sent_at", "traces")

    def __init__(self, wire: _Wire, named: dict[str, list[Any]],
                 numbers: dict[str, Sequence[Any]], extras: dict[int, Extra],
                 traces: list[PathTrace]) -> None:
        self.agent = wire.agent
        self.batch_seq = wire.batch_seq
        self.epoch = wire.epoch
        self.sent_at = wire.sent_at
        self.count = wire.count
        self.traces = traces
        self._named = named  # node, check, kind, reason, tier: each value looked up in its table
        self._numbers = numbers  # seq, wall_time, ok, duration_seconds
        self._extras = extras
        # (names table, count, name index, seconds): the dicts are built only by observations()
        self._phases = (wire.phases, wire.phase_count, _numbers("H", wire.phase),
                        numbers["phase_seconds"])

    def rows(self) -> Iterator[Row]:
        """The engine's rows (:data:`ROW_FIELDS`) of the observations that are check results
        (load reads are not: :meth:`loads`), in order, built lazily from the columns."""
        named, numbers = self._named, self._numbers
        quality: list[Quality | None] = [None] * self.count
        for i, extra in self._extras.items():
            quality[i] = extra.quality
        rows: Iterator[Row] = zip(
            named["node"], repeat(self.agent, self.count), named["check"], numbers["seq"],
            numbers["wall_time"], numbers["ok"], named["reason"], quality, named["kind"],
            named["tier"], strict=True)
        loads = [i for i, extra in self._extras.items() if extra.load is not None]
        if loads:
            keep = [True] * self.count
            for i in loads:
                keep[i] = False
            rows = compress(rows, keep)
        return rows

    def loads(self) -> list[tuple[str, NodeLoad]]:
        """The load reads (node, read), in order."""
        nodes = self._named["node"]
        return [(nodes[i], extra.load) for i, extra in self._extras.items()
                if extra.load is not None]

    def observations(self) -> list[Observation]:
        """Every observation, whole, as the JSON batch would have decoded it."""
        named, numbers = self._named, self._numbers
        extras = self._extras
        table, counts, phase, seconds = self._phases
        names = [table[k] for k in phase]
        at = 0
        out = []
        for i, (node, check, kind, tier, seq, wall, ok, reason, duration, n) in enumerate(zip(
                named["node"], named["check"], named["kind"], named["tier"], numbers["seq"],
                numbers["wall_time"], numbers["ok"], named["reason"],
                numbers["duration_seconds"], counts, strict=True)):
            extra = extras.get(i, _NO_EXTRA)
            phases = dict(zip(names[at:at + n], seconds[at:at + n], strict=True))
            at += n
            out.append(Observation(
                node=node, check=check, vantage=self.agent, seq=seq, wall_time=wall,
                ok=bool(ok), reason=reason, duration_seconds=duration, kind=kind, tier=tier,
                phases=phases, quality=extra.quality, detail=extra.detail, load=extra.load))
        return out

    def batch(self) -> ObservationBatch:
        """The same batch as a JSON :class:`ObservationBatch` (journal export, recorders)."""
        return ObservationBatch(version=SCHEMA_VERSION, agent=self.agent,
                                batch_seq=self.batch_seq, sent_at=self.sent_at,
                                observations=self.observations(), epoch=self.epoch,
                                traces=self.traces)


def _field_path(text: str, prefix: str = "$") -> str:
    """A msgspec error's location, with the wire array's positions named (``$[3]`` ->
    ``$.batch_seq``) and put under ``prefix``."""
    marker = " - at `"
    path = text.split(marker, 1)[1].rstrip("`") if marker in text else "$"
    if prefix == "$" and path.startswith("$["):
        index, _, rest = path[2:].partition("]")
        if index.isdigit() and int(index) < len(FIELDS):
            return f"$.{FIELDS[int(index)]}{rest}"
    return prefix + path[1:]


def decode_columnar(data: bytes) -> ColumnarBatch:
    """Decode and validate a columnar body; every failure a :class:`SchemaError` naming the
    field (and the observation's position where one is at fault)."""
    try:
        wire = _wire_decoder.decode(data)
    except UnicodeDecodeError as exc:
        raise SchemaError(f"not valid UTF-8 at byte {exc.start}", "$") from None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise SchemaError(str(exc).split(" - at `", 1)[0], _field_path(str(exc))) from None
    if wire.version != COLUMNAR_VERSION:
        raise SchemaError(f"unsupported columnar batch version {wire.version}", "$.version")
    count = wire.count
    for name, code, _ in COLUMNS:
        raw: bytes = getattr(wire, name)
        width = array(code).itemsize
        if len(raw) != count * width:
            raise SchemaError(f"{len(raw)} bytes where {count} observations take "
                              f"{count * width}", f"$.{name}")
    # each value looked up in its table: the lookup the engine's rows need anyway, and the
    # check of every index (an IndexError names the first one beyond its table)
    named = {name: _looked_up(name, getattr(wire, table), code, getattr(wire, name), count)
             for name, code, table in COLUMNS if table}
    named["tier"] = _looked_up("tier", _TIER_OF, "B", wire.tier, count)
    if wire.ok.translate(None, b"\x00\x01"):
        _refuse_first("ok", wire.ok, lambda v: v > 1, "is not 0 or 1")
    if wire.seq[7::8].translate(None, _POSITIVE_TOP):  # a sign bit set
        seq = _numbers("q", wire.seq)
        _refuse_first("seq", seq, lambda v: v < 0, "is negative")
    numbers: dict[str, Sequence[Any]] = {"seq": _numbers("q", wire.seq), "ok": wire.ok}
    for name, bound in _FLOAT_BOUNDS.items():
        if name != "phase_seconds":
            numbers[name] = _floats(name, getattr(wire, name), bound)
    numbers["phase_seconds"] = _checked_phases(wire)
    extras = _decode_extras(wire.extras, count)
    traces: list[PathTrace] = []
    if wire.traces:
        traces = _strict(traces_decoder, wire.traces, "$.traces")
        check_traces(traces)
    return ColumnarBatch(wire, named, numbers, extras, traces)


def _checked_phases(wire: _Wire) -> array[float]:
    """Check the phase columns (counts, lengths, indexes, seconds, no name twice in one
    observation); the seconds."""
    counts = wire.phase_count
    if len(counts) != wire.count:
        raise SchemaError(f"{len(counts)} bytes where {wire.count} observations take "
                          f"{wire.count}", "$.phase_count")
    # the common batches, at C speed: no phases at all, or one to each observation
    alike = next((n for n in (0, 1) if counts.count(n) == len(counts)), None)
    if alike is not None:
        most, total = alike, alike * len(counts)
    else:
        most, total = max(counts), sum(counts)
        if most > MAX_PHASES:
            _refuse_first("phase_count", counts, lambda v: v > MAX_PHASES,
                          f"is above {MAX_PHASES} phases")
    for name, code in PHASE_COLUMNS:
        raw: bytes = getattr(wire, name)
        width = array(code).itemsize
        if len(raw) != total * width:
            raise SchemaError(f"{len(raw)} bytes where {total} phases take {total * width}",
                              f"$.{name}")
    phase = _numbers("H", wire.phase)
    size = len(wire.phases)
    if total and max(phase) >= size:
        _refuse_first("phase", phase, lambda v: v >= size,
                      f"is beyond the {size} entries of its table")
    if most > 1:  # a name twice in one observation (JSON refuses a duplicate key alike)
        at = 0
        for n in counts:
            if n > 1 and len(set(phase[at:at + n])) < n:
                seen: set[int] = set()
                for k in range(at, at + n):
                    if phase[k] in seen:
                        raise SchemaError(f"phase {wire.phases[phase[k]]!r} repeated in one "
                                          "observation", f"$.phase[{k}]")
                    seen.add(phase[k])
            at += n
    return _floats("phase_seconds", wire.phase_seconds, MAX_SECONDS)


def _numbers(code: str, raw: bytes) -> array[Any]:
    column = array(code, raw)
    if not _LITTLE:
        column.byteswap()
    return column


def _looked_up(name: str, table: Sequence[Any], code: str, raw: bytes, count: int) -> list[Any]:
    """The column's values, each looked up in ``table`` (one value repeated, at C speed, when
    every entry is the same: a batch of one check, kind, tier or reason)."""
    width = len(raw) // count if count else 1
    values: Sequence[int] = raw if code == "B" else _numbers(code, raw)
    try:
        if count and raw.count(raw[:width]) == count:  # all alike (n matches tile the column)
            return [table[values[0]]] * count
        return list(map(table.__getitem__, values))
    except IndexError:
        size = len(table)
        _refuse_first(name, values, lambda v: v >= size, f"is beyond the {size} entries of "
                      f"its table")


# a float64's top byte holds its sign and the high bits of its exponent: a column whose every
# top byte is below its bound's (one pass at C speed over a slice) holds only finite values in
# [0, bound); any other column is checked value by value
_POSITIVE_TOP = bytes(range(0x80))
_BELOW_TOP = {name: bytes(range(struct.pack("<d", bound)[7]))
              for name, bound in _FLOAT_BOUNDS.items()}


def _floats(name: str, raw: bytes, bound: float) -> array[float]:
    column = _numbers("d", raw)
    # a NaN makes the sum NaN (and min/max unreliable); an infinity makes it infinite
    if raw[7::8].translate(None, _BELOW_TOP[name]) and not (
            math.isfinite(sum(column)) and min(column) >= 0.0 and max(column) <= bound):
        _refuse_first(name, column, lambda v: not 0.0 <= v <= bound, f"is outside [0, {bound:g}]")
    return column


def _refuse_first(name: str, values: Sequence[Any], wrong: Callable[[Any], bool],
                  what: str) -> NoReturn:
    """Raise the :class:`SchemaError` naming the first of ``values`` that is ``wrong``."""
    i = next(i for i, v in enumerate(values) if wrong(v))
    raise SchemaError(f"{values[i]!r} {what}", f"$.{name}[{i}]")


def _strict(decoder: msgspec.json.Decoder[Any], data: bytes, at: str) -> Any:
    try:
        return strict_decode(decoder, data)
    except SchemaError as exc:
        raise SchemaError(str(exc), at + exc.path[1:]) from None


def _decode_extras(data: bytes, count: int) -> dict[int, Extra]:
    if not data:
        return {}
    pairs: list[tuple[int, Extra]] = _strict(_extras_decoder, data, "$.extras")
    last = -1
    for k, (i, _) in enumerate(pairs):
        if not last < i < count:
            raise SchemaError(f"observation index {i} not above {last} and below {count}",
                              f"$.extras[{k}][0]")
        last = i
    return dict(pairs)


def columnar_body(agent: str, batch_seq: int, sent_at: float,
                  observations: Sequence[Observation], traces: Sequence[bytes] = (), *,
                  epoch: int = 0) -> bytes | None:
    """The columnar body of a batch (``traces`` already JSON-encoded); None when it cannot
    say it: an observation of another vantage than ``agent`` (the JSON batch then carries it,
    and the mesh refuses it as it always has), or a table beyond its wire size."""
    if any(map(agent.__ne__, map(operator.attrgetter("vantage"), observations))):
        return None
    tables: dict[str, dict[Any, int]] = {"nodes": {}, "checks": {}, "kinds": {}, "reasons": {},
                                         "phases": {}}
    values: dict[str, list[Any]] = {}
    for name, _, table in COLUMNS:
        if table:
            index = tables[table]
            values[name] = [index.setdefault(getattr(o, name), len(index)) for o in observations]
    values["tier"] = [_CODE_OF_TIER[o.tier] for o in observations]
    values["seq"] = [o.seq for o in observations]
    values["wall_time"] = [o.wall_time for o in observations]
    values["ok"] = [int(o.ok) for o in observations]
    values["duration_seconds"] = [o.duration_seconds for o in observations]
    phase_count = [len(o.phases) for o in observations]
    phase_index = tables["phases"]
    phase = [phase_index.setdefault(name, len(phase_index))
             for o in observations for name in o.phases]
    phase_seconds = [seconds for o in observations for seconds in o.phases.values()]
    if (len(tables["checks"]) > 65_535 or len(tables["kinds"]) > 65_535
            or len(phase_index) > 65_535 or max(phase_count, default=0) > 255):
        return None
    columns = []
    for name, code, _ in COLUMNS:
        column = array(code, values[name])
        if not _LITTLE:
            column.byteswap()
        columns.append(column.tobytes())
    for code, numbers in (("B", phase_count), ("H", phase), ("d", phase_seconds)):
        column = array(code, numbers)
        if not _LITTLE:
            column.byteswap()
        columns.append(column.tobytes())
    extras = [(i, Extra(quality=o.quality, detail=o.detail, load=o.load))
              for i, o in enumerate(observations)
              if o.quality is not None or o.detail or o.load is not None]
    return _encoder.encode((
        COLUMNAR_VERSION, len(observations), agent, batch_seq, epoch, sent_at,
        *(list(tables[t]) for t in ("nodes", "checks", "kinds", "reasons", "phases")), *columns,
        _json.encode(extras) if extras else b"",
        b"[" + b",".join(traces) + b"]" if traces else b""))


def decode_received(body: bytes) -> ObservationBatch | ColumnarBatch:
    """A batch body as an agent sent it, in either format, decoded and validated
    (:class:`SchemaError` naming the field)."""
    return decode_columnar(body) if is_columnar(body) else decode_batch(body)


def whole_batch(body: bytes) -> ObservationBatch:
    """A batch body in either format as a JSON :class:`ObservationBatch` (whole objects)."""
    batch = decode_received(body)
    return batch.batch() if isinstance(batch, ColumnarBatch) else batch


_observations_decoder = msgspec.json.Decoder(list[Observation])


def columnar_body_of_json(agent: str, batch_seq: int, sent_at: float, bodies: Sequence[bytes],
                          traces: Sequence[bytes] = (), *, epoch: int = 0) -> bytes | None:
    """:func:`columnar_body` from JSON-encoded observations (an agent's spool keeps them so)."""
    observations = _observations_decoder.decode(b"[" + b",".join(bodies) + b"]")
    return columnar_body(agent, batch_seq, sent_at, observations, traces, epoch=epoch)


__all__ = ["COLUMNAR_VERSION", "FIELDS", "ROW_FIELDS", "TIER_CODES", "ColumnarBatch",
           "Extra", "Row", "columnar_body", "columnar_body_of_json", "columnar_count",
           "decode_columnar", "decode_received", "is_columnar", "observation_row", "whole_batch"]
