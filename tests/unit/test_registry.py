"""The registry of check kinds is the one place a kind's facts live: its tier travels with every
observation, and the mesh tiers each kind as it declares (also for agents that predate it)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from probes.agent.plan import plan_target
from probes.agent.runtime import observation
from probes.agent.scheduler import ProbeRun
from probes.checks import registry
from probes.checks.base import CheckKind, CheckResult, Family, PlanContext, Planned, ProbeCommand
from probes.checks.registry import Listed, all_kinds, families, kinds_of
from probes.cli import main
from probes.config import Target
from probes.configref import render_reference
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


FAMILIES = families()
KINDS = all_kinds()


def test_every_kind_is_declared_once() -> None:
    assert len(KINDS) == sum(len(f.kinds) for f in FAMILIES)
    assert set(KINDS_BEFORE_THE_TIER_FIELD) <= set(KINDS)
    twin = dataclasses.replace(FAMILIES[0],
                               kinds=tuple(dataclasses.replace(k) for k in FAMILIES[0].kinds))
    with pytest.raises(ValueError, match="declared twice"):
        kinds_of((*FAMILIES, twin))


def test_each_entry_names_the_section_its_family_plans_from(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert [e.name for e in registry.LISTED] == [f.name for f in FAMILIES]
    monkeypatch.setattr(registry, "LISTED", (Listed("l4", lambda t: True, lambda: FAMILIES[1]),))
    with pytest.raises(ValueError, match="loads family"):
        families()


# a TCP-only agent, planned and started as `tunnelwatch agent` does, in a fresh interpreter
TCP_ONLY = """
import asyncio, sys, yaml
from pathlib import Path
from probes.agent.runtime import Agent
d = Path(sys.argv[1])
(d / "key").write_text("k" * 64)
(d / "key").chmod(0o600)
cfg = {"agent": {"vantage": "v", "listen": "127.0.0.1:1", "state_dir": str(d / "st")},
       "mesh": {"endpoints": ["http://127.0.0.1:9"], "key_id": "k", "key_file": "key"},
       "targets": [{"id": "n1", "pool": "p", "pop": "fra", "region": "eu",
                    "address": "127.0.0.1", "l4": {"tcp_ports": [9]}}]}
(d / "agent.yaml").write_text(yaml.safe_dump(cfg))
agent = Agent(d / "agent.yaml")
assert [c.check for c in agent.checks] == ["tcp:9"], agent.checks
print(" ".join(sorted(sys.modules)))
"""
HEAVY = ("aioquic", "cryptography", "OpenSSL", "service_identity", "nacl", "scapy",
         "probes.checks.quic", "probes.checks.ikev2", "probes.checks.openvpn",
         "probes.checks.wireguard", "probes.protocols.ikev2", "probes.protocols.openvpn")


def test_a_tcp_only_agent_loads_no_protocol_it_does_not_plan(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", TCP_ONLY, str(tmp_path)], capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert "probes.checks.l4" in out
    assert [m for m in out if any(m == h or m.startswith(h + ".") for h in HEAVY)] == []


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


# ---------------------------------------------------------------------- a kind in one place


class GreetParams(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    port: int
    greeting: str = "hello"  # what to say


async def _greet(params: GreetParams, timeout: float) -> CheckResult:
    return CheckResult(True, Reason.OK, 0.001, facts={"said": f"{params.greeting} {params.host}"})


GREET = CheckKind("greet.hello", Tier.SESSION, GreetParams, _greet, "says hello to the node")


def _plan_greet(ctx: PlanContext) -> list[Planned]:
    if ctx.target.l4 is None:
        return []
    return [Planned.of(GREET, GreetParams(host=ctx.target.address, port=7))]


def _greet_options(params: GreetParams, ctx: PlanContext) -> list[Planned]:
    return [Planned.of(GREET, params)]


# the one place: a family with its kind, its planning and its probe command
GREET_FAMILY = Family("greet", (GREET,), _plan_greet, "greetings",
                      (ProbeCommand("greet", "say hello", GreetParams, _greet_options,
                                    port_required=True),))


def test_a_kind_added_in_one_place_is_planned_probed_tiered_and_documented(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    listed = (*registry.LISTED, Listed("greet", lambda t: t.l4 is not None, lambda: GREET_FAMILY))
    monkeypatch.setattr(registry, "LISTED", listed)  # as if listed in the registry
    target = msgspec.convert({"id": "n1", "pool": "p", "pop": "fra", "region": "eu",
                              "address": "10.0.0.1", "l4": {"icmp": True}}, Target)
    # plannable
    planned = [c for c in plan_target(target, tmp_path, tmp_path) if c.kind is GREET]
    assert [(c.check, c.tier) for c in planned] == [("greet.hello", Tier.SESSION)]
    # probe-able from the CLI, flags from its params struct
    assert main(["probe", "greet", "--endpoint", "127.0.0.1:7", "--greeting", "hi",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["facts"]["said"] == "hi 127.0.0.1"
    # tiered in the mesh, from what the agent reports
    result = CheckResult(False, Reason.TIMEOUT, 0.5)
    obs = observation(ProbeRun(planned[0], result, 1.0, 0.0, 0.0, "due"), "va", 1)
    assert obs.tier is Tier.SESSION
    engine = DecisionEngine(DecisionPolicy(), [NodeInfo("n1", "p")])
    engine.observe([obs], 1.0)
    assert engine.check_state("n1", "va", "greet.hello").tier is Tier.SESSION
    # listed in the docs
    assert "| greet | `greet.hello` | session | says hello to the node |" in render_reference()
