"""Node load as a check kind: ``telemetry.load`` (tier ``load``, every second or so).

One read runs one shell script on the node — here, inside a named network namespace, or over SSH
— that prints the kernel's counters in sections (``/proc/stat``, ``softnet_stat``,
``/proc/net/snmp``, ``/proc/net/dev``, ``tc -s qdisc``, the VPN daemon's ``/proc/<pid>/stat``,
``wg show <if> dump``, ``swanctl --list-sas``); OpenVPN's clients come from its management
socket. :mod:`probes.checks.load_telemetry` parses them; the rates between this read and the
previous one of the same node become a :class:`probes.model.NodeLoad`, which the agent reports
to the mesh (the weight engine's input, never a verdict's), and the raw counters become
``tunnelwatch_node_*`` metrics.

The first read of a node has nothing to rate against: it succeeds with counters but no load.
A section that fails (no ``tc``, the daemon's pid file gone) leaves its figures out; only
``/proc/stat`` and ``/proc/net/dev`` are required.
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass

import msgspec

from probes.checks import ikev2_telemetry as ike
from probes.checks import load_telemetry as lt
from probes.checks import openvpn_telemetry as ovpn
from probes.checks import wireguard_telemetry as wg
from probes.checks.base import CheckKind, CheckResult, Fact, Stopwatch
from probes.checks.remote import NodeShell, failure_reason, local_output, ssh_output
from probes.model import NodeLoad, Reason, Tier

_MARK = "@@tunnelwatch-load "


class LoadParams(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    ssh: NodeShell | None = None
    netns: str | None = None  # local reads inside this network namespace (`ip netns exec`)
    interfaces: tuple[str, ...] = ()  # counted interfaces; empty = all but lo
    qdisc: bool = True
    daemon_pid_file: str | None = None
    daemon_cores: float = 1.0  # the cores the daemon can use: its busy share is over these
    cpu: str = "both"  # "both", "host" or "daemon": whose busy share counts
    # sessions that are not clients: this agent's own probe identity on the node ("wg:<key>")
    ignore_sessions: tuple[str, ...] = ()
    wireguard_interface: str | None = None
    openvpn_management_socket: str | None = None
    ikev2: bool = False
    ikev2_vici_uri: str | None = None
    effective_window_seconds: float = 30.0
    session_unit_bytes_per_second: float = 125_000.0


def script(params: LoadParams) -> str:
    """The shell script of one read: each section starts with a marker line."""
    parts = [f"echo '{_MARK}stat'; cat /proc/stat",
             f"echo '{_MARK}softnet'; cat /proc/net/softnet_stat",
             f"echo '{_MARK}snmp'; cat /proc/net/snmp",
             f"echo '{_MARK}dev'; cat /proc/net/dev",
             f"echo '{_MARK}clk'; getconf CLK_TCK"]
    if params.qdisc:
        parts.append(f"echo '{_MARK}tc'; tc -s qdisc show")
    if params.daemon_pid_file:
        pid_file = shlex.quote(params.daemon_pid_file)
        parts.append(f"echo '{_MARK}pid'; cat /proc/\"$(cat {pid_file})\"/stat")
    if params.wireguard_interface:
        parts.append(f"echo '{_MARK}wg'; "
                     f"{shlex.join(wg.dump_command(params.wireguard_interface))}")
    if params.ikev2:
        parts.append(f"echo '{_MARK}ike'; "
                     f"{shlex.join(ike.list_sas_command(params.ikev2_vici_uri))}")
    # a failing section must not fail the read: each is optional but stat and dev
    return "\n".join(f"{{ {p}; }} 2>/dev/null" for p in parts) + "\ntrue\n"


def sections(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith(_MARK):
            if name is not None:
                out[name] = "\n".join(lines)
            name, lines = line[len(_MARK):].strip(), []
        elif name is not None:
            lines.append(line)
    if name is not None:
        out[name] = "\n".join(lines)
    return out


# ---- sessions: per-session byte counters, by protocol --------------------------------------

def wireguard_sessions(dump: str, interface: str, now_wall: float) -> dict[str, int]:
    """Active peers' rx + tx bytes (a peer is active while its last handshake is recent)."""
    view = wg.parse_dump(dump, interface)[0]
    return {p.public_key: p.rx_bytes + p.tx_bytes for p in view.peers
            if (age := p.handshake_age(now_wall)) is not None
            and age < wg.ACTIVE_WITHIN_SECONDS}


