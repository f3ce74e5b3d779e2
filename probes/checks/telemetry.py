"""Node telemetry as check kinds: ``telemetry.wireguard``, ``telemetry.openvpn``,
``telemetry.ikev2``.

Each reads what the node says about its own sessions — on this host when the agent runs on the
node, else over SSH — and returns it as numeric ``node_*`` facts, which the agent exports as
``tunnelwatch_node_*`` metrics (docs/metrics-agent.md). The kinds run in the ``telemetry`` tier:
the agent never reports them to the mesh, because a node whose SSH is down may serve its clients
perfectly well; telemetry feeds load-balance and reconnect metrics, not verdicts.

Facts (every kind): ``node_active_peers`` (sessions in use now). WireGuard and OpenVPN also give
``node_reconnects_total`` (see :mod:`probes.checks.reconnects`; counted from this agent's start)
and ``node_received_bytes_total`` / ``node_sent_bytes_total`` (the node's own counters); IKEv2
gives ``node_half_open_sas`` and ``node_child_sas``.
"""

from __future__ import annotations

import base64
import time

import msgspec

from probes.checks import ikev2_telemetry as ike
from probes.checks import load
from probes.checks import openvpn_telemetry as ovpn
from probes.checks import wireguard_telemetry as wg
from probes.checks.base import CheckKind, CheckResult, Fact, Family, PlanContext, Planned, Stopwatch
from probes.checks.reconnects import ReconnectCounter
from probes.checks.remote import NodeShell, TelemetryError, failure_reason
from probes.checks.wireguard import read_key_file
from probes.model import Reason, Tier
from probes.protocols.wireguard import public_key


