"""The registry of check kinds is the one place a kind's facts live: its tier travels with every
observation, and the mesh tiers each kind as it declares (also for agents that predate it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import msgspec
import pytest

from probes.agent.plan import plan_target
from probes.checks.registry import FAMILIES, KINDS, kinds_of
from probes.config import Target
from probes.mesh.decision import DecisionEngine, NodeInfo
from probes.mesh.policy import DecisionPolicy
from probes.model import NODE_READ_TIERS, Observation, Reason, Tier

# the kinds agents reported before observations carried their tier: the mesh's built-in table
# must tier them as they declare (openvpn.tunnel, ikev2.tunnel, quic.connect-udp and
# quic.connect-ip were once treated as functional)
KINDS_BEFORE_THE_TIER_FIELD = (
    "tcp", "udp", "icmp", "wireguard.handshake", "wireguard.session", "openvpn.reset",
    "openvpn.tls", "openvpn.session", "openvpn.tunnel", "ikev2.init", "ikev2.auth",
    "ikev2.tunnel", "quic.handshake", "quic.connect-udp", "quic.connect-ip", "mtu.udp",
    "mtu.icmp", "telemetry.wireguard", "telemetry.openvpn", "telemetry.ikev2", "telemetry.load")


def test_every_kind_is_declared_once() -> None:
    assert len(KINDS) == sum(len(f.kinds) for f in FAMILIES)
    assert set(KINDS_BEFORE_THE_TIER_FIELD) <= set(KINDS)
    twin = dataclasses.replace(FAMILIES[0],
                               kinds=tuple(dataclasses.replace(k) for k in FAMILIES[0].kinds))
    with pytest.raises(ValueError, match="declared twice"):
        kinds_of((*FAMILIES, twin))


@pytest.mark.parametrize("name", sorted(KINDS))
def test_the_mesh_tiers_every_kind_as_it_declares(name: str) -> None:
    kind = KINDS[name]
    policy = DecisionPolicy()
    assert policy.tier_of(name, kind.tier) is kind.tier  # what a current agent sends
    if name in KINDS_BEFORE_THE_TIER_FIELD:
        assert policy.tier_of(name) is kind.tier  # an older agent: the built-in table
    # an operator's override still wins ("special cases")
    other = Tier.SESSION if kind.tier is not Tier.SESSION else Tier.FUNCTIONAL
    family = name.partition(".")[0]
    assert DecisionPolicy(tiers={family: other}).tier_of(name, kind.tier) is other


def test_the_tier_travels_from_the_plan_to_the_engine(tmp_path: Path) -> None:
    """Every planned check reports its kind's tier, and the engine's check state carries it."""
    target = msgspec.convert({
        "id": "n1", "pool": "p", "pop": "fra", "region": "eu", "address": "10.0.0.1",
        "l4": {"tcp_ports": [443], "icmp": True},
        "wireguard": {"server_public_key": "K" * 43 + "=", "private_key_file": "a.key",
                      "tunnel_address": "10.201.0.2/32", "canary": "10.201.0.1"},
        "openvpn": {"ca_file": "ca.crt", "level": "tunnel"},
        "ikev2": {"psk_file": "psk", "ping": "10.210.0.1"},
        "quic": {"connect_udp_target": "10.0.0.9:7"},
        "mtu": {"port": 7},
        "checks": []}, Target)
    planned = plan_target(target, tmp_path, tmp_path)
    reported = [c for c in planned if c.tier not in NODE_READ_TIERS]
    assert {c.kind.name for c in reported} >= {"openvpn.tunnel", "ikev2.tunnel",
                                               "quic.connect-udp", "wireguard.session"}
    engine = DecisionEngine(DecisionPolicy(), [NodeInfo("n1", "p")])
    observations = [Observation(node="n1", check=c.check, vantage="va", seq=i, wall_time=1.0,
                                ok=True, reason=Reason.OK, duration_seconds=0.01,
                                kind=c.kind.name, tier=c.tier)
                    for i, c in enumerate(reported, 1)]
    engine.observe(observations, 1.0)
    for check in reported:
        assert check.tier is check.kind.tier
        assert engine.check_state("n1", "va", check.check).tier is check.kind.tier


def test_an_observation_without_a_tier_still_decodes_and_is_tiered() -> None:
    """Old agents do not send ``tier``: their batches are accepted and tiered by the table."""
    old = b'{"node":"n1","check":"openvpn.tunnel","vantage":"va","seq":1,"wall_time":1.0,' \
          b'"ok":true,"reason":"ok","duration_seconds":0.1,"kind":"openvpn.tunnel"}'
    obs = msgspec.json.decode(old, type=Observation)
    assert obs.tier is None
    engine = DecisionEngine(DecisionPolicy(), [NodeInfo("n1", "p")])
    engine.observe([obs], 1.0)
    assert engine.check_state("n1", "va", "openvpn.tunnel").tier is Tier.SESSION
