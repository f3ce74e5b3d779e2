"""The decision engine: observations and ``now`` in, node verdict changes out. Pure and replayable.

Theory of operation
-------------------
The engine is a state machine with three inputs, each taking an explicit ``now``:

* :meth:`DecisionEngine.observe` — a batch of observations that arrived at ``now``;
* :meth:`DecisionEngine.tick` — time passed: stale vantages drop out, damped checks are released;
* :meth:`DecisionEngine.set_admin` — an operator drained, put in maintenance or readied a node.

Each returns the verdict changes it caused. There is no I/O, no clock and no randomness, so the
same sequence of calls yields the same verdicts, bit for bit (the store journals the calls and a
restart replays them; ``tunnelwatch mesh replay`` does the same from a recorded stream).

The layers, bottom up:

1. per (node, vantage, check) — :class:`CheckState`: HAProxy-style rise/fall (``fall`` consecutive
   failures take a check down — ``fall_definitive`` suffice when each was a definitive answer
   (RST, ICMP unreachable: loss cannot fabricate those) — or, with ``corroboration`` n, n distinct
   checks of the node failing at once from the same vantage take them all down; ``rise``
   consecutive successes bring it back,
   one success suffices for a check never decided), or a k-of-n window for going down; RFC 2439
   flap damping: every up->down flap adds a penalty that halves each half-life; above ``suppress``
   the check is held down until the penalty decays below ``reuse`` (never longer than
   ``max_hold``). A failure whose reason is a quality bound (in-tunnel loss / RTT) counts as a
   *pass with bad quality*: quality gives DEGRADED, never DOWN.
2. per (node, vantage) — :class:`NodeVantage`: the tier cascade turns the checks into one opinion:
   any check down -> DOWN (an L4 check up while a handshake or session fails is "alive but
   useless", still DOWN); otherwise a quality bound crossed -> DEGRADED; otherwise UP.
3. per node — the vote across vantages: stale vantages (no report for ``stale_after``) and
   impaired vantages (they see an abnormal share of the fleet down while a strict majority of
   the *other* vantages does not) do not vote; with fewer than ``min_voters`` voters the node
   keeps its last verdict with ``quorum_lost``; otherwise majority or Route-53-style percent
   rule.
4. per pool — the guard: a node may go DOWN only while at most ``max(1, floor(share * size))``
   nodes of its pool are DOWN; beyond that the node keeps its previous verdict and is reported as
   held (Envoy's panic threshold: fail open rather than empty the pool).
5. admin — DRAINING and MAINTENANCE set by an operator are what is published, whatever the probes
   say; the probe verdict keeps being computed underneath and returns on "ready".

Hot path: observations only touch their check state and mark a (node, vantage) dirty when the
check's effective state or quality flag changed; opinions, votes and guard run once per call for
the dirty set only. Steady state (nothing changing) costs one dict lookup and a few attribute writes
per observation.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from itertools import islice
from sys import intern
from typing import Any, TypeVar, cast

import msgspec

from probes.mesh.evidence import evidence, node_view
from probes.mesh.impairment import contradicted
from probes.mesh.policy import DecisionPolicy
from probes.mesh.state import (
    ADMIN_STATES,
    AUDIT_WHAT,
    CHECK_DOWN,
    CHECK_ROW_FIELDS,
    CHECK_STATE_NAMES,
    CHECK_UNKNOWN,
    CHECK_UP,
    MAX_REASONS,
    OP_DEGRADED,
    OP_DOWN,
    OP_NONE,
    OP_UP,
    OPINION_NAMES,
    QUALITY_REASONS,
    AuditNote,
    CheckState,
    CorroborationAsk,
    NodeInfo,
    NodeState,
    NodeVantage,
    PoolState,
    VantageState,
    check_row,
)
from probes.model import (
    AGENT_SIDE_REASONS,
    Observation,
    Reason,
    Tier,
    Verdict,
    VerdictReason,
    VerdictState,
    Votes,
)
from probes.model.columnar import Row, observation_row

__all__ = [
    "CHECK_DOWN",
    "CHECK_STATE_NAMES",
    "CHECK_UNKNOWN",
    "CHECK_UP",
    "OPINION_NAMES",
    "AuditNote",
    "CheckState",
    "CorroborationAsk",
    "DecisionEngine",
    "NodeInfo",
    "NodeState",
    "NodeVantage",
    "PoolState",
    "VantageState",
]


T = TypeVar("T")
# more evidence for a verdict from beside the engine: (node id, now, its impaired vantages)
ExtraEvidence = Callable[[str, float, Sequence[str]], list[VerdictReason]]
MAX_EXPONENT = 1000.0  # 2 ** 1000 is ~1e301: any damping ceiling beyond it is "no ceiling"
MAX_TIER_CACHE = 4096  # (kind, tier sent) pairs whose tier is remembered
# impairment is judged on every input, at most this often: during a mass failure the judgement
# reads each vantage's DOWN opinions, and batches arrive many times a second
JUDGE_EVERY_SECONDS = 0.25
AUDIT_KEPT = 10_000
REASON_OK = Reason.OK  # audit notes kept until taken (a replay that never takes them stays bounded)


class DecisionEngine:
    """The engine state plus the three inputs. See the module docstring."""

    def __init__(self, policy: DecisionPolicy, nodes: Iterable[NodeInfo]) -> None:
        self.policy = policy
        self.nodes: dict[str, NodeState] = {}
        self.pools: dict[str, PoolState] = {}
        self.vantages: dict[str, VantageState] = {}
        self._checks: dict[tuple[str, str, str], CheckState] = {}
        self._tiers: dict[tuple[str, Tier | None], Tier] = {}  # (kind, tier sent) -> tier
        self._dirty_nv: list[NodeVantage] = []
        self._dirty_nodes: list[NodeState] = []
        self._suppressed: dict[tuple[str, str, str], CheckState] = {}  # while damped
        self._wheel: dict[int, list[NodeVantage]] = {}
        self._wheel_keys: list[int] = []  # heap of the wheel's bucket keys
        # stale (node, vantage) pairs by whole second of "seen", forgotten once they have not
        # reported for limits.forget_after_seconds (derived state: rebuilt from rows on load)
        self._forget: dict[int, list[NodeVantage]] = {}
        self._forget_keys: list[int] = []
        self._judged_at = -math.inf  # last impairment judgement (mesh time)
        # nodes whose change waits (the dwell, or a DEGRADED awaiting confirmation)
        self._deferred: dict[str, NodeState] = {}
        self._epochs: dict[str, int] = {}  # vantage -> instance epoch of its latest batch
        # transient, per observe() call: checks whose run of failures began in it (for
        # corroboration_asks); audit notes until taken
        self._onsets: list[CheckState] = []
        self.audit: deque[AuditNote] = deque(maxlen=AUDIT_KEPT)
        # counters for /metrics
        self.observations_total = 0
        self.unknown_node_total = 0
        self.duplicate_total = 0
        self.late_total = 0
        self.agent_side_total = 0  # overloaded / probe-error: the agent's trouble, not the node's
        self.transitions: dict[tuple[str, str], int] = {}
        self.guard_holds_total = 0
        self.damping_suppressions_total = 0
        # state limits (policy.limits); not in snapshots: they start at 0 with the process
        self.check_limit_total = 0  # observations dropped: their (node, agent) had no room
        self.forgotten_checks_total = 0  # check states forgotten: no report for forget_after
        self.audit_totals: dict[str, int] = dict.fromkeys(AUDIT_WHAT, 0)
        # path traces' evidence (probes.mesh.paths), asked for when a verdict is published;
        # set by the service, not engine state
        self.extra_evidence: ExtraEvidence | None = None
        for info in nodes:
            self.add_node(info)

    # ---- registry ---------------------------------------------------------------------------

    def add_node(self, info: NodeInfo) -> None:
        if info.node in self.nodes:
            raise ValueError(f"node {info.node!r} registered twice")
        pool = self.pools.get(info.pool)
        if pool is None:
            pool = self.pools[info.pool] = PoolState(info.pool)
        node = NodeState(info, pool)
        pool.nodes.append(node)
        self.nodes[info.node] = node

    def remove_node(self, node_id: str) -> None:
        """Forget a node (gone from the config), between inputs. Nothing is announced."""
        node = self.nodes.pop(node_id)
        pool = node.pool
        pool.nodes.remove(node)
        pool.held.pop(node_id, None)
        self._deferred.pop(node_id, None)
        if node.probe_state == VerdictState.DOWN:
            pool.down -= 1
        for vantage_name, nv in node.nvs.items():
            vantage = nv.vantage
            vantage.nvs.remove(nv)
            vantage.decided -= nv.opinion != OP_NONE
            vantage.down -= nv.opinion == OP_DOWN
            for check in nv.checks:
                key = (node_id, vantage_name, check.name)
                del self._checks[key]
                self._suppressed.pop(key, None)
        for bucket in self._wheel.values():
            # (an emptied bucket stays, with its heap key: tick pops it harmlessly)
            bucket[:] = [nv for nv in bucket if nv.node is not node]

    def move_node(self, info: NodeInfo) -> None:
        """Apply a node's new pool / pop / region (a config change), keeping its state and seq."""
        node = self.nodes[info.node]
        old = node.pool
        if info.pool != old.name:
            new = self.pools.get(info.pool)
            if new is None:
                new = self.pools[info.pool] = PoolState(info.pool)
            old.nodes.remove(node)
            old.held.pop(info.node, None)
            node.guard_hold = False
            new.nodes.append(node)
            if node.probe_state == VerdictState.DOWN:
                old.down -= 1
                new.down += 1
            node.pool = new
        node.info = info

    def reconfigure(self, policy: DecisionPolicy, nodes: Iterable[NodeInfo]) -> list[str]:
        """Apply a config change between inputs: the new policy (tiers looked up afresh), nodes
        added, moved (state and seq kept) or forgotten. Returns the forgotten nodes."""
        self.policy = policy
        self._tiers.clear()
        nodes = list(nodes)
        wanted = {info.node for info in nodes}
        forgotten = [n for n in self.nodes if n not in wanted]
        for node_id in forgotten:
            self.remove_node(node_id)
        for info in nodes:
            if info.node not in self.nodes:
                self.add_node(info)
            elif self.nodes[info.node].info != info:
                self.move_node(info)
        return forgotten

    def catch_up_seq(self, node_id: str, logged_seq: int) -> int | None:
        """Never re-announce a seq the verdict log already holds: raise the node's seq to
        ``logged_seq`` when it is behind; returns the seq it had then (None: not behind, or
        not a node)."""
        node = self.nodes.get(node_id)
        if node is None or node.seq >= logged_seq:
            return None
        behind, node.seq = node.seq, logged_seq
        return behind

    def agent_epoch(self, vantage: str, epoch: int) -> None:
        """A batch of ``vantage`` came in instance epoch ``epoch``. A newer epoch is an agent
        that lost its state: its observation seqs start again, so the seqs its checks reached
        in the older epoch no longer mark duplicates (the mesh's ingest already refused any
        batch of an older epoch)."""
        if epoch <= self._epochs.get(vantage, 0):
            return
        self._epochs[vantage] = epoch
        state = self.vantages.get(vantage)
        for nv in state.nvs if state is not None else ():
            for check in nv.checks:
                check.seq = -1

    def _new_check(self, node_id: str, vantage_id: str, check_name: str, *, kind: str,
                   tier_sent: Tier | None, now: float) -> CheckState | None:
        """The state of a check seen for the first time; None (counted) for an unknown node
        or when its (node, agent) pair has no room left (policy.limits)."""
        node = self.nodes.get(node_id)
        if node is None:
            self.unknown_node_total += 1
            return None
        nv = node.nvs.get(vantage_id)
        limit = self.policy.limits.max_checks_per_node
        if nv is not None and len(nv.checks) >= limit and not self._forget_unseen_checks(nv, now):
            self.check_limit_total += 1
            return None
        vantage = self.vantages.get(vantage_id)
        if vantage is None:
            vantage = self.vantages[vantage_id] = VantageState(vantage_id)
        nv = node.nvs.get(vantage_id)
        if nv is None:
            nv = node.nvs[vantage_id] = NodeVantage(node, vantage)
            vantage.nvs.append(nv)
        kind = kind or check_name
        tier = self._tiers.get((kind, tier_sent))
        if tier is None:
            tier = self.policy.tier_of(kind, tier_sent)
            if len(self._tiers) < MAX_TIER_CACHE:  # kinds come from the wire: a bounded cache
                self._tiers[kind, tier_sent] = tier
        # the key's strings are the engine's own (the node's configured name, the vantage's,
        # an interned check name), shared by every key, not the first observation's decoded
        # copies: 200,000 keys then hold 3 hot strings each instead of 3 of their own, so a
        # lookup's string compares read memory already in cache and the heap a snapshot child
        # copies on write is ~15 % smaller
        name = intern(check_name)
        check = CheckState(name, intern(kind), tier, nv)
        nv.checks.append(check)
        self._checks[(node.info.node, vantage.name, name)] = check
        return check

    # ---- inputs -----------------------------------------------------------------------------

    def observe(self, observations: Sequence[Observation], now: float) -> list[Verdict]:
        """Apply observations that arrived at ``now``; return the verdict changes."""
        return self.observe_rows(map(observation_row, observations), now)

    def observe_rows(self, rows: Iterable[Row], now: float) -> list[Verdict]:
        """:meth:`observe` for observations read as rows (:data:`probes.model.columnar.ROW_FIELDS`:
        a columnar batch's, read straight from its columns)."""
        self._onsets.clear()
        self._absorb(rows, now)
        return self._settle(now)

    def observe_rows_in_parts(self, rows: Iterable[Row], now: float, *, count: int, part: int,
                              ) -> Generator[None, None, list[Verdict]]:
        """:meth:`observe_rows`, ``part`` rows at a time (``count``: how many rows there are at
        most): pauses (yields) between parts, so its driver can serve other work, and returns
        observe_rows()'s verdicts at the end. The same verdicts, bit for bit: a part only
        writes check states and the dirty lists, each with the same ``now``, and the one
        settle (opinions, votes, guard: every verdict) runs after the last part. The driver
        must apply nothing else to the engine until it is done."""
        self._onsets.clear()
        left = iter(rows)
        for done in range(0, count, part):
            if done:
                yield
            self._absorb(islice(left, part), now)
        return self._settle(now)

    def _absorb(self, rows: Iterable[Row], now: float) -> None:
        """Rows into their check states (no verdict: :meth:`_settle` decides)."""
        policy = self.policy
        rise = policy.rise
        fall = policy.fall
        window = policy.window
        mask = (1 << window) - 1
        k = policy.window_failures
        corroboration = policy.corroboration
        # consecutive mode keeps the run of definitive failures in ``check.window`` (unused
        # there): bit 1 per definitive failure, shifted in per failure, cleared by a success
        fall_definitive = 0 if window else policy.fall_definitive
        definitive_run = (1 << fall_definitive) - 1
        definitive = policy.definitive_reasons  # a few members: a tuple scan is cheap
        max_loss = policy.quality.max_loss_ratio
        max_p99 = policy.quality.max_rtt_p99_seconds
        stale = policy.stale_after_seconds
        oldest = now - policy.max_age_seconds if policy.max_age_seconds else -math.inf
        checks = self._checks
        dirty_nv = self._dirty_nv
        dirty_nodes = self._dirty_nodes
        quality_reasons = QUALITY_REASONS
        onsets = self._onsets
        inf = math.inf
        accepted = 0
        for node_id, vantage_id, name, seq, wall_time, passed, reason, quality, kind, tier in rows:
            check = checks.get((node_id, vantage_id, name))
            if check is None:
                check = self._new_check(node_id, vantage_id, name, kind=kind, tier_sent=tier,
                                        now=now)
                if check is None:
                    continue
            if seq <= check.seq:
                self.duplicate_total += 1
                continue
            if wall_time < oldest:
                self.late_total += 1
                continue
            accepted += 1
            check.seq = seq
            check.seen = now
            nv = check.nv
            if not nv.fresh or now - nv.seen > stale:
                node = nv.node
                if not node.dirty:
                    node.dirty = True
                    dirty_nodes.append(node)
                if not nv.wheeled:
                    self._wheel_add(nv, now)
            nv.seen = now
            # most observations pass: an identity test spares them the set lookup (an enum
            # member's hash is a Python-level call)
            if reason is not REASON_OK and reason in AGENT_SIDE_REASONS:
                # the agent could not run or time the check: no evidence about the node either
                # way (the vantage is alive, so it stays fresh)
                accepted -= 1
                self.agent_side_total += 1
                continue
            breach = False
            ok = passed
            if not ok and reason in quality_reasons:
                ok = True  # the tunnel works, badly: DEGRADED through the quality flag
                breach = True
            if quality is not None:
                check.loss = quality.loss_ratio
                check.p99 = quality.rtt_p99_seconds
                if quality.loss_ratio > max_loss or (
                    quality.rtt_p99_seconds is not None and quality.rtt_p99_seconds > max_p99
                ):
                    breach = True
            if breach != check.breach:
                check.breach = breach
                if not nv.dirty:
                    nv.dirty = True
                    dirty_nv.append(nv)
            state = check.state
            if ok:
                check.fail_since = inf
                if wall_time > check.pass_at:  # noqa: PLR1730 - max() costs a builtin call
                    check.pass_at = wall_time
                if window:
                    check.window = (check.window << 1) & mask
                elif fall_definitive:
                    check.window = 0  # the run of definitive failures is broken
                if state == CHECK_UP:
                    check.count = 0
                elif state == CHECK_DOWN:
                    check.count += 1
                    if check.count >= rise:
                        self._transition(check, CHECK_UP, now)
                else:
                    self._transition(check, CHECK_UP, now)  # one success suffices at start
            else:
                check.reason = reason
                if check.fail_since == inf:  # a run of failures begins
                    check.fail_since = wall_time
                    if state != CHECK_DOWN:
                        onsets.append(check)
                if state == CHECK_DOWN:
                    check.count = 0
                    if window:
                        check.window = ((check.window << 1) | 1) & mask
                else:
                    if window:
                        check.window = ((check.window << 1) | 1) & mask
                        tripped = check.window.bit_count() >= k
                    else:
                        check.count += 1
                        tripped = check.count >= fall
                        if fall_definitive:
                            bit = reason in definitive
                            check.window = ((check.window << 1) | bit) & definitive_run
                            tripped = tripped or check.window == definitive_run
                    if tripped:
                        self._transition(check, CHECK_DOWN, now)
                    elif corroboration:
                        self._corroborate(nv, corroboration, now)
        self.observations_total += accepted

    def tick(self, now: float) -> list[Verdict]:
        """Let time pass: release damped checks whose hold ended, drop vantages gone stale."""
        return whole(self.tick_in_parts(now, 0))

    def tick_in_parts(self, now: float, part: int) -> Generator[None, None, list[Verdict]]:
        """:meth:`tick`, pausing (yielding) after every ``part`` (node, vantage) pairs it looks
        at in the staleness wheel (0: never): pairs first seen in the same seconds come due in
        the same tick, every ``stale_after`` (200,000 of them took ~40 ms at once). The same
        verdicts as at once: the one settle runs after the last part, and the driver applies
        nothing else meanwhile."""
        if self._suppressed:
            for key, check in list(self._suppressed.items()):
                if check.suppressed_until <= now:
                    del self._suppressed[key]
                    self._mark_nv(check.nv)
        # staleness wheel: buckets of whole seconds of "seen"; a bucket is looked at once all of
        # its members could be stale, and members seen since move to their newer bucket, so each
        # (node, vantage) costs O(1) per stale_after instead of a scan of all of them per tick
        stale = self.policy.stale_after_seconds
        threshold = now - stale
        keys = self._wheel_keys
        looked, pause = 0, part
        while keys and keys[0] + 1 <= threshold:
            for nv in self._wheel.pop(heapq.heappop(keys)):
                looked += 1
                if looked == pause:
                    pause += part
                    yield
                if now - nv.seen > stale:
                    nv.wheeled = False  # re-registered by its next observation
                    self._forget_add(nv)
                    if nv.fresh:
                        self._mark_node(nv.node)
                else:
                    self._wheel_add(nv, nv.seen)
        self._forget_silent(now)
        # held nodes are looked at again every tick: room in their pool can appear in more ways
        # than a DOWN node recovering (a node removed, a pool re-shaped by a config change)
        for pool in self.pools.values():
            for held in pool.held.values():
                self._mark_node(held)
        # changes held by the dwell or awaiting confirmation are looked at again (a few nodes;
        # each leaves the registry once nothing holds it)
        for node in self._deferred.values():
            self._mark_node(node)
        return self._settle(now)

    def set_admin(
        self, node_id: str, admin: VerdictState | None, now: float, actor: str = ""
    ) -> list[Verdict]:
        """Set (DRAINING / MAINTENANCE) or clear (None, i.e. "ready") a node's admin state."""
        if admin is not None and admin not in ADMIN_STATES:
            raise ValueError(f"not an admin state: {admin}")
        node = self.nodes[node_id]  # KeyError: unknown node, the API's 404
        node.admin = admin
        changes: list[Verdict] = []
        label = admin.value if admin is not None else "READY"
        note = f"{label} set by operator" + (f" {actor}" if actor else "")
        self._publish(node, now, changes, VerdictReason(what="admin", note=note))
        return changes

    # ---- settling: opinions, impairment, votes, guard ---------------------------------------

    def _wheel_add(self, nv: NodeVantage, seen: float) -> None:
        nv.wheeled = True
        _into_wheel(self._wheel, self._wheel_keys, seen, nv)

    def _forget_add(self, nv: NodeVantage) -> None:
        _into_wheel(self._forget, self._forget_keys, nv.seen, nv)

    def _forget_silent(self, now: float) -> None:
        """Forget the (node, vantage) pairs that have reported nothing for forget_after (an
        agent taken out of the config, a node it no longer probes), with their checks."""
        after = self.policy.limits.forget_after_seconds
        keys = self._forget_keys
        if not after or not keys or keys[0] + 1 > now - after:
            return
        doomed: list[NodeVantage] = []
        while keys and keys[0] + 1 <= now - after:
            for nv in self._forget.pop(heapq.heappop(keys)):
                # reported since (wheeled again) or already gone: nothing to forget
                if not nv.wheeled and now - nv.seen > after and nv.node.nvs.get(
                        nv.vantage.name) is nv:
                    doomed.append(nv)
        if not doomed:
            return
        for nv in doomed:
            node, vantage = nv.node, nv.vantage
            for check in nv.checks:
                key = (node.info.node, vantage.name, check.name)
                del self._checks[key]
                self._suppressed.pop(key, None)
            self.forgotten_checks_total += len(nv.checks)
            vantage.decided -= nv.opinion != OP_NONE
            vantage.down -= nv.opinion == OP_DOWN
            del node.nvs[vantage.name]
            self._mark_node(node)  # its votes no longer count this vantage as stale
        gone = {id(nv) for nv in doomed}
        for vantage in {nv.vantage.name: nv.vantage for nv in doomed}.values():
            vantage.nvs = [nv for nv in vantage.nvs if id(nv) not in gone]
            if not vantage.nvs:
                del self.vantages[vantage.name]

    def _forget_unseen_checks(self, nv: NodeVantage, now: float) -> bool:
        """Make room in a full (node, vantage): drop its checks not reported for forget_after
        (renamed or removed checks of an agent that still reports); True when room was made."""
        after = self.policy.limits.forget_after_seconds
        if not after:
            return False
        keep = [c for c in nv.checks if now - c.seen <= after]
        if len(keep) == len(nv.checks):
            return False
        node, vantage = nv.node.info.node, nv.vantage.name
        for check in nv.checks:
            if now - check.seen > after:
                key = (node, vantage, check.name)
                del self._checks[key]
                self._suppressed.pop(key, None)
        self.forgotten_checks_total += len(nv.checks) - len(keep)
        nv.checks = keep
        self._mark_nv(nv)
        return True

    def _mark_nv(self, nv: NodeVantage) -> None:
        if not nv.dirty:
            nv.dirty = True
            self._dirty_nv.append(nv)

    def _mark_node(self, node: NodeState) -> None:
        if not node.dirty:
            node.dirty = True
            self._dirty_nodes.append(node)

    def _transition(self, check: CheckState, new: int, now: float) -> None:
        old = check.state
        check.state = new
        check.count = 0
        check.window = 0
        if new == CHECK_DOWN and old == CHECK_UP and self.policy.damping.enabled:
            self._add_penalty(check, now)
        self._mark_nv(check.nv)

    def _corroborate(self, nv: NodeVantage, needed: int, now: float) -> None:
        """Take down together the checks of ``nv`` that are failing now, if ``needed`` distinct
        ones are: a failing check's latest results are failures (``count`` failures in a row in
        the up/unknown state; a success resets it) and the last came within the window.

        Each goes down through :meth:`_transition` as a ``fall`` would take it: damping penalty,
        and ``rise`` successes to come back, so the hysteresis is the same."""
        recent = now - self.policy.corroboration_window_seconds
        failing = [c for c in nv.checks
                   if c.state != CHECK_DOWN and c.count > 0 and c.seen >= recent]
        if len(failing) >= needed:
            for c in failing:
                self._transition(c, CHECK_DOWN, now)

    def _add_penalty(self, check: CheckState, now: float) -> None:
        d = self.policy.damping
        decayed = check.penalty * 2.0 ** (-(now - check.penalty_at) / d.half_life_seconds)
        # RFC 2439 ceiling: the penalty that decays to reuse in exactly max_hold
        ceiling = d.reuse * 2.0 ** min(d.max_hold_seconds / d.half_life_seconds, MAX_EXPONENT)
        check.penalty = min(decayed + d.penalty, ceiling)
        check.penalty_at = now
        suppressed = now < check.suppressed_until
        if not suppressed and check.penalty <= d.suppress:
            return
        if not suppressed:
            check.suppress_start = now
            self.damping_suppressions_total += 1
        release = now + d.half_life_seconds * math.log2(check.penalty / d.reuse)
        check.suppressed_until = min(release, check.suppress_start + d.max_hold_seconds)
        nv = check.nv
        self._suppressed[(nv.node.info.node, nv.vantage.name, check.name)] = check

    def _opinion(self, nv: NodeVantage, now: float) -> int:
        stale = self.policy.stale_after_seconds
        decided = down = degraded = False
        for check in nv.checks:
            if now - check.seen > stale:
                continue  # a check this vantage stopped running no longer counts
            state = check.effective(now)
            if state == CHECK_UNKNOWN:
                continue
            decided = True
            if state == CHECK_DOWN:
                down = True
            elif check.breach:
                degraded = True
        if not decided:
            return OP_NONE
        if down:
            return OP_DOWN
        return OP_DEGRADED if degraded else OP_UP

    def _settle(self, now: float) -> list[Verdict]:
        dirty_nv = self._dirty_nv
        if dirty_nv:
            for nv in dirty_nv:
                nv.dirty = False
                opinion = self._opinion(nv, now)
                old = nv.opinion
                if opinion == old:
                    continue
                vantage = nv.vantage
                vantage.decided += (opinion != OP_NONE) - (old != OP_NONE)
                vantage.down += (opinion == OP_DOWN) - (old == OP_DOWN)
                nv.opinion = opinion
                self._mark_node(nv.node)
            dirty_nv.clear()
        if now >= self._judged_at + JUDGE_EVERY_SECONDS:
            # contrary evidence comes with any peer's pass, not only with opinion changes; a
            # vantage that sees nothing down costs one comparison to judge
            self._judged_at = now
            self._update_impairment(now)
        changes: list[Verdict] = []
        dirty_nodes = self._dirty_nodes
        i = 0
        while i < len(dirty_nodes):  # the guard may append nodes it releases
            node = dirty_nodes[i]
            i += 1
            node.dirty = False
            self._evaluate(node, now, changes)
        dirty_nodes.clear()
        return changes

    def _update_impairment(self, now: float) -> None:
        """Judge each vantage from contrary evidence (:mod:`probes.mesh.impairment`), with
        hysteresis: the judgement must hold ``confirm_seconds`` before the vantage is impaired
        and ``release_seconds`` before it is no longer, so it cannot flip within one probe
        interval while vantages learn about a correlated failure at different moments."""
        imp = self.policy.impairment
        stale = self.policy.stale_after_seconds
        checks = self._checks
        for vantage in self.vantages.values():
            raw = contradicted(vantage, imp, checks, stale, now)
            if raw != vantage.contradicted:
                vantage.contradicted = raw
                vantage.since = now
            if raw == vantage.impaired:
                continue
            if now - vantage.since < (imp.confirm_seconds if raw else imp.release_seconds):
                continue
            vantage.impaired = raw
            self._note(AuditNote(now, "impaired" if raw else "impairment-cleared",
                                 vantage=vantage.name))
            for nv in vantage.nvs:
                self._mark_node(nv.node)

    def _note(self, note: AuditNote) -> None:
        self.audit.append(note)
        self.audit_totals[note.what] += 1

    def _evaluate(self, node: NodeState, now: float, changes: list[Verdict]) -> None:
        policy = self.policy
        stale = policy.stale_after_seconds
        up = degraded = down = n_stale = n_impaired = 0
        for nv in node.nvs.values():
            if now - nv.seen > stale:
                nv.fresh = False
                n_stale += 1
                continue
            nv.fresh = True
            if nv.vantage.impaired:
                n_impaired += 1
                continue
            opinion = nv.opinion
            if opinion == OP_UP:
                up += 1
            elif opinion == OP_DOWN:
                down += 1
            elif opinion == OP_DEGRADED:
                degraded += 1
        voters = up + degraded + down
        node.votes = Votes(up, degraded, down, n_stale, n_impaired)
        quorum = policy.quorum
        quorum_lost = voters < quorum.min_voters
        if quorum_lost:
            candidate = node.probe_state
        elif quorum.mode == "majority":
            if down * 2 > voters:
                candidate = VerdictState.DOWN
            elif (down + degraded) * 2 > voters:
                candidate = VerdictState.DEGRADED
            else:
                candidate = VerdictState.UP
        elif up * 100 > quorum.healthy_percent * voters:
            candidate = VerdictState.UP
        elif (up + degraded) * 100 > quorum.healthy_percent * voters:
            candidate = VerdictState.DEGRADED
        else:
            candidate = VerdictState.DOWN
        previous = node.probe_state
        if quorum_lost != node.quorum_lost and previous != VerdictState.UNKNOWN:
            self._note(AuditNote(now, "quorum-lost" if quorum_lost else "quorum-regained",
                                 node=node.info.node, state=previous.value,
                                 note=f"{voters} voters of {quorum.min_voters} needed"))
        node.quorum_lost = quorum_lost
        if candidate == VerdictState.DEGRADED and previous not in (VerdictState.DEGRADED,
                                                                   VerdictState.UNKNOWN):
            # a change into DEGRADED must hold degraded_confirm_seconds: on its way down a
            # failing node votes DEGRADED for a moment, and its DOWN would wait for the dwell
            # (a first verdict is no change: like the dwell, the confirmation skips it)
            node.degraded_since = min(node.degraded_since, now)
            if now < node.degraded_since + policy.degraded_confirm_seconds:
                self._deferred[node.info.node] = node
                return
        else:
            node.degraded_since = math.inf
        dwell = policy.min_dwell_seconds
        if candidate != previous and now < node.changed_at + dwell:
            # changed too recently: the new verdict waits until the dwell has passed (the
            # tick looks at it again then), so a balancer never sees a flip-flop
            if node.info.node not in self._deferred:
                self._deferred[node.info.node] = node
                self._note(AuditNote(now, "dwell-held", node=node.info.node,
                                     state=previous.value,
                                     note=f"{candidate.value} waits until "
                                     f"{node.changed_at + dwell:.3f}"))
            return
        self._deferred.pop(node.info.node, None)
        pool = node.pool
        hold = False
        if candidate == VerdictState.DOWN and previous != VerdictState.DOWN:
            if pool.down + 1 > pool.allowed_down(policy.pool_guard.max_down_share):
                hold = True
                candidate = previous
            else:
                pool.down += 1
        elif candidate != VerdictState.DOWN and previous == VerdictState.DOWN:
            pool.down -= 1
            for held in pool.held.values():  # room freed: the held may go now
                self._mark_node(held)
        if hold != node.guard_hold:
            node.guard_hold = hold
            if hold:
                pool.held[node.info.node] = node
                self.guard_holds_total += 1
            else:
                pool.held.pop(node.info.node, None)
        if candidate != previous:
            # the first verdict after UNKNOWN starts no dwell: it is a start, not a change
            node.changed_at = now if previous != VerdictState.UNKNOWN else -math.inf
        node.probe_state = candidate
        self._publish(node, now, changes, None)

    def _publish(
        self,
        node: NodeState,
        now: float,
        changes: list[Verdict],
        extra: VerdictReason | None,
    ) -> None:
        state = node.admin if node.admin is not None else node.probe_state
        # only a change of state is published (and takes a seq): a quorum flag or evidence
        # that changes alone goes to the audit notes, metrics and the API, not to balancers
        if state == node.state:
            return
        previous = node.state
        node.state = state
        node.seq += 1
        reasons = evidence(self.policy, node, now)
        if self.extra_evidence is not None:
            impaired = [name for name, nv in node.nvs.items() if nv.vantage.impaired]
            # right after the vote: the cap on reasons must not cut them off behind the checks
            reasons[1:1] = self.extra_evidence(node.info.node, now, impaired)
        if extra is not None:
            reasons.insert(0, extra)
        verdict = Verdict(
            node=node.info.node,
            state=state,
            previous=previous,
            seq=node.seq,
            decided_at=now,
            reasons=reasons[:MAX_REASONS],
            votes=node.votes,
            pool=node.info.pool,
            quorum_lost=node.quorum_lost,
        )
        node.last = verdict
        key = (previous.value, state.value)
        self.transitions[key] = self.transitions.get(key, 0) + 1
        changes.append(verdict)

    # ---- read side (API, metrics) --------------------------------------------------------------

    def node_view(self, node_id: str, now: float) -> dict[str, Any]:
        """The per-vantage picture of one node (KeyError for an unknown node)."""
        return node_view(self.policy, self.nodes[node_id], now)

    def check_count(self) -> int:
        return len(self._checks)

    def check_state(self, node_id: str, vantage: str, check: str) -> CheckState:
        """One (node, vantage, check) state (KeyError when never observed)."""
        return self._checks[(node_id, vantage, check)]

    def take_audit(self) -> list[AuditNote]:
        """The audit notes since the last call (quorum, impairment, dwell), oldest first."""
        notes = list(self.audit)
        self.audit.clear()
        return notes

    def corroboration_asks(self, now: float) -> list[CorroborationAsk]:
        """Who should re-probe what now, for the checks whose run of failures began in the
        last :meth:`observe` call (from a vantage not judged impaired, on a node that is
        neither DOWN nor under an admin state).

        Asked: every other vantage probing the node, fresh and not impaired, for the same check,
        and, when the failing check is an L4 one, also for its functional checks of the node
        (the agent's own cascade, across vantages: a silent node fails ICMP first, and its
        handshakes time out only a timeout later). A peer whose check already fails, is down, or
        passed after this failure began is not asked: it has already answered."""
        stale = self.policy.stale_after_seconds
        out: list[CorroborationAsk] = []
        for check in self._onsets:
            nv = check.nv
            node = nv.node
            if (nv.vantage.impaired or node.admin is not None
                    or node.probe_state == VerdictState.DOWN):
                continue
            since = check.fail_since
            cascade = check.tier == Tier.L4
            peers: list[tuple[str, tuple[str, ...]]] = []
            for name, peer in node.nvs.items():
                if peer is nv or peer.vantage.impaired or now - peer.seen > stale:
                    continue
                wanted = tuple(
                    c.name for c in peer.checks
                    if (c.name == check.name or (cascade and c.tier == Tier.FUNCTIONAL))
                    and c.fail_since == math.inf and c.state != CHECK_DOWN and c.pass_at < since
                )
                if wanted:
                    peers.append((name, wanted))
            if peers:
                out.append(CorroborationAsk(node.info.node, check.name, nv.vantage.name, since,
                                            tuple(peers)))
        return out

    # ---- persistence: the engine as rows of plain values, and back ----------------------------

    def to_rows(self) -> dict[str, Any]:
        """The whole engine as plain values (names instead of references), for a snapshot.

        Everything a restart needs to continue like an uninterrupted run: every slot of every
        state object, the order of every dict and list the engine iterates (creation order of
        checks, from which that of (node, vantage) pairs and vantages follows; the damping and
        guard registries; the staleness wheel), and the counters."""
        if self._dirty_nv or self._dirty_nodes:
            raise RuntimeError("engine rows taken in the middle of an engine call")
        row_of = check_row  # enums (reason, tier) encode as their values
        checks = [(node_id, vantage_id, row_of(check))
                  for (node_id, vantage_id, _name), check in self._checks.items()]
        nvs = [[node_name, vantage_name, nv.seen, nv.opinion, nv.fresh, nv.wheeled]
               for node_name, node in self.nodes.items()
               for vantage_name, nv in node.nvs.items()]
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
                node.changed_at,
                node.degraded_since,
            ]
            for name, node in self.nodes.items()
        ]
        return {
            "policy": msgspec.to_builtins(self.policy),
            "registry": [
                [n.info.node, n.info.pool, n.info.pop, n.info.region] for n in self.nodes.values()
            ],
            "checks": checks,
            "nvs": nvs,
            "vantages": [
                [v.name, v.decided, v.down, v.impaired, v.seen, v.contradicted, v.since]
                for v in self.vantages.values()
            ],
            "nodes": nodes,
            "pools": [[p.name, p.down, list(p.held)] for p in self.pools.values()],
            "suppressed": [list(key) for key in self._suppressed],
            "wheel": [
                [key, [[nv.node.info.node, nv.vantage.name] for nv in bucket]]
                for key, bucket in self._wheel.items()
            ],
            "wheel_keys": list(self._wheel_keys),
            "judged_at": self._judged_at,
            "deferred": list(self._deferred),
            "epochs": self._epochs,
            "audit_totals": self.audit_totals,
            "counters": [getattr(self, name) for name in _COUNTERS],
            "transitions": [[a, b, n] for (a, b), n in self.transitions.items()],
        }

    @classmethod
    def from_rows(cls, rows: dict[str, Any]) -> DecisionEngine:
        """The engine :meth:`to_rows` described (KeyError / ValueError when they do not fit).

        Rows from before the contrary-evidence rule (no ``judged_at``) load with that state's
        defaults: no run of failures under way, never judged, no dwell pending."""
        policy = msgspec.convert(rows["policy"], DecisionPolicy)
        engine = cls(policy, [NodeInfo(*row) for row in rows["registry"]])
        older = "judged_at" not in rows
        engine._load_checks(rows["checks"], older)
        for node_name, vantage, seen, opinion, fresh, wheeled in rows["nvs"]:
            nv = engine.nodes[node_name].nvs[vantage]
            nv.seen, nv.opinion, nv.fresh, nv.wheeled = seen, opinion, fresh, wheeled
        for row in rows["vantages"]:
            v = engine.vantages[row[0]]
            v.decided, v.down, v.impaired, v.seen = row[1:5]
            if not older:
                v.contradicted, v.since = row[5:7]
        for row in rows["nodes"]:
            name, probe, admin, published, quorum_lost, hold, seq, votes, last = row[:9]
            node = engine.nodes[name]
            if not older:
                node.changed_at, node.degraded_since = row[9:11]
            node.probe_state = VerdictState(probe)
            node.admin = VerdictState(admin) if admin is not None else None
            node.state = VerdictState(published)
            node.quorum_lost = quorum_lost
            node.guard_hold = hold
            node.seq = seq
            node.votes = msgspec.convert(votes, Votes)
            node.last = msgspec.convert(last, Verdict) if last is not None else None
        for name, down, held in rows["pools"]:
            pool = engine.pools[name]
            pool.down = down
            pool.held = {n: engine.nodes[n] for n in held}
        for key in rows["suppressed"]:
            engine._suppressed[(key[0], key[1], key[2])] = engine._checks[(key[0], key[1], key[2])]
        for key, members in rows["wheel"]:
            engine._wheel[key] = [engine.nodes[n].nvs[v] for n, v in members]
        engine._wheel_keys = list(rows["wheel_keys"])
        if not older:
            engine._judged_at = rows["judged_at"]
            engine._deferred = {n: engine.nodes[n] for n in rows["deferred"]}
            engine.audit_totals.update(rows["audit_totals"])
        for name, value in zip(_COUNTERS, rows["counters"], strict=True):
            setattr(engine, name, value)
        engine.transitions = {(a, b): n for a, b, n in rows["transitions"]}
        engine._epochs = dict(rows.get("epochs", {}))  # none in rows from before agent epochs
        # the forget wheel is derived: a (node, vantage) enters it when it goes stale, that is,
        # leaves the staleness wheel; which bucket and when it is forgotten follow from "seen"
        for node in engine.nodes.values():
            for nv in node.nvs.values():
                if not nv.wheeled and math.isfinite(nv.seen):
                    engine._forget_add(nv)
        return engine

    def _load_checks(self, rows: list[list[Any]], older: bool = False) -> None:
        """Re-create checks in creation order; (node, vantage) pairs and vantages follow."""
        nodes = self.nodes
        vantages = self.vantages
        checks = self._checks
        reason_of = Reason
        tier_of = Tier
        new = CheckState.__new__
        for node_name, vantage_name, row in rows:
            values = _with_evidence_times(row) if older else row
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
            # CHECK_ROW_FIELDS, in their order: a slot added to CheckState fails this unpacking,
            # and a mismatched order fails the rows -> engine -> rows round trip of the engine
            # property tests
            (
                check.breach,
                check.count,
                check.fail_since,
                check.kind,
                check.loss,
                check.name,
                check.p99,
                check.pass_at,
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
            check.name = name = intern(check.name)  # shared key strings, as in _new_check
            check.kind = intern(check.kind)
            nv.checks.append(check)
            checks[(node.info.node, vantage.name, name)] = check


def _into_wheel(wheel: dict[int, list[NodeVantage]], keys: list[int], seen: float,
                nv: NodeVantage) -> None:
    """Put ``nv`` in the bucket of the whole second ``seen`` (a heap keeps the buckets' keys)."""
    key = math.floor(seen)
    bucket = wheel.get(key)
    if bucket is None:
        wheel[key] = [nv]
        heapq.heappush(keys, key)
    else:
        bucket.append(nv)


_EVIDENCE_TIMES = {"fail_since": math.inf, "pass_at": -math.inf}
_OLDER_CHECK_FIELDS = tuple(f for f in CHECK_ROW_FIELDS if f not in _EVIDENCE_TIMES)


def _with_evidence_times(row: list[Any]) -> list[Any]:
    """A check row from before fail_since / pass_at: those at "no run, no pass"."""
    values = dict(zip(_OLDER_CHECK_FIELDS, row, strict=True))
    return [values.get(f, _EVIDENCE_TIMES.get(f)) for f in CHECK_ROW_FIELDS]


# the engine's counters, in the order its rows store them (the order is the snapshot format)
_COUNTERS = (
    "observations_total",
    "unknown_node_total",
    "duplicate_total",
    "late_total",
    "guard_holds_total",
    "damping_suppressions_total",
)


def whole(steps: Generator[None, None, T]) -> T:
    """Run an input's steps (a ``*_in_parts`` generator) without pausing; their result."""
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return cast(T, done.value)
