"""The decision policy: every knob of the decision engine, with defaults and validation.

The mesh config embeds :class:`DecisionPolicy` as its ``decision:`` section. Importing this module
has no side effects. :func:`validate_policy` raises :class:`PolicyError` whose ``path`` names the
offending field (``decision.damping.reuse``), so a config loader can report it as is.

Where the defaults come from (see shared/reference/peer-systems.md):

* ``rise`` 2 / ``fall`` 3 are HAProxy's;
* ``fall_definitive`` 2 for answers that say "nothing here" (TCP RST, ICMP unreachable): loss
  cannot fabricate those, unlike a timeout (HAProxy's nearest precedent: ``observe layer4`` with
  ``on-error sudden-death``, hard errors leave a server one failed check away from down);
* the k-of-n window is Azure Front Door's "successful samples of the last sample size", used
  here for failures: a check goes down when ``window_failures`` of its last ``window`` results
  failed;
* damping is RFC 2439 scaled to health checks (the go-micro numbers: penalty per flap, half-life in
  seconds rather than minutes), with Cisco's ratios (suppress 2x penalty, reuse 0.75x, max hold
  4x half-life);
* ``quorum.mode: percent`` is Route 53's "healthy if more than 18 % of checkers see it healthy";
* the pool guard is Envoy's panic threshold / max ejection share, and Cloudflare's 2025 lesson.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec

from probes.duration import Duration
from probes.mesh.state import QUALITY_REASONS
from probes.model import AGENT_SIDE_REASONS, Reason, Tier

QuorumMode = Literal["majority", "percent"]


class PolicyError(ValueError):
    """A policy value is out of range. ``path`` names the field, e.g. ``decision.rise``."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class DampingPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """RFC 2439-style flap damping per (node, vantage, check).

    Every transition of a check to down adds ``penalty``; the accumulated figure halves every
    ``half_life_seconds``. Above ``suppress`` the check is held down until the figure decays below
    ``reuse``, but never longer than ``max_hold_seconds`` after the suppression began.
    """

    enabled: bool = True
    penalty: float = 1000.0
    half_life_seconds: Duration = 60.0
    suppress: float = 2000.0
    reuse: float = 750.0
    max_hold_seconds: Duration = 240.0


class QualityBounds(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Quality figures beyond which a passing check makes its vantage see the node DEGRADED."""

    max_loss_ratio: float = 0.001  # in-tunnel loss above 0.1 %
    max_rtt_p99_seconds: Duration = 0.15


class QuorumPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How vantages vote.

    ``majority``: DOWN when more than half of the voters see the node down; DEGRADED when more than
    half see it down or degraded; UP otherwise. ``percent``: UP when more than ``healthy_percent``
    of the voters see it UP, DEGRADED when more than that share see it UP or DEGRADED, DOWN
    otherwise (Route 53 uses 18). With fewer than ``min_voters`` voters the node keeps its last
    verdict and is flagged ``quorum_lost``.
    """

    mode: QuorumMode = "majority"
    healthy_percent: float = 18.0
    min_voters: int = 2


class ImpairmentPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """When a vantage is judged impaired (its own problem, not the fleet's) and left out of votes.

    Judged from *contrary evidence*: a node the vantage sees DOWN counts against it when, for
    the checks it sees failing, the peers that probed the node since (after this vantage saw it
    fail) and saw it pass are a strict majority of the vantages with such fresh evidence, this
    vantage included. Peers that have not probed it since, are stale, or fail too are never
    evidence against it; a peer failing the same check agrees with it. The vantage is
    *contradicted* when such nodes are at least ``down_share`` of the nodes it counts (those
    contradicted plus those it sees UP), and it probes at least ``min_nodes`` nodes.

    Hysteresis: a vantage becomes impaired only after it has been contradicted for
    ``confirm_seconds``, and stops being impaired only after ``release_seconds`` without.
    """

    down_share: float = 0.5
    min_nodes: int = 3
    confirm_seconds: Duration = 2.0
    release_seconds: Duration = 4.0


class StateLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How much state one agent can make the engine keep, and when state that stopped
    reporting is forgotten (one agent once made 400,000 check states: +238 MiB, never freed).

    Nodes are bounded by the config (observations about others are dropped and counted); per
    (node, agent) at most ``max_checks_per_node`` distinct checks are kept — a new one beyond
    that first replaces checks the agent has not reported for ``forget_after_seconds``, else
    it is dropped and counted (``check-limit``); a (node, agent) pair that has reported nothing
    for ``forget_after_seconds`` is forgotten with its checks. 0 keeps state forever."""

    max_checks_per_node: int = 32
    forget_after_seconds: Duration = 86_400.0


class PoolGuardPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Never let more than ``max_down_share`` of a pool be DOWN at once (at least one node may)."""

    max_down_share: float = 0.5


# The tiers of check kinds for observations that do not say (agents that predate the ``tier``
# field), by longest prefix. Agents send the tier each kind declares; a test walks every kind
# and holds this table to it.
LEGACY_TIERS: dict[str, Tier] = {
    "tcp": Tier.L4,
    "udp": Tier.L4,
    "icmp": Tier.L4,
    "wireguard": Tier.FUNCTIONAL,
    "wireguard.session": Tier.SESSION,
    "wireguard.egress": Tier.SESSION,
    "wireguard.dns": Tier.SESSION,
    "wireguard.throughput": Tier.SESSION,
    "wireguard.transaction": Tier.SESSION,
    "openvpn": Tier.FUNCTIONAL,
    "openvpn.session": Tier.SESSION,
    "openvpn.tunnel": Tier.SESSION,
    "openvpn.egress": Tier.SESSION,
    "openvpn.dns": Tier.SESSION,
    "openvpn.throughput": Tier.SESSION,
    "openvpn.transaction": Tier.SESSION,
    "ikev2": Tier.FUNCTIONAL,
    "ikev2.tunnel": Tier.SESSION,
    "ikev2.egress": Tier.SESSION,
    "ikev2.dns": Tier.SESSION,
    "ikev2.throughput": Tier.SESSION,
    "ikev2.transaction": Tier.SESSION,
    "ikev2.policy": Tier.POLICY,
    "openvpn.policy": Tier.POLICY,
    "quic": Tier.FUNCTIONAL,
    "quic.connect-udp": Tier.SESSION,
    "quic.connect-ip": Tier.SESSION,
    "mtu": Tier.SESSION,
    "telemetry": Tier.TELEMETRY,
    "telemetry.load": Tier.LOAD,
}


def _longest_prefix(table: dict[str, Tier], kind: str) -> Tier | None:
    best = ""
    tier = None
    for prefix, mapped in table.items():
        if len(prefix) > len(best) and kind.startswith(prefix):
            best, tier = prefix, mapped
    return tier


class DecisionPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``decision:`` section of the mesh config."""

    rise: int = 2
    fall: int = 3
    # definitive failures: answers from the node, or a router in front of it, that nothing
    # serves the port (TCP RST, ICMP port/host unreachable). Random loss can delay an answer
    # into a timeout but cannot fabricate one of these, so ``fall_definitive`` of them in a row
    # take a check down, where timeouts still need ``fall``. 0 turns it off; at or above
    # ``fall`` it changes nothing. Consecutive mode only: a k-of-n ``window`` replaces both.
    # Per vantage only, like ``fall``: the vote across vantages is unchanged.
    fall_definitive: int = 2
    # the failure reasons that count as definitive; ``ok``, the quality reasons and the
    # agent-side ones (``overloaded``, ``probe-error``) are no answer from the node: rejected
    definitive_reasons: tuple[Reason, ...] = (Reason.REFUSED, Reason.ICMP_UNREACHABLE)
    window: int = 0  # k-of-n window size n; 0 turns it off (then ``fall`` consecutive failures)
    window_failures: int = 0  # k: failures among the last ``window`` results that take a check down
    # corroboration: when this many *distinct* checks of a node, seen from one vantage, are failing
    # at once (each one's latest results failed, the last within ``corroboration_window_seconds``),
    # they all go down together, as if each had failed ``fall`` times: a silent node fails every
    # check at once, and waiting for one check's ``fall`` timeouts in a row is what made its
    # detection slow. 0 turns it off. Per vantage only: the vote across vantages is unchanged.
    corroboration: int = 0
    corroboration_window_seconds: Duration = 3.0
    damping: DampingPolicy = msgspec.field(default_factory=DampingPolicy)
    quality: QualityBounds = msgspec.field(default_factory=QualityBounds)
    quorum: QuorumPolicy = msgspec.field(default_factory=QuorumPolicy)
    stale_after_seconds: Duration = 30.0
    # observations older than this when they arrive (agent wall clock vs mesh clock: spooled
    # through a partition, say) are not evidence of the present and are dropped; 0 keeps them all
    max_age_seconds: Duration = 120.0
    impairment: ImpairmentPolicy = msgspec.field(default_factory=ImpairmentPolicy)
    # a node's probe verdict never changes twice within this many seconds: a change that comes
    # sooner waits until the dwell has passed (operator actions are not held; the first verdict
    # after UNKNOWN starts no dwell). 0 turns it off
    min_dwell_seconds: Duration = 4.0
    # a change into DEGRADED waits this long (the candidate must hold): on its way down a
    # failing node shows a mix of DOWN, DEGRADED and UP opinions (vantages learn at different
    # moments; a probe in flight at the fault measures loss, and that vantage says DEGRADED
    # until its next result: up to an interval plus a timeout) that votes DEGRADED for a
    # moment, and the DOWN right after it would then wait for the dwell. Quality is not urgent:
    # a lasting problem is DEGRADED this much later (a first verdict is not held). 0: at once
    degraded_confirm_seconds: Duration = 5.0
    pool_guard: PoolGuardPolicy = msgspec.field(default_factory=PoolGuardPolicy)
    limits: StateLimits = msgspec.field(default_factory=StateLimits)
    # overrides: check-kind prefix -> tier, the longest matching prefix wins over the tier the
    # agent sends with the observation (for special cases; empty: the kinds' own tiers)
    tiers: dict[str, Tier] = msgspec.field(default_factory=dict)
    # the tier of a kind neither an override nor the agent names (nor the table of kinds older
    # agents send without their tier)
    default_tier: Tier = Tier.FUNCTIONAL

    def tier_of(self, kind: str, sent: Tier | None = None) -> Tier:
        """A check kind's tier: an override of ``tiers`` (longest prefix: "wireguard.session"
        beats "wireguard"), else the one the agent ``sent``, else the built-in table of kinds
        older agents send without their tier, else ``default_tier``."""
        tier = _longest_prefix(self.tiers, kind) if self.tiers else None
        if tier is None:
            tier = sent or _longest_prefix(LEGACY_TIERS, kind) or self.default_tier
        return tier


def _positive(value: float, path: str) -> None:
    if not value > 0:
        raise PolicyError(f"must be > 0, got {value}", path)


def _share(value: float, path: str, *, allow_zero: bool = False) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        low = "[0" if allow_zero else "(0"
        raise PolicyError(f"must be a share in {low}, 1], got {value}", path)


def finite_fields(struct: msgspec.Struct, path: str) -> None:
    """NaN and infinities compare false with everything and would slip past every range check."""
    for name in struct.__struct_fields__:
        value = getattr(struct, name)
        if isinstance(value, msgspec.Struct):
            finite_fields(value, f"{path}.{name}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise PolicyError(f"must be a finite number, got {value}", f"{path}.{name}")


def validate_policy(policy: DecisionPolicy, prefix: str = "decision") -> DecisionPolicy:
    """Check ranges and cross-field rules; raise :class:`PolicyError` naming the field."""
    p = prefix
    finite_fields(policy, p)
    if policy.rise < 1:
        raise PolicyError(f"must be >= 1, got {policy.rise}", f"{p}.rise")
    if policy.fall < 1:
        raise PolicyError(f"must be >= 1, got {policy.fall}", f"{p}.fall")
    if not 0 <= policy.fall_definitive <= 64:
        raise PolicyError(
            f"must be 0 (off) or 1..64, got {policy.fall_definitive}", f"{p}.fall_definitive"
        )
    for reason in policy.definitive_reasons:
        if reason == Reason.OK or reason in QUALITY_REASONS or reason in AGENT_SIDE_REASONS:
            # a pass, a quality figure or the agent's own trouble is no answer from the node
            raise PolicyError(
                f"{reason.value!r} is not a failure the node answers with",
                f"{p}.definitive_reasons",
            )
    if not 0 <= policy.window <= 64:
        raise PolicyError(f"must be 0 (off) or 1..64, got {policy.window}", f"{p}.window")
    if policy.window:
        if not 1 <= policy.window_failures <= policy.window:
            raise PolicyError(
                f"must be in 1..window ({policy.window}), got {policy.window_failures}",
                f"{p}.window_failures",
            )
    elif policy.window_failures:
        raise PolicyError("set only together with window", f"{p}.window_failures")
    if policy.corroboration == 1 or policy.corroboration < 0:
        raise PolicyError(
            f"must be 0 (off) or >= 2 distinct checks, got {policy.corroboration}",
            f"{p}.corroboration",
        )
    _positive(policy.corroboration_window_seconds, f"{p}.corroboration_window_seconds")
    d = policy.damping
    _positive(d.penalty, f"{p}.damping.penalty")
    _positive(d.half_life_seconds, f"{p}.damping.half_life_seconds")
    _positive(d.reuse, f"{p}.damping.reuse")
    if d.suppress <= d.reuse:
        raise PolicyError(
            f"must be above reuse ({d.reuse}), got {d.suppress}", f"{p}.damping.suppress"
        )
    _positive(d.max_hold_seconds, f"{p}.damping.max_hold_seconds")
    # RFC 2439's ceiling (the penalty that decays to reuse in max_hold) must exceed suppress,
    # or damping could never trigger
    # (compared in log2 space: 2 ** (max_hold / half_life) overflows a float for short half-lives)
    if d.enabled and d.max_hold_seconds / d.half_life_seconds <= math.log2(d.suppress / d.reuse):
        raise PolicyError(
            f"too short for half_life {d.half_life_seconds} s: the penalty ceiling "
            f"reuse * 2^(max_hold / half_life) stays below suppress {d.suppress}",
            f"{p}.damping.max_hold_seconds",
        )
    q = policy.quality
    _share(q.max_loss_ratio, f"{p}.quality.max_loss_ratio", allow_zero=True)
    _positive(q.max_rtt_p99_seconds, f"{p}.quality.max_rtt_p99_seconds")
    qu = policy.quorum
    if not 0 <= qu.healthy_percent < 100:
        raise PolicyError(
            f"must be in [0, 100), got {qu.healthy_percent}", f"{p}.quorum.healthy_percent"
        )
    if qu.min_voters < 1:
        raise PolicyError(f"must be >= 1, got {qu.min_voters}", f"{p}.quorum.min_voters")
    _positive(policy.stale_after_seconds, f"{p}.stale_after_seconds")
    if policy.max_age_seconds < 0:
        raise PolicyError(f"must be >= 0, got {policy.max_age_seconds}", f"{p}.max_age_seconds")
    _share(policy.impairment.down_share, f"{p}.impairment.down_share")
    if policy.impairment.min_nodes < 1:
        raise PolicyError(
            f"must be >= 1, got {policy.impairment.min_nodes}", f"{p}.impairment.min_nodes"
        )
    for name in ("confirm_seconds", "release_seconds"):
        if getattr(policy.impairment, name) < 0:
            raise PolicyError(f"must be >= 0, got {getattr(policy.impairment, name)}",
                              f"{p}.impairment.{name}")
    for name in ("min_dwell_seconds", "degraded_confirm_seconds"):
        if getattr(policy, name) < 0:
            raise PolicyError(f"must be >= 0, got {getattr(policy, name)}", f"{p}.{name}")
    _share(policy.pool_guard.max_down_share, f"{p}.pool_guard.max_down_share")
    limits = policy.limits
    if limits.max_checks_per_node < 1:
        raise PolicyError(f"must be >= 1, got {limits.max_checks_per_node}",
                          f"{p}.limits.max_checks_per_node")
    # forgetting must never touch state that still matters: a stale vantage, a late result,
    # a check held down by damping
    floor = max(policy.stale_after_seconds, policy.max_age_seconds, d.max_hold_seconds)
    if limits.forget_after_seconds and limits.forget_after_seconds < floor:
        raise PolicyError(f"must be 0 (never) or >= {floor:g} (stale_after, max_age and "
                          f"damping.max_hold), got {limits.forget_after_seconds}",
                          f"{p}.limits.forget_after_seconds")
    for prefix_ in policy.tiers:
        if not prefix_:
            raise PolicyError("empty prefix", f"{p}.tiers")
    return policy


def policy_from_mapping(data: object, prefix: str = "decision") -> DecisionPolicy:
    """Build and validate a policy from a parsed YAML/JSON mapping (``None`` means defaults)."""
    if data is None:
        return DecisionPolicy()
    try:
        policy = msgspec.convert(data, DecisionPolicy)
    except msgspec.ValidationError as exc:
        text = str(exc)
        path = prefix
        marker = " - at `$"
        if marker in text:
            path = prefix + text.split(marker, 1)[1].rstrip("`")
            text = text.split(" - at `", 1)[0]
        raise PolicyError(text, path) from None
    return validate_policy(policy, prefix)
