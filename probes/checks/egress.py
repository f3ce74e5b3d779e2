"""Egress through the tunnel: echoes to addresses *beyond* the node (docs/probes/user-path.md).

The session check echoes the node's own tunnel address, which answers even when the node
forwards nothing. This step echoes the node too, and every configured target beside it, in one
paced run (ICMP to each target; UDP to a ``tunnelwatch reflector`` where the target names a
port), so it tells three things apart:

* nothing answers, the node included: the tunnel carries nothing (``tunnel-no-reply``);
* the node answers, fewer than ``min_targets`` targets do: the node is up and useless to its
  users (``egress-failed``; forwarding off, the NAT rule gone, a black hole beyond the node);
* enough targets answer: ok, with loss and RTT over the targets' echoes, and per target in the
  facts.

An ICMP error about a target's echo (host unreachable from a router beyond the node) goes into
the detail: it says where the path ends.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from probes.checks.base import CheckResult, Fact
from probes.checks.tunnel import EchoRun, Tunnel, TunnelProbe, echo_quality
from probes.config import EgressCheck
from probes.model import Quality, Reason
from probes.protocols import ipv4, reflector

_PAYLOAD_TAG = b"tunnelwatch-egress-"


@dataclass(frozen=True, slots=True)
class _Probe:
    """One kind of echo in the run: to the node, or ICMP/UDP to one target."""

    target: str  # the target's name; "" for the node
    address: str
    udp_port: int | None = None


@dataclass
class _Plan:
    probes: list[_Probe]
    count: int
    errors: dict[str, str] = field(default_factory=dict)  # target name -> last ICMP error

    def probe_of(self, seq: int) -> _Probe:
        return self.probes[seq % len(self.probes)]

    def seqs(self, target: str) -> list[int]:
        return [seq for seq in range(self.count * len(self.probes))
                if self.probe_of(seq).target == target]


def _plan(tunnel: Tunnel, check: EgressCheck) -> _Plan:
    probes = [_Probe("", tunnel.node)]
    for target in check.targets:
        probes.append(_Probe(target.name, target.address))
        if target.udp_port is not None:
            probes.append(_Probe(target.name, target.address, target.udp_port))
    return _Plan(probes, max(check.echo_count, 1))


async def egress_step(tunnel: Tunnel, probe: TunnelProbe, check: EgressCheck) -> CheckResult:
    """Echo the node and every target through ``tunnel``; judge as the module says."""
    plan = _plan(tunnel, check)
    ident = secrets.randbelow(0xFFFF) + 1
    sport = 1024 + secrets.randbelow(64_000)
    session = secrets.token_bytes(8)
    payload = _PAYLOAD_TAG + secrets.token_bytes(8)
    by_address = {p.address: p.target for p in plan.probes if p.target}

    def build(seq: int) -> bytes:
        p = plan.probe_of(seq)
        if p.udp_port is None:
            return ipv4.echo_packet(tunnel.source, p.address, ident, seq, payload)
        request = reflector.build_request(reflector.Kind.ECHO, session, seq)
        return ipv4.udp_packet(tunnel.source, p.address, sport, p.udp_port, request)

    def match(packet: bytes) -> int | None:
        parsed = ipv4.parse(packet)
        if isinstance(parsed, ipv4.EchoReply):
            if parsed.ident != ident or parsed.seq >= len(plan.probes) * plan.count:
                return None
            return parsed.seq if parsed.src == plan.probe_of(parsed.seq).address else None
        if isinstance(parsed, ipv4.UdpDatagram) and parsed.dport == sport:
            reply = reflector.parse_reply(parsed.payload)
            if reply is None or reply.session != session:
                return None
            p = plan.probe_of(reply.seq)
            ok = p.udp_port == parsed.sport and p.address == parsed.src
            return reply.seq if ok else None
        return None

    def other(packet: bytes) -> None:
        parsed = ipv4.parse(packet)
        if isinstance(parsed, ipv4.IcmpError) and parsed.dst in by_address:
            ours = (parsed.proto == ipv4.PROTO_ICMP and parsed.first == ident) or (
                parsed.proto == ipv4.PROTO_UDP and parsed.first == sport)
            if ours:
                plan.errors[by_address[parsed.dst]] = parsed.describe()

    run = EchoRun(ident, match=match)
    await run.through(tunnel, plan.count * len(plan.probes), check.echo_interval,
                      probe.deadline, build, other=other)
    probe.watch.lap("egress")
    return _judge(probe, run, plan, check)


def _judge(probe: TunnelProbe, run: EchoRun, plan: _Plan, check: EgressCheck) -> CheckResult:
    node = run.quality(plan.seqs(""))
    facts: dict[str, Fact] = probe.facts
    facts["egress_node_answered"] = node.received
    per_target: dict[str, Quality] = {}
    for target in check.targets:
        quality = run.quality(plan.seqs(target.name))
        per_target[target.name] = quality
        facts[f"egress_{target.name}_loss_ratio"] = quality.loss_ratio
        if quality.rtt_p50_seconds is not None:
            facts[f"egress_{target.name}_rtt_p50_seconds"] = quality.rtt_p50_seconds
    target_seqs = [seq for t in check.targets for seq in plan.seqs(t.name)]
    quality = echo_quality(len(target_seqs), [run.rtts[s] for s in target_seqs
                                              if s in run.rtts])
    answering = [name for name, q in per_target.items() if q.received]
    if not answering and not node.received:
        return probe.watch.result(
            False, Reason.TUNNEL_NO_REPLY, quality=quality, facts=facts,
            detail=f"nothing came back through the tunnel: neither the node ({node.sent} "
                   f"echoes) nor any of {len(per_target)} target(s)")
    if len(answering) < check.min_targets:
        silent = "; ".join(_describe(name, q, plan.errors.get(name))
                           for name, q in per_target.items() if not q.received)
        return probe.watch.result(
            False, Reason.EGRESS_FAILED, quality=quality, facts=facts,
            detail=f"the node answers in the tunnel ({node.received}/{node.sent}), "
                   f"{len(answering)} of {len(per_target)} target(s) beyond it do "
                   f"(at least {check.min_targets} must): {silent}")
    return probe.watch.result(True, Reason.OK, quality=quality, facts=facts)


def _describe(name: str, quality: Quality, error: str | None) -> str:
    text = f"{name}: 0/{quality.sent} answered"
    return f"{text}, {error}" if error else text
