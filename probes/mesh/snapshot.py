"""Engine snapshots: the whole :class:`DecisionEngine` as flat msgpack rows, and back.

Why not pickle: the engine is a graph of ~10^6 small objects (checks point to their
(node, vantage), which point to their node and vantage...). Pickle walks and memoizes that graph
object by object, which takes seconds at 10,000 nodes x 20 vantages. Here every object becomes a
row of plain values and references become names, so msgspec encodes it in one pass.

What must survive, exactly, for a restart to continue like an uninterrupted run (the restart test
and the replay property test check it): every slot of every state object, the order of every
dict and list the engine iterates (creation order of checks, (node, vantage) pairs and vantages,
the damping and guard registries, the staleness wheel), and the counters. The order of checks
in ``_checks`` is the creation order, from which the creation order of (node, vantage) pairs and
of vantages follows, so those are rebuilt by re-creating them in that order.
"""

from __future__ import annotations

import contextlib
import gc
import operator
from collections.abc import Iterator
from typing import Any

import msgspec

from probes.checks.base import Tier
from probes.mesh.decision import (
    CheckState,
    DecisionEngine,
    NodeInfo,
    NodeVantage,
    VantageState,
)
from probes.mesh.policy import DecisionPolicy
from probes.model import Reason, Verdict, VerdictState, Votes

SNAPSHOT_VERSION = 1