_IKE_HEAD = re.compile(r"^(?P<name>\S[^:]*): #(?P<id>\d+), (?P<state>[A-Z_]+), IKEv[12],")
_IKE_REMOTE = re.compile(r"^\s+remote\s+'(?P<id>[^']*)' @ (?P<addr>\S+)")
_CHILD_BYTES = re.compile(r"^\s+(?:in|out)\s+\S+,\s+(?P<bytes>\d+) bytes,")


def ikev2_sessions(text: str) -> dict[str, int]:
    """Established IKE SAs' CHILD_SA bytes (in + out), keyed by the peer's identity and
    address (stable across rekeys, which renumber SAs and SPIs)."""
    out: dict[str, int] = {}
    key: str | None = None
    established = False
    for line in text.splitlines():
        head = _IKE_HEAD.match(line)
        if head is not None:
            key = f"#{head['id']}"
            established = head["state"] == "ESTABLISHED"
            if established:
                out[key] = 0
            continue
        if key is None or not established:
            continue
        remote = _IKE_REMOTE.match(line)
        if remote is not None:
            total = out.pop(key)
            key = f"{remote['id']}@{remote['addr']}"
            out[key] = out.get(key, 0) + total
            continue
        moved = _CHILD_BYTES.match(line)
        if moved is not None:
            out[key] = out.get(key, 0) + int(moved["bytes"])
    return out


# ---- state between reads -------------------------------------------------------------------

@dataclass(slots=True)
class _NodeReads:
    previous: lt.LoadCounters | None
    sessions: lt.EffectiveSessions


# one history per node, for the agent process's life (like the reconnect counters)
_READS: dict[str, _NodeReads] = {}


def _reads(params: LoadParams) -> _NodeReads:
    state = _READS.get(params.node)
    if state is None or state.sessions.window != params.effective_window_seconds:
        state = _READS[params.node] = _NodeReads(None, lt.EffectiveSessions(
            params.effective_window_seconds, params.session_unit_bytes_per_second))
    return state


def counters_from(parts: dict[str, str], params: LoadParams, at: float,
                  sessions: dict[str, int] | None, effective: lt.EffectiveSessions
                  ) -> lt.LoadCounters:
    """One read's counters from the script's sections (pure, apart from the tracker)."""
    if "stat" not in parts or "dev" not in parts:
        raise lt.LoadTelemetryError("the read printed no /proc/stat or /proc/net/dev")
    cpu = lt.parse_proc_stat(parts["stat"]) if params.cpu != "daemon" else None
    interfaces = lt.sum_interfaces(lt.parse_net_dev(parts["dev"]), params.interfaces)
    softnet = lt.parse_softnet_stat(parts["softnet"]) if parts.get("softnet") else None
    udp = lt.parse_snmp_udp(parts["snmp"]) if parts.get("snmp") else None
    dropped = backlog = 0
    if parts.get("tc"):
        wanted = set(params.interfaces)
        for q in lt.parse_tc_qdisc(parts["tc"]):
            if q.root and (not wanted or q.device in wanted):
                dropped += q.dropped
                backlog += q.backlog_packets
    process = (lt.parse_process_stat(parts["pid"]) if parts.get("pid") and params.cpu != "host"
               else None)
    active = effective_now = None
    if sessions is not None:
        active = len(sessions)
        effective_now = effective.observe(at, sessions)
    return lt.LoadCounters(at=at, cpu=cpu, process_ticks=process, softnet=softnet, udp=udp,
                           interfaces=interfaces, qdisc_dropped=dropped,
                           qdisc_backlog_packets=backlog, sessions=active,
                           effective_sessions=effective_now)


