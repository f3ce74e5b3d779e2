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
``nodes``      table of node names; ``checks``, ``kinds`` (check kinds, ``""`` for none) and
               ``reasons`` (:class:`probes.model.Reason` values) likewise
``node``       per observation, an index into ``nodes``: unsigned 32-bit little-endian
``check``      index into ``checks``, unsigned 16-bit; ``kind``: into ``kinds``, 16-bit
``tier``       unsigned 8-bit: 0 none sent, else 1 + the position in :data:`TIER_CODES`
``seq``        signed 64-bit; ``wall_time`` and ``duration_seconds``: IEEE float64
``ok``         unsigned 8-bit, 0 or 1; ``reason``: index into ``reasons``, unsigned 8-bit
``extras``     JSON: ``[[index, {"phases": ..., "quality": ..., "detail": ..., "load": ...}]]``
               for the observations that have any of these (indices increasing); may be empty
``traces``     JSON: a list of :class:`probes.model.PathTrace`; may be empty
=============  ==============================================================================

Why this shape: a JSON batch costs the mesh a struct, four strings, a dict and a few numbers per
observation to decode, a re-encode to refuse duplicate keys, and as much again to free; here a
batch decodes to a few tables and flat arrays, and the engine reads its rows straight from
them. The rare per-observation objects (phases, quality, detail, load) and the traces stay JSON,
decoded by the same strict decoder as a JSON batch (bounds, duplicate keys refused).

A body says which format it is: it begins with a msgpack array header, which no JSON text
begins with, so the journal keeps bodies as received and replays either.
"""

from __future__ import annotations

import math
import operator
import sys
from array import array
from collections.abc import Iterator, Sequence
from itertools import compress, repeat
from typing import Annotated, Any

import msgspec

from probes.model import (
    MAX_DETAIL,
    MAX_SECONDS,
    MAX_WALL_TIME,
    SCHEMA_VERSION,
    Name,
    NodeLoad,
    Observation,
    ObservationBatch,
    PathTrace,
    Phases,
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
_FLOAT_BOUNDS = {"wall_time": MAX_WALL_TIME, "duration_seconds": MAX_SECONDS}

Table = Annotated[list[Name], msgspec.Meta(max_length=65_535)]


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
    node: bytes
    check: bytes
    kind: bytes
    tier: bytes
    seq: bytes
    wall_time: bytes
    ok: bytes
    reason: bytes
    duration_seconds: bytes
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

    phases: Phases = msgspec.field(default_factory=dict)
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

    __slots__ = (
        "_columns",
        "_extras",
        "_tables",
        "agent",
        "batch_seq",
        "count",
        "epoch",
        "sent_at",
        "traces",
    )

    def __init__(self, wire: _Wire, columns: dict[str, array[Any]], extras: dict[int, Extra],
                 traces: list[PathTrace]) -> None:
        self.agent = wire.agent
        self.batch_seq = wire.batch_seq
        self.epoch = wire.epoch
        self.sent_at = wire.sent_at
        self.count = wire.count
        self.traces = traces
        self._tables: dict[str, Sequence[Any]] = {
            "nodes": wire.nodes, "checks": wire.checks, "kinds": wire.kinds,
            "reasons": wire.reasons}
        self._columns = columns
        self._extras = extras

    def _named(self, field: str) -> Iterator[Any]:
        """The column's values looked up in its table."""
        table = next(t for name, _, t in COLUMNS if name == field)
        return map(self._tables[table].__getitem__, self._columns[field])

    def rows(self) -> Iterator[Row]:
        """The engine's rows (:data:`ROW_FIELDS`) of the observations that are check results
        (load reads are not: :meth:`loads`), in order, built lazily from the columns."""
        cols = self._columns
        quality: list[Quality | None] = [None] * self.count
        for i, extra in self._extras.items():
            quality[i] = extra.quality
        rows: Iterator[Row] = zip(
            self._named("node"), repeat(self.agent, self.count), self._named("check"), cols["seq"],
            cols["wall_time"], cols["ok"], self._named("reason"), quality,
            self._named("kind"), map(_TIER_OF.__getitem__, cols["tier"]), strict=True)
        loads = [i for i, extra in self._extras.items() if extra.load is not None]
        if loads:
            keep = [True] * self.count
            for i in loads:
                keep[i] = False
            rows = compress(rows, keep)
        return rows

    def loads(self) -> list[tuple[str, NodeLoad]]:
        """The load reads (node, read), in order."""
        nodes = self._tables["nodes"]
        node = self._columns["node"]
        return [(nodes[node[i]], extra.load) for i, extra in self._extras.items()
                if extra.load is not None]

    def observations(self) -> list[Observation]:
        """Every observation, whole, as the JSON batch would have decoded it."""
        cols = self._columns
        extras = self._extras
        out = []
        for i, (node, check, kind, tier, seq, wall, ok, reason, duration) in enumerate(zip(
                self._named("node"), self._named("check"), self._named("kind"),
                map(_TIER_OF.__getitem__, cols["tier"]), cols["seq"], cols["wall_time"],
                cols["ok"], self._named("reason"), cols["duration_seconds"], strict=True)):
            extra = extras.get(i, _NO_EXTRA)
            out.append(Observation(
                node=node, check=check, vantage=self.agent, seq=seq, wall_time=wall,
                ok=bool(ok), reason=reason, duration_seconds=duration, kind=kind, tier=tier,
                phases=dict(extra.phases), quality=extra.quality, detail=extra.detail,
                load=extra.load))
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
    columns: dict[str, array[Any]] = {}
    for name, code, table in COLUMNS:
        column = array(code)
        raw: bytes = getattr(wire, name)
        if len(raw) != count * column.itemsize:
            raise SchemaError(f"{len(raw)} bytes where {count} observations take "
                              f"{count * column.itemsize}", f"$.{name}")
        column.frombytes(raw)
        if not _LITTLE:
            column.byteswap()
        if count:
            _check_column(name, column, table, wire)
        columns[name] = column
    extras = _decode_extras(wire.extras, count)
    traces: list[PathTrace] = []
    if wire.traces:
        traces = _strict(traces_decoder, wire.traces, "$.traces")
        check_traces(traces)
    return ColumnarBatch(wire, columns, extras, traces)