# the CheckState slots stored per row, after (node, vantage), in slot order (_load_checks unpacks
# them in that order); "nv" is the reference, rebuilt from the row's (node, vantage)
_CHECK_FIELDS = tuple(slot for slot in CheckState.__slots__ if slot != "nv")
_check_row = operator.attrgetter(*_CHECK_FIELDS)
_NV_FIELDS = ("seen", "opinion", "fresh", "wheeled")

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class SnapshotError(ValueError):
    """The blob is not a snapshot this build can read."""


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Hundreds of thousands of rows are built and none is garbage: collecting while building
    them only rescans the engine, over and over (it doubles the time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def dump_engine(engine: DecisionEngine, weights: dict[str, Any] | None = None) -> bytes:
    """The engine, and the weight engine's state beside it (``WeightEngine.to_builtins``)."""
    with _no_gc():
        return _dump(engine, weights)


def load_engine(blob: bytes) -> DecisionEngine:
    return load_snapshot(blob)[0]


def load_snapshot(blob: bytes) -> tuple[DecisionEngine, dict[str, Any] | None]:
    """The engine and the weight engine's state (None in a snapshot taken without weights)."""
    with _no_gc():
        return _load(blob)


def _dump(engine: DecisionEngine, weights: dict[str, Any] | None) -> bytes:
    if engine._dirty_nv or engine._dirty_nodes:
        raise RuntimeError("snapshot taken in the middle of an engine call")
    checks = []
    nvs = []
    row_of = _check_row  # enums (reason, tier) encode as their values
    for (node_id, vantage_id, _name), check in engine._checks.items():
        checks.append((node_id, vantage_id, row_of(check)))
    for node_name, node in engine.nodes.items():
        for vantage_name, nv in node.nvs.items():
            nvs.append([node_name, vantage_name, nv.seen, nv.opinion, nv.fresh, nv.wheeled])
    nodes = [
        [
            name,
            node.probe_state.value,
            node.admin.value if node.admin is not None else None,
            node.state.value,
            node.quorum_lost,
            node.guard_hold,
            node.seq,
            msgspec.to_builtins(node.votes),
            msgspec.to_builtins(node.last) if node.last is not None else None,
        ]
        for name, node in engine.nodes.items()
    ]
    state = {
        "version": SNAPSHOT_VERSION,
        "policy": msgspec.to_builtins(engine.policy),
        "registry": [
            [n.info.node, n.info.pool, n.info.pop, n.info.region] for n in engine.nodes.values()
        ],
        "checks": checks,
        "nvs": nvs,
        "vantages": [
            [v.name, v.decided, v.down, v.impaired, v.seen] for v in engine.vantages.values()
        ],
        "nodes": nodes,
        "pools": [[p.name, p.down, list(p.held)] for p in engine.pools.values()],
        "suppressed": [list(key) for key in engine._suppressed],
        "wheel": [
            [key, [[nv.node.info.node, nv.vantage.name] for nv in bucket]]
            for key, bucket in engine._wheel.items()
        ],
        "wheel_keys": list(engine._wheel_keys),
        "vantages_changed": engine._vantages_changed,
        "counters": [getattr(engine, name) for name in _COUNTERS],
        "transitions": [[a, b, n] for (a, b), n in engine.transitions.items()],
        "weights": weights,
    }
    return _encoder.encode(state)


# the engine's counters, in the order a snapshot stores them (the order is the format)
_COUNTERS = (
    "observations_total",
    "unknown_node_total",
    "duplicate_total",
    "late_total",
    "guard_holds_total",
    "damping_suppressions_total",
)


def _load(blob: bytes) -> tuple[DecisionEngine, dict[str, Any] | None]:
    try:
        state: dict[str, Any] = _decoder.decode(blob)
    except msgspec.DecodeError as exc:
        raise SnapshotError(f"not a snapshot: {exc}") from None
    if not isinstance(state, dict) or state.get("version") != SNAPSHOT_VERSION:
        raise SnapshotError("unknown snapshot version")
    policy = msgspec.convert(state["policy"], DecisionPolicy)
    engine = DecisionEngine(policy, [NodeInfo(*row) for row in state["registry"]])
    _load_checks(engine, state["checks"])
    for node_name, vantage, seen, opinion, fresh, wheeled in state["nvs"]:
        nv = engine.nodes[node_name].nvs[vantage]
        nv.seen, nv.opinion, nv.fresh, nv.wheeled = seen, opinion, fresh, wheeled
    for name, decided, down, impaired, seen in state["vantages"]:
        v = engine.vantages[name]
        v.decided, v.down, v.impaired, v.seen = decided, down, impaired, seen
    for name, probe, admin, published, quorum_lost, hold, seq, votes, last in state["nodes"]:
        node = engine.nodes[name]
        node.probe_state = VerdictState(probe)
        node.admin = VerdictState(admin) if admin is not None else None
        node.state = VerdictState(published)
        node.quorum_lost = quorum_lost
        node.guard_hold = hold
        node.seq = seq
        node.votes = msgspec.convert(votes, Votes)
        node.last = msgspec.convert(last, Verdict) if last is not None else None
    for name, down, held in state["pools"]:
        pool = engine.pools[name]
        pool.down = down
        pool.held = {n: engine.nodes[n] for n in held}
    for key in state["suppressed"]:
        engine._suppressed[(key[0], key[1], key[2])] = engine._checks[(key[0], key[1], key[2])]
    for key, members in state["wheel"]:
        engine._wheel[key] = [engine.nodes[n].nvs[v] for n, v in members]
    engine._wheel_keys = list(state["wheel_keys"])
    engine._vantages_changed = state["vantages_changed"]
    for name, value in zip(_COUNTERS, state["counters"], strict=True):
        setattr(engine, name, value)
    engine.transitions = {(a, b): n for a, b, n in state["transitions"]}
    return engine, state.get("weights")


def _load_checks(engine: DecisionEngine, rows: list[list[Any]]) -> None:
    """Re-create checks in creation order; (node, vantage) pairs and vantages follow from it."""
    nodes = engine.nodes
    vantages = engine.vantages
    checks = engine._checks
    reason_of = Reason
    tier_of = Tier
    new = CheckState.__new__
    for node_name, vantage_name, values in rows:
        node = nodes[node_name]
        vantage = vantages.get(vantage_name)
        if vantage is None:
            vantage = vantages[vantage_name] = VantageState(vantage_name)
        nv = node.nvs.get(vantage_name)
        if nv is None:
            nv = node.nvs[vantage_name] = NodeVantage(node, vantage)
            vantage.nvs.append(nv)
        check = new(CheckState)
        check.nv = nv
        # _CHECK_FIELDS, in their order: a slot added to CheckState fails this unpacking, and a
        # mismatched order fails the dump -> load -> dump round trip of the engine property tests
        (
            check.breach,
            check.count,
            check.kind,
            check.loss,
            check.name,
            check.p99,
            check.penalty,
            check.penalty_at,
            reason,
            check.seen,
            check.seq,
            check.state,
            check.suppress_start,
            check.suppressed_until,
            tier,
            check.window,
        ) = values
        check.reason = reason_of(reason)
        check.tier = tier_of(tier)
        nv.checks.append(check)
        checks[(node_name, vantage_name, check.name)] = check