def _sessions(parts: dict[str, str], params: LoadParams,
              openvpn: ovpn.Telemetry | None) -> dict[str, int] | None:
    found: dict[str, int] | None = None

    def add(more: dict[str, int]) -> None:
        nonlocal found
        found = {**(found or {}), **more}

    if params.wireguard_interface and "wg" in parts:
        add({f"wg:{k}": v for k, v in wireguard_sessions(
            parts["wg"], params.wireguard_interface, time.time()).items()})
    if params.ikev2 and "ike" in parts:
        add({f"ike:{k}": v for k, v in ikev2_sessions(parts["ike"]).items()})
    if openvpn is not None:
        add({f"ovpn:{c.common_name}/{c.real_address}": c.bytes_received + c.bytes_sent
             for c in openvpn.status.clients})
    if found is not None and params.ignore_sessions:
        found = {k: v for k, v in found.items() if k not in params.ignore_sessions}
    return found


async def _run_script(params: LoadParams, timeout: float) -> str:
    text = script(params)
    if params.ssh is not None:
        return await ssh_output(params.ssh.host, text, error=lt.LoadTelemetryError,
                                timeout=timeout, **params.ssh.ssh_options())
    argv = ["sh", "-c", text]
    if params.netns:
        argv = ["ip", "netns", "exec", params.netns, *argv]
    return await local_output(argv, error=lt.LoadTelemetryError, timeout=timeout)


async def _openvpn(params: LoadParams, timeout: float) -> ovpn.Telemetry | None:
    path = params.openvpn_management_socket
    return None if path is None else await ovpn.read_management(path, params.ssh, timeout)


def facts_of(counters: lt.LoadCounters, load: NodeLoad | None) -> dict[str, Fact]:
    """The read's metrics: kernel counters as ``*_total``, levels as gauges."""
    i = counters.interfaces
    facts: dict[str, Fact] = {
        "node_interface_received_bytes_total": i.rx_bytes,
        "node_interface_sent_bytes_total": i.tx_bytes,
        "node_interface_received_packets_total": i.rx_packets,
        "node_interface_sent_packets_total": i.tx_packets,
        "node_interface_dropped_packets_total": i.rx_drops + i.tx_drops,
        "node_qdisc_dropped_packets_total": counters.qdisc_dropped,
        "node_qdisc_backlog_packets": counters.qdisc_backlog_packets,
    }
    if counters.softnet is not None:
        facts["node_softnet_dropped_packets_total"] = counters.softnet.dropped
        facts["node_softnet_squeezes_total"] = counters.softnet.squeezed
    if counters.udp is not None:
        facts["node_udp_receive_errors_total"] = counters.udp.in_errors
        facts["node_udp_receive_buffer_errors_total"] = counters.udp.rcvbuf_errors
    if counters.sessions is not None:
        facts["node_sessions"] = counters.sessions
    if counters.effective_sessions is not None:
        facts["node_effective_sessions"] = round(counters.effective_sessions, 6)
    if load is not None and load.cpu_busy_ratio is not None:
        facts["node_cpu_busy_ratio"] = load.cpu_busy_ratio
    return facts


async def _load(params: LoadParams, timeout: float) -> CheckResult:
    watch = Stopwatch()
    try:
        out = await _run_script(params, timeout)
        openvpn = await _openvpn(params, max(0.1, timeout - watch.elapsed()))
        at = time.monotonic()
        parts = sections(out)
        state = _reads(params)
        current = counters_from(parts, params, at, _sessions(parts, params, openvpn),
                                state.sessions)
        clock = int(parts.get("clk", "100").strip() or "100")
        load = None
        if state.previous is not None and at > state.previous.at:
            load = lt.node_load(state.previous, current, clock_ticks=clock,
                                daemon_cores=params.daemon_cores)
    except ValueError as exc:  # every telemetry error (and a bad number) is a ValueError
        return watch.result(False, failure_reason(exc), detail=str(exc))
    watch.lap("collect")
    state.previous = current
    result = watch.result(True, Reason.OK, facts=facts_of(current, load))
    result.load = load
    return result


LOAD = CheckKind("telemetry.load", Tier.LOAD, LoadParams, _load,
                 "Node load (CPU, softnet, UDP errors, interface rates, qdisc, effective "
                 "sessions) for the mesh's weights")