class WireGuardTelemetry(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    interface: str
    ssh: NodeShell | None = None


class OpenVPNTelemetry(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    management_socket: str
    ssh: NodeShell | None = None


class IKEv2Telemetry(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    vici_uri: str | None = None
    ssh: NodeShell | None = None


# one reconnect counter per (node, kind), living as long as the agent process: a reload keeps
# the counts, a restart starts them again (Prometheus' rate() handles the reset)
_COUNTERS: dict[tuple[str, str], ReconnectCounter] = {}


def reconnect_counter(node: str, kind: str) -> ReconnectCounter:
    counter = _COUNTERS.get((node, kind))
    if counter is None:
        counter = _COUNTERS[(node, kind)] = ReconnectCounter()
    return counter


async def _wireguard(params: WireGuardTelemetry, timeout: float) -> CheckResult:
    watch = Stopwatch()
    try:
        view = await wg.collect(params.interface, params.ssh, timeout=timeout)
    except TelemetryError as exc:
        return watch.result(False, failure_reason(exc), detail=str(exc))
    watch.lap("collect")
    # handshake times are the node's clock; skew between it and ours shifts the 180 s window
    now = time.time()
    active = {p.public_key: "" for p in view.peers
              if (age := p.handshake_age(now)) is not None and age < wg.ACTIVE_WITHIN_SECONDS}
    counter = reconnect_counter(params.node, WIREGUARD.name)
    counter.observe(active)
    facts: dict[str, Fact] = {
        "node_active_peers": len(active), "node_peers": len(view.peers),
        "node_reconnects_total": counter.total, "node_received_bytes_total": view.rx_bytes,
        "node_sent_bytes_total": view.tx_bytes}
    return watch.result(True, Reason.OK, facts=facts)


async def _openvpn(params: OpenVPNTelemetry, timeout: float) -> CheckResult:
    watch = Stopwatch()
    try:
        view = await ovpn.read_management(params.management_socket, params.ssh, timeout)
    except TelemetryError as exc:
        return watch.result(False, failure_reason(exc), detail=str(exc))
    watch.lap("collect")
    # a client's session is its connection: a new "connected since" or source is a new one
    sessions = {c.common_name: f"{c.connected_since} {c.real_address}"
                for c in view.status.clients}
    counter = reconnect_counter(params.node, OPENVPN.name)
    counter.observe(sessions)
    facts: dict[str, Fact] = {"node_active_peers": len(view.status.clients),
                              "node_reconnects_total": counter.total}
    if view.load is not None:
        facts["node_received_bytes_total"] = view.load.bytes_in
        facts["node_sent_bytes_total"] = view.load.bytes_out
    return watch.result(True, Reason.OK, facts=facts)


async def _ikev2(params: IKEv2Telemetry, timeout: float) -> CheckResult:
    watch = Stopwatch()
    try:
        counts = await ike.collect(params.vici_uri, params.ssh, timeout=timeout)
    except TelemetryError as exc:
        return watch.result(False, failure_reason(exc), detail=str(exc))
    watch.lap("collect")
    # no reconnect count: an IKE SA rekey also gets a new unique id, so ids cannot tell them
    established = counts.ike_by_state.get("ESTABLISHED", 0)
    return watch.result(True, Reason.OK, facts={
        "node_active_peers": established, "node_half_open_sas": counts.half_open,
        "node_child_sas": counts.child_sas})


WIREGUARD = CheckKind("telemetry.wireguard", Tier.TELEMETRY, WireGuardTelemetry, _wireguard,
                      "WireGuard peers from `wg show <if> dump` on the node")
OPENVPN = CheckKind("telemetry.openvpn", Tier.TELEMETRY, OpenVPNTelemetry, _openvpn,
                    "OpenVPN clients from the node's management socket")
IKEV2 = CheckKind("telemetry.ikev2", Tier.TELEMETRY, IKEv2Telemetry, _ikev2,
                  "IKE SAs from `swanctl --list-sas` on the node")


def plan(ctx: PlanContext) -> list[Planned]:
    """The ``telemetry:`` section -> one read per source it names (and the node's load)."""
    target = ctx.target
    section = target.telemetry
    if section is None:
        return []
    shell = None
    if section.ssh is not None:
        login = section.ssh
        shell = NodeShell(
            host=login.host or target.address, port=login.port, username=login.username,
            key_file=ctx.path(login.key_file), known_hosts_file=ctx.path(login.known_hosts_file),
            verify_host_key=login.verify_host_key)
    out: list[Planned] = []
    if section.wireguard_interface is not None:
        out.append(Planned.of(WIREGUARD, WireGuardTelemetry(
            node=target.id, interface=section.wireguard_interface, ssh=shell)))
    if section.openvpn_management_socket is not None:
        out.append(Planned.of(OPENVPN, OpenVPNTelemetry(
            node=target.id, management_socket=section.openvpn_management_socket, ssh=shell)))
    if section.ikev2:
        out.append(Planned.of(IKEV2, IKEv2Telemetry(
            node=target.id, vici_uri=section.ikev2_vici_uri, ssh=shell)))
    if section.load is not None:
        reads = section.load
        out.append(Planned.of(load.LOAD, load.LoadParams(
            node=target.id, ssh=shell, netns=reads.netns, interfaces=tuple(reads.interfaces),
            qdisc=reads.qdisc, daemon_pid_file=reads.daemon_pid_file,
            daemon_cores=reads.daemon_cores, wireguard_interface=section.wireguard_interface,
            openvpn_management_socket=section.openvpn_management_socket, ikev2=section.ikev2,
            ikev2_vici_uri=section.ikev2_vici_uri, cpu=reads.cpu,
            ignore_sessions=_own_probe_peers(ctx),
            effective_window_seconds=reads.effective_window_seconds,
            session_unit_bytes_per_second=reads.session_unit_bytes_per_second)))
    return out


def _own_probe_peers(ctx: PlanContext) -> tuple[str, ...]:
    """This agent's WireGuard probe identity on the node: a peer of the node, not a client."""
    section = ctx.target.wireguard
    if section is None:
        return ()
    try:
        private = read_key_file(ctx.path(section.private_key_file), "private key")
    except ValueError:
        return ()  # the WireGuard check reports an unreadable key; load reads go on
    return (f"wg:{base64.b64encode(public_key(private)).decode()}",)


FAMILY = Family("telemetry", (WIREGUARD, OPENVPN, IKEV2, load.LOAD), plan,
                "Node telemetry and load: what a node says about itself (metrics and weights, "
                "never verdicts)")
