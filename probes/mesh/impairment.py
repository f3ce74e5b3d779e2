"""Is a vantage contradicted by its peers? Contrary evidence, read from the engine's state.

A vantage V that sees node N DOWN is *contradicted on N* when, for every check it sees failing
(or held down) on N that its peers also run, the peers holding fresh contrary evidence — their
latest result of that check passed, and that probe started at or after V's run of failures
began — are a strict majority of the vantages with a view on it since then, V included:
``contra > agree + 1``. A peer that fails the same check (or holds it down) agrees with V; a peer
that has not probed it since, or whose report is stale, is no evidence either way. So absence of
agreement never counts against V, and two vantages that agree are never both contradicted by a
third that disagrees.

V is contradicted when the nodes it is contradicted on are at least ``down_share`` of the nodes
it counts: those plus the nodes it sees UP or DEGRADED (nodes it sees DOWN where peers agree, or
no one has probed since, are no evidence about V either way). The engine adds the hysteresis
(:class:`probes.mesh.policy.ImpairmentPolicy`: ``confirm_seconds``, ``release_seconds``).

Cost: only a vantage's DOWN opinions are read, and the count stops as soon as the answer is
known, so a vantage that sees nothing down costs nothing and a vantage cut off the fleet (no node
UP: one contradicted node settles it) costs one node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from probes.mesh.policy import ImpairmentPolicy
from probes.mesh.state import CHECK_DOWN, OP_DOWN, CheckState, NodeVantage, VantageState


def contradicted_on(
    nv: NodeVantage,
    checks: Mapping[tuple[str, str, str], CheckState],
    stale: float,
    now: float,
) -> bool:
    """True when the peers' fresh evidence contradicts ``nv``'s failing checks of its node."""
    node = nv.node
    node_id = node.info.node
    judged = False
    for check in nv.checks:
        if now - check.seen > stale:
            continue
        failing = check.fail_since != math.inf
        if not failing and check.effective(now) != CHECK_DOWN:
            continue
        onset = check.fail_since if failing else -math.inf  # held down: any fresh pass counts
        contra = agree = 0
        for peer, peer_nv in node.nvs.items():
            if peer_nv is nv:
                continue
            theirs = checks.get((node_id, peer, check.name))
            if theirs is None or now - theirs.seen > stale:
                continue
            if theirs.fail_since != math.inf or theirs.effective(now) == CHECK_DOWN:
                agree += 1
            elif theirs.pass_at >= onset:
                contra += 1
        if contra == 0 and agree == 0:
            continue  # nobody has looked since: no evidence either way
        if contra <= agree + 1:
            return False  # not outvoted on this check: V is not alone
        judged = True
    return judged


def contradicted(
    vantage: VantageState,
    policy: ImpairmentPolicy,
    checks: Mapping[tuple[str, str, str], CheckState],
    stale: float,
    now: float,
) -> bool:
    """The raw judgement (before hysteresis): does contrary evidence outweigh ``vantage``?"""
    if vantage.down == 0 or vantage.decided < policy.min_nodes:
        return False
    share = policy.down_share
    seen_up = vantage.decided - vantage.down  # nodes it sees UP or DEGRADED
    if share >= 1.0:
        if seen_up:
            return False
        needed = 1
    else:
        # c / (c + up) >= share  <=>  c >= share * up / (1 - share)
        needed = max(1, math.ceil(share * seen_up / (1.0 - share) - 1e-9))
    remaining = vantage.down
    found = 0
    for nv in vantage.nvs:
        if nv.opinion != OP_DOWN:
            continue
        remaining -= 1
        if now - nv.seen <= stale and contradicted_on(nv, checks, stale, now):
            found += 1
            if found >= needed:
                return True
        if found + remaining < needed:
            return False
    return False
