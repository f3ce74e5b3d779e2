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
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from probes.mesh.evidence import evidence, node_view
from probes.mesh.policy import DecisionPolicy
from probes.mesh.state import (
    ADMIN_STATES,
    AGENT_SIDE_REASONS,
    CHECK_DOWN,
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
    CheckState,
    NodeInfo,
    NodeState,
    NodeVantage,
    PoolState,
    VantageState,
    check_row,
)
from probes.model import Observation, Reason, Tier, Verdict, VerdictReason, VerdictState, Votes

__all__ = [
    "CHECK_DOWN",
    "CHECK_STATE_NAMES",
    "CHECK_UNKNOWN",
    "CHECK_UP",
    "OPINION_NAMES",
    "CheckState",
    "DecisionEngine",
    "NodeInfo",
    "NodeState",
    "NodeVantage",
    "PoolState",
    "VantageState",
]


MAX_EXPONENT = 1000.0  # 2 ** 1000 is ~1e301: any damping ceiling beyond it is "no ceiling"


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
        self._vantages_changed = False
        self._wheel: dict[int, list[NodeVantage]] = {}
        self._wheel_keys: list[int] = []  # heap of the wheel's bucket keys
        # counters for /metrics
        self.observations_total = 0
        self.unknown_node_total = 0
        self.duplicate_total = 0
        self.late_total = 0
        self.agent_side_total = 0  # overloaded / probe-error: the agent's trouble, not the node's
        self.transitions: dict[tuple[str, str], int] = {}
        self.guard_holds_total = 0
        self.damping_suppressions_total = 0
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
        self._vantages_changed = True

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

    def _new_check(self, obs: Observation) -> CheckState | None:
        node = self.nodes.get(obs.node)
        if node is None:
            return None
        vantage = self.vantages.get(obs.vantage)
        if vantage is None:
            vantage = self.vantages[obs.vantage] = VantageState(obs.vantage)
        nv = node.nvs.get(obs.vantage)
        if nv is None:
            nv = node.nvs[obs.vantage] = NodeVantage(node, vantage)
            vantage.nvs.append(nv)
        kind = obs.kind or obs.check
        tier = self._tiers.get((kind, obs.tier))
        if tier is None:
            tier = self._tiers[kind, obs.tier] = self.policy.tier_of(kind, obs.tier)
        check = CheckState(obs.check, kind, tier, nv)
        nv.checks.append(check)
        self._checks[(obs.node, obs.vantage, obs.check)] = check
        return check

    # ---- inputs -----------------------------------------------------------------------------

    def observe(self, observations: Sequence[Observation], now: float) -> list[Verdict]:
        """Apply observations that arrived at ``now``; return the verdict changes."""
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
        accepted = 0
        for obs in observations:
            check = checks.get((obs.node, obs.vantage, obs.check))
            if check is None:
                check = self._new_check(obs)
                if check is None:
                    self.unknown_node_total += 1
                    continue
            if obs.seq <= check.seq:
                self.duplicate_total += 1
                continue
            if obs.wall_time < oldest:
                self.late_total += 1
                continue
            accepted += 1
            check.seq = obs.seq
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
            if obs.reason in AGENT_SIDE_REASONS:
                # the agent could not run or time the check: no evidence about the node either
                # way (the vantage is alive, so it stays fresh)
                accepted -= 1
                self.agent_side_total += 1
                continue
            ok = obs.ok
            quality = obs.quality
            breach = False
            if not ok and obs.reason in quality_reasons:
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
                check.reason = obs.reason
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
                            bit = obs.reason in definitive
                            check.window = ((check.window << 1) | bit) & definitive_run
                            tripped = tripped or check.window == definitive_run
                    if tripped:
                        self._transition(check, CHECK_DOWN, now)
                    elif corroboration:
                        self._corroborate(nv, corroboration, now)
        self.observations_total += accepted
        return self._settle(now)

    def tick(self, now: float) -> list[Verdict]:
        """Let time pass: release damped checks whose hold ended, drop vantages gone stale."""
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
        while keys and keys[0] + 1 <= threshold:
            for nv in self._wheel.pop(heapq.heappop(keys)):
                if now - nv.seen > stale:
                    nv.wheeled = False  # re-registered by its next observation
                    if nv.fresh:
                        self._mark_node(nv.node)
                else:
                    self._wheel_add(nv, nv.seen)
        # held nodes are looked at again every tick: room in their pool can appear in more ways
        # than a DOWN node recovering (a node removed, a pool re-shaped by a config change)
        for pool in self.pools.values():
            for held in pool.held.values():
                self._mark_node(held)
        self._vantages_changed = True  # vantage freshness moves with time
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
        key = math.floor(seen)
        bucket = self._wheel.get(key)
        if bucket is None:
            self._wheel[key] = [nv]
            heapq.heappush(self._wheel_keys, key)
        else:
            bucket.append(nv)

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
                self._vantages_changed = True
                nv.opinion = opinion
                self._mark_node(nv.node)
            dirty_nv.clear()
        if self._vantages_changed:
            self._vantages_changed = False
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
        imp = self.policy.impairment
        share: dict[str, float] = {}
        for vantage in self.vantages.values():
            if vantage.decided >= imp.min_nodes:
                share[vantage.name] = vantage.down / vantage.decided
        alarmed = {name for name, s in share.items() if s >= imp.down_share}
        # if most of its peers see the same thing, it is the fleet, not the vantage. Peers only:
        # a vantage does not confirm itself (counting it, a vantage cut off the fleet plus one
        # flaky peer made "most vantages" of three, and the cut one voted again: false DOWNs in
        # the detection benchmark's soak). A vantage without peers has no one to be judged by.
        others = len(share) - 1
        peers_agree = others < 1 or (len(alarmed) - 1) * 2 > others
        for vantage in self.vantages.values():
            impaired = vantage.name in alarmed and not peers_agree
            if impaired != vantage.impaired:
                vantage.impaired = impaired
                for nv in vantage.nvs:
                    self._mark_node(nv.node)

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
        pool = node.pool
        hold = False
        previous = node.probe_state
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
        node.probe_state = candidate
        node.quorum_lost = quorum_lost
        self._publish(node, now, changes, None)

    def _publish(
        self,
        node: NodeState,
        now: float,
        changes: list[Verdict],
        extra: VerdictReason | None,
    ) -> None:
        state = node.admin if node.admin is not None else node.probe_state
        last = node.last
        last_quorum = last.quorum_lost if last is not None else True
        # a quorum flag flip alone is announced (loudly), except under an admin state: then the
        # published state is the operator's and the probes' quorum is only shown in the node view
        if state == node.state and (node.admin is not None or node.quorum_lost == last_quorum):
            return
        previous = node.state
        node.state = state
        node.seq += 1
        reasons = evidence(self.policy, node, now)
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
                [v.name, v.decided, v.down, v.impaired, v.seen] for v in self.vantages.values()
            ],
            "nodes": nodes,
            "pools": [[p.name, p.down, list(p.held)] for p in self.pools.values()],
            "suppressed": [list(key) for key in self._suppressed],
            "wheel": [
                [key, [[nv.node.info.node, nv.vantage.name] for nv in bucket]]
                for key, bucket in self._wheel.items()
            ],
            "wheel_keys": list(self._wheel_keys),
            "vantages_changed": self._vantages_changed,
            "counters": [getattr(self, name) for name in _COUNTERS],
            "transitions": [[a, b, n] for (a, b), n in self.transitions.items()],
        }

    @classmethod
    def from_rows(cls, rows: dict[str, Any]) -> DecisionEngine:
        """The engine :meth:`to_rows` described (KeyError / ValueError when they do not fit)."""
        policy = msgspec.convert(rows["policy"], DecisionPolicy)
        engine = cls(policy, [NodeInfo(*row) for row in rows["registry"]])
        engine._load_checks(rows["checks"])
        for node_name, vantage, seen, opinion, fresh, wheeled in rows["nvs"]:
            nv = engine.nodes[node_name].nvs[vantage]
            nv.seen, nv.opinion, nv.fresh, nv.wheeled = seen, opinion, fresh, wheeled
        for name, decided, down, impaired, seen in rows["vantages"]:
            v = engine.vantages[name]
            v.decided, v.down, v.impaired, v.seen = decided, down, impaired, seen
        for name, probe, admin, published, quorum_lost, hold, seq, votes, last in rows["nodes"]:
            node = engine.nodes[name]
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
        engine._vantages_changed = rows["vantages_changed"]
        for name, value in zip(_COUNTERS, rows["counters"], strict=True):
            setattr(engine, name, value)
        engine.transitions = {(a, b): n for a, b, n in rows["transitions"]}
        return engine

    def _load_checks(self, rows: list[list[Any]]) -> None:
        """Re-create checks in creation order; (node, vantage) pairs and vantages follow."""
        nodes = self.nodes
        vantages = self.vantages
        checks = self._checks
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
            # CHECK_ROW_FIELDS, in their order: a slot added to CheckState fails this unpacking,
            # and a mismatched order fails the rows -> engine -> rows round trip of the engine
            # property tests
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


# the engine's counters, in the order its rows store them (the order is the snapshot format)
_COUNTERS = (
    "observations_total",
    "unknown_node_total",
    "duplicate_total",
    "late_total",
    "guard_holds_total",
    "damping_suppressions_total",
)