def _check_column(name: str, column: array[Any], table: str, wire: _Wire) -> None:
    """Refuse a value the field cannot hold, naming the first observation that has one."""
    bound = _FLOAT_BOUNDS.get(name)
    if bound is not None:
        # a NaN makes the sum NaN (and min/max unreliable); an infinity makes it infinite
        if math.isfinite(sum(column)) and min(column) >= 0.0 and max(column) <= bound:
            return
        i = next(i for i, v in enumerate(column) if not 0.0 <= v <= bound)
        raise SchemaError(f"{column[i]!r} is outside [0, {bound:g}]", f"$.{name}[{i}]")
    if table:
        size = len(getattr(wire, table))
        if max(column) < size:
            return
        i = next(i for i, v in enumerate(column) if v >= size)
        raise SchemaError(f"index {column[i]} beyond the {size} entries of {table}",
                          f"$.{name}[{i}]")
    high = {"tier": len(TIER_CODES), "ok": 1}.get(name)
    if high is not None and max(column) > high:
        i = next(i for i, v in enumerate(column) if v > high)
        raise SchemaError(f"{column[i]} is not one of 0..{high}", f"$.{name}[{i}]")
    if name == "seq" and min(column) < 0:
        i = next(i for i, v in enumerate(column) if v < 0)
        raise SchemaError(f"{column[i]} is negative", f"$.seq[{i}]")


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
    tables: dict[str, dict[Any, int]] = {"nodes": {}, "checks": {}, "kinds": {}, "reasons": {}}
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
    if len(tables["checks"]) > 65_535 or len(tables["kinds"]) > 65_535:
        return None
    columns = []
    for name, code, _ in COLUMNS:
        column = array(code, values[name])
        if not _LITTLE:
            column.byteswap()
        columns.append(column.tobytes())
    extras = [(i, Extra(phases=o.phases, quality=o.quality, detail=o.detail, load=o.load))
              for i, o in enumerate(observations)
              if o.phases or o.quality is not None or o.detail or o.load is not None]
    return _encoder.encode((
        COLUMNAR_VERSION, len(observations), agent, batch_seq, epoch, sent_at,
        *(list(tables[t]) for t in ("nodes", "checks", "kinds", "reasons")), *columns,
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
