"""The decision engine's state objects, and the small-int codes they use.

There are nodes x vantages x checks of these, so each is a ``__slots__`` class holding plain values:
:class:`CheckState` per (node, vantage, check), :class:`NodeVantage` per (node, vantage),
:class:`VantageState`, :class:`PoolState` and :class:`NodeState`. The rules that change them live in
:mod:`probes.mesh.decision`; the evidence and views that read them in :mod:`probes.mesh.evidence`.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import msgspec

from probes.model import Reason, Tier, Verdict, VerdictState, Votes

# check states (small ints: compact and fast to compare)
CHECK_UNKNOWN = 0
CHECK_UP = 1
CHECK_DOWN = 2
CHECK_STATE_NAMES = ("UNKNOWN", "UP", "DOWN")

# opinions of one vantage about one node
OP_NONE = 0
OP_UP = 1
OP_DEGRADED = 2
OP_DOWN = 3
OPINION_NAMES = ("NONE", "UP", "DEGRADED", "DOWN")

# failure reasons that mean "the tunnel works, but badly": quality, not availability
# (a throughput burst's results included: DEGRADED bounds, never DOWN on their own)
QUALITY_REASONS = frozenset({Reason.TUNNEL_LOSS, Reason.TUNNEL_RTT, Reason.THROUGHPUT_LOW,
                             Reason.QUEUEING_DELAY, Reason.REFLECTOR_NO_REPLY})

MAX_REASONS = 32  # evidence items per verdict: enough to explain, bounded for the log

ADMIN_STATES = (VerdictState.DRAINING, VerdictState.MAINTENANCE)


class NodeInfo(msgspec.Struct, frozen=True):
    """What the engine knows about a node before any observation: where it belongs."""

    node: str
    pool: str
    pop: str = ""
    region: str = ""


class CheckState:
    """Per (node, vantage, check) state. Compact on purpose: there are nodes x vantages x checks."""

    __slots__ = (
        "breach",
        "count",
        "fail_since",
        "kind",
        "loss",
        "name",
        "nv",
        "p99",
        "pass_at",
        "penalty",
        "penalty_at",
        "reason",
        "seen",
        "seq",
        "state",
        "suppress_start",
        "suppressed_until",
        "tier",
        "window",
    )

    def __init__(self, name: str, kind: str, tier: Tier, nv: NodeVantage) -> None:
        self.name = name
        self.kind = kind
        self.tier = tier
        self.nv = nv
        self.state = CHECK_UNKNOWN
        self.count = 0  # consecutive results against the current state
        self.window = 0  # last n results as bits, 1 = failure (k-of-n)
        self.seq = -1
        self.seen = -math.inf
        self.reason: Reason = Reason.OK
        self.breach = False  # latest quality crossed a bound
        self.loss: float | None = None
        self.p99: float | None = None
        self.penalty = 0.0
        self.penalty_at = 0.0
        self.suppressed_until = -math.inf
        self.suppress_start = -math.inf
        # evidence times, agent wall clock at the probe's start: the first failure of the
        # current run of failures (inf while the latest result passed) and the latest pass
        self.fail_since = math.inf
        self.pass_at = -math.inf

    # snapshots pickle hundreds of thousands of these: a plain tuple of the slots is several
    # times cheaper than pickle's default (a dict per object)
    def __getstate__(self) -> tuple[Any, ...]:
        state: tuple[Any, ...] = _check_slots(self)
        return state

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for name, value in zip(CheckState.__slots__, state, strict=True):
            setattr(self, name, value)

    def effective(self, now: float) -> int:
        """The state the cascade uses: a damped check is down while suppressed."""
        return CHECK_DOWN if now < self.suppressed_until else self.state


class NodeVantage:
    """Per (node, vantage): its checks and the opinion the tier cascade derived from them."""

    __slots__ = ("checks", "dirty", "fresh", "node", "opinion", "seen", "vantage", "wheeled")

    def __init__(self, node: NodeState, vantage: VantageState) -> None:
        self.node = node
        self.vantage = vantage
        self.checks: list[CheckState] = []
        self.seen = -math.inf
        self.opinion = OP_NONE
        self.fresh = False  # as of the node's last evaluation
        self.dirty = False
        self.wheeled = False  # registered in the engine's staleness wheel

    def __getstate__(self) -> tuple[Any, ...]:
        state: tuple[Any, ...] = _nv_slots(self)
        return state

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for name, value in zip(NodeVantage.__slots__, state, strict=True):
            setattr(self, name, value)


_check_slots = operator.attrgetter(*CheckState.__slots__)
_nv_slots = operator.attrgetter(*NodeVantage.__slots__)
# a check's row in the engine's rows: its slots but the reference to its (node, vantage), which
# the row names instead, in slot order
CHECK_ROW_FIELDS = tuple(slot for slot in CheckState.__slots__ if slot != "nv")
check_row = operator.attrgetter(*CHECK_ROW_FIELDS)


class VantageState:
    __slots__ = ("contradicted", "decided", "down", "impaired", "name", "nvs", "seen", "since")

    def __init__(self, name: str) -> None:
        self.name = name
        self.nvs: list[NodeVantage] = []
        self.decided = 0  # nodes this vantage has an opinion about
        self.down = 0  # ... of which it sees DOWN
        self.impaired = False
        self.contradicted = False  # its peers' fresh evidence says otherwise (last judgement)
        self.since = -math.inf  # when ``contradicted`` last changed (mesh time)
        self.seen = -math.inf


class PoolState:
    __slots__ = ("down", "held", "name", "nodes")

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[NodeState] = []
        self.down = 0  # nodes whose probe verdict is DOWN
        self.held: dict[str, NodeState] = {}  # nodes the guard keeps from going DOWN

    def allowed_down(self, share: float) -> int:
        return max(1, math.floor(share * len(self.nodes) + 1e-9))


class NodeState:
    __slots__ = (
        "admin",
        "changed_at",
        "degraded_since",
        "dirty",
        "guard_hold",
        "info",
        "last",
        "nvs",
        "pool",
        "probe_state",
        "quorum_lost",
        "seq",
        "state",
        "votes",
    )

    def __init__(self, info: NodeInfo, pool: PoolState) -> None:
        self.info = info
        self.pool = pool
        self.nvs: dict[str, NodeVantage] = {}
        self.probe_state = VerdictState.UNKNOWN  # what the probes say (after the guard)
        self.admin: VerdictState | None = None
        self.state = VerdictState.UNKNOWN  # what is published: admin state or probe state
        self.quorum_lost = True  # never decided = no quorum yet
        self.guard_hold = False
        self.seq = 0
        self.votes = Votes()
        self.last: Verdict | None = None
        self.dirty = False
        self.changed_at = -math.inf  # last change of probe_state (the dwell counts from it)
        self.degraded_since = math.inf  # since when the vote has wanted DEGRADED (inf: not)


class AuditNote(msgspec.Struct, frozen=True, omit_defaults=True):
    """Something the engine decided that changes no published state, for the audit log,
    metrics and the API (never for balancers): ``what`` is ``quorum-lost``,
    ``quorum-regained``, ``impaired``, ``impairment-cleared`` or ``dwell-held``; and from the
    path engine beside it ``path-localised`` (probes/mesh/paths.py)."""

    at: float
    what: str
    node: str = ""
    vantage: str = ""
    state: str = ""
    note: str = ""


AUDIT_WHAT = ("quorum-lost", "quorum-regained", "impaired", "impairment-cleared", "dwell-held")


class CorroborationAsk(msgspec.Struct, frozen=True):
    """A check of ``node`` began failing at ``vantage`` (agent wall clock ``since``): the other
    vantages that probe the node, with the checks each should re-probe now."""

    node: str
    check: str
    vantage: str
    since: float
    peers: tuple[tuple[str, tuple[str, ...]], ...]
