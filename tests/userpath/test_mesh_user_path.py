"""The mesh's view of the user-path checks: an egress or DNS fault is the node being useless to
its users (DOWN when the vantages agree), while one vantage's fault alone moves nothing."""

from __future__ import annotations

import pytest

from probes.checks.registry import all_kinds
from probes.mesh.decision import DecisionEngine
from probes.mesh.policy import DampingPolicy, DecisionPolicy
from probes.mesh.state import QUALITY_REASONS
from probes.model import Observation, Reason, Tier, VerdictState
from tests.mesh.helpers import fleet, obs

V3 = ("va", "vb", "vc")
NO_DAMPING = DecisionPolicy(damping=DampingPolicy(enabled=False), min_dwell_seconds=0)


def _round(eng: DecisionEngine, t: float, failing: set[str], kind: str,
           reason: Reason) -> None:
    """Every vantage: its handshake and session pass; the user-path check fails at ``failing``."""
    batch: list[Observation] = []
    for v in V3:
        batch.append(obs("n0", v, True, check="wg", kind="wireguard.handshake", at=t))
        batch.append(obs("n0", v, True, check="ses", kind="wireguard.session", at=t))
        bad = v in failing
        batch.append(obs("n0", v, not bad, check=kind, kind=kind,
                         reason=reason if bad else Reason.OK, at=t))
    eng.observe(batch, t)
    eng.tick(t + 0.5)  # what the mesh's clock does between batches (confirmations, dwell)


@pytest.mark.parametrize(("kind", "reason"), [("wireguard.egress", Reason.EGRESS_FAILED),
                                              ("ikev2.egress", Reason.EGRESS_FAILED),
                                              ("openvpn.dns", Reason.DNS_SERVFAIL),
                                              ("openvpn.dns", Reason.DNS_TIMEOUT)])
def test_a_fault_every_vantage_sees_is_down_one_vantage_alone_is_not(
        kind: str, reason: Reason) -> None:
    eng = DecisionEngine(NO_DAMPING, fleet(1))
    for t in range(3):
        _round(eng, float(t), set(), kind, reason)
    assert eng.nodes["n0"].state is VerdictState.UP
    for t in range(3, 8):
        _round(eng, float(t), {"va"}, kind, reason)
    assert eng.nodes["n0"].state is VerdictState.UP  # one vantage: its own path, not the node
    for t in range(8, 13):
        _round(eng, float(t), set(V3), kind, reason)
    assert eng.nodes["n0"].state is VerdictState.DOWN
    for t in range(13, 18):
        _round(eng, float(t), set(), kind, reason)
    assert eng.nodes["n0"].state is VerdictState.UP


def test_user_path_kinds_are_session_tier_and_their_failures_are_availability() -> None:
    kinds = {name: kind for name, kind in all_kinds().items()
             if name.endswith((".egress", ".dns", ".throughput"))}
    assert set(kinds) == {f"{via}.{what}" for via in ("wireguard", "openvpn", "ikev2")
                          for what in ("egress", "dns", "throughput")}
    assert {kind.tier for kind in kinds.values()} == {Tier.SESSION}
    user_path_reasons = {Reason.EGRESS_FAILED, Reason.DNS_TIMEOUT, Reason.DNS_UNREACHABLE,
                         Reason.DNS_SERVFAIL, Reason.DNS_REFUSED, Reason.DNS_WRONG_ANSWER}
    assert not user_path_reasons & QUALITY_REASONS  # DOWN evidence, not DEGRADED


@pytest.mark.parametrize("reason", [Reason.THROUGHPUT_LOW, Reason.QUEUEING_DELAY,
                                    Reason.REFLECTOR_NO_REPLY])
def test_a_throughput_fault_every_vantage_sees_is_degraded_never_down(reason: Reason) -> None:
    eng = DecisionEngine(NO_DAMPING, fleet(1))
    for t in range(3):
        _round(eng, float(t), set(), "wireguard.throughput", reason)
    assert eng.nodes["n0"].state is VerdictState.UP
    states = set()
    for t in range(3, 30):
        _round(eng, float(t), set(V3), "wireguard.throughput", reason)
        states.add(eng.nodes["n0"].state)
    assert VerdictState.DOWN not in states
    assert eng.nodes["n0"].state is VerdictState.DEGRADED
