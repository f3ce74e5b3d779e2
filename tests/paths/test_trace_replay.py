"""The trace core on traces recorded packet by packet over real Linux routers
(data/real-traces.jsonl, recorded by tests/paths/record_packets.py): what real kernels send back
(ICMP errors quoting up to 576 bytes, frag-needed with the next link's MTU, rate-limited and
silent routers, an unreachable route, a forwarding loop, SYN-ACK, RST, echo reply) is read into
the same hops again, the probes come out byte for byte, and the mesh localises the faults."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import msgspec
import pytest

from probes.mesh import pathcompare as pc
from probes.mesh.paths import PathEngine, PathPolicy
from probes.model import HopReply, PathFlow, PathTrace, TraceProtocol, TraceStop, TraceTrigger
from probes.paths.asn import AsnTable
from probes.protocols.traceroute import TraceCore, TraceSpec

pytestmark = pytest.mark.paths

DATA = Path(__file__).parent / "data" / "real-traces.jsonl"
# the recorder's chain v -- r1 -- r2 -- r3 -- n: each router answers from its link toward v
R1, R2, R3, NODE = "10.82.1.2", "10.82.2.2", "10.82.3.2", "10.82.4.2"
TABLE = AsnTable([("10.82.1.0/24", 64601), ("10.82.2.0/24", 64602), ("10.82.3.0/24", 64603),
                  ("10.82.4.0/24", 64604)], {64602: "transit-r2"})


@cache
def records() -> dict[str, dict[str, Any]]:
    out = {}
    for line in DATA.read_text().splitlines():
        record = json.loads(line)
        out[record["name"]] = record
    return out


def replay(record: dict[str, Any]) -> TraceCore:
    """The recorded calls into a fresh core; every batch of probes must be the recorded one."""
    spec = dict(record["spec"])
    spec["protocol"] = TraceProtocol(spec["protocol"])
    spec["flows"] = tuple(spec["flows"])
    core = TraceCore(TraceSpec(**spec))
    for call in record["calls"]:
        match call:
            case ["start", now]:
                core.start(now)
            case ["timer", now]:
                core.handle_timer(now)
            case ["send", now, packets]:
                assert [p.hex() for p in core.datagrams_to_send(now)] == packets
            case ["recv", now, data]:
                core.receive_datagram(bytes.fromhex(data), None, now)
            case ["local-error", packet, mtu]:
                core.local_error(bytes.fromhex(packet), mtu)
    assert core.done
    return core


def flows(name: str) -> list[PathFlow]:
    return replay(records()[name]).result()


def addrs(flow: PathFlow) -> list[str]:
    return [h.addr for h in flow.hops]


@pytest.mark.parametrize("name", sorted(records()))
def test_recorded_traces_replay_to_the_same_probes_and_hops(name: str) -> None:
    record = records()[name]
    result = replay(record).result()
    assert msgspec.to_builtins(result) == record["result"]
    assert all(f.hops and f.hops[0].addr == R1 for f in result)  # every trace read something


@pytest.mark.parametrize(("name", "reply"), [
    ("udp-closed-port", HopReply.PORT_UNREACHABLE), ("tcp-syn-ack", HopReply.TCP_SYN_ACK),
    ("tcp-reset", HopReply.TCP_RESET), ("icmp-echo", HopReply.ECHO_REPLY)])
def test_the_node_answering_in_its_protocol_ends_every_flow(name: str, reply: HopReply) -> None:
    for flow in flows(name):
        assert addrs(flow) == [R1, R2, R3, NODE] and flow.stop is TraceStop.REACHED
        assert flow.hops[-1].reply is reply
        assert all(h.reply is HopReply.TIME_EXCEEDED for h in flow.hops[:-1])
        assert all(h.rtt_seconds is not None and h.rtt_seconds >= 0 for h in flow.hops)
    assert flows("udp-closed-port")[-1].size == 1500  # big probes pass where nothing is small


def test_a_silent_vpn_port_ends_with_the_last_router() -> None:
    assert all(addrs(f) == [R1, R2, R3] and f.stop is TraceStop.GAP
               for f in flows("udp-silent-port"))


def test_a_black_hole_is_a_partial_trace_ending_at_the_last_answer() -> None:
    assert all(addrs(f) == [R1, R2] and f.stop is TraceStop.GAP
               for f in flows("black-hole-after-r2"))


def test_frag_needed_names_the_router_and_the_mtu() -> None:
    *small, big = flows("frag-needed-at-r2")
    assert all(addrs(f) == [R1, R2, R3] for f in small)
    assert big.size == 1500 and big.stop is TraceStop.UNREACHABLE
    assert (big.hops[-1].addr, big.hops[-1].reply, big.hops[-1].mtu) == (
        R2, HopReply.FRAG_NEEDED, 1280)


def test_a_pmtu_black_hole_shows_as_big_probes_stopping_early() -> None:
    *small, big = flows("pmtu-black-hole-at-r2")
    assert all(addrs(f) == [R1, R2, R3] for f in small)
    assert addrs(big) == [R1, R2] and big.stop is TraceStop.GAP


def _sent_ttls(name: str) -> list[int]:
    return [bytes.fromhex(p)[8] for c in records()[name]["calls"] if c[0] == "send"
            for p in c[2]]


def test_rate_limited_routers_answer_a_later_attempt_or_leave_a_hole() -> None:
    # one answer every 250 ms, none saved up: both first probes to r2 went unanswered, the
    # retries 300 ms later got one answer; the other flow has a hole there and goes on
    first, second = flows("rate-limited-r2")
    assert _sent_ttls("rate-limited-r2").count(2) == 4
    assert addrs(first) == [R1, R2, R3] and addrs(second) == [R1, "", R3]
    # silent for the whole trace: a hole, and the trace goes on past it
    assert all(addrs(f) == [R1, "", R3] and f.hops[1].reply is None
               for f in flows("silent-r2"))


def test_an_unreachable_route_answers_unreachable_once_its_tokens_built_up() -> None:
    # first met, Linux's per-destination error tokens are empty: it looks like a black hole
    assert all(addrs(f) == [R1, R2] for f in flows("unreachable-at-r3-first"))
    stopped = [f for f in flows("unreachable-at-r3") if f.stop is TraceStop.UNREACHABLE]
    assert stopped and all(addrs(f) == [R1, R2, R3] and f.hops[-1].reply is
                           HopReply.UNREACHABLE for f in stopped)


def test_a_forwarding_loop_is_detected() -> None:
    assert all(addrs(f)[:3] == [R1, R2, R1] and f.stop is TraceStop.LOOP
               for f in flows("loop-r1-r2"))


def _trace(name: str, failing: bool) -> PathTrace:
    spec = records()[name]["spec"]
    return PathTrace(node="n1", vantage="va", wall_time=0.0, failing=failing,
                     trigger=TraceTrigger.CHANGE if failing else TraceTrigger.BASELINE,
                     target=spec["target"], protocol=TraceProtocol(spec["protocol"]),
                     port=spec["port"], flows=flows(name))


@pytest.mark.parametrize(("fault", "kind", "where"), [
    ("black-hole-after-r2", pc.STOP, R2), ("frag-needed-at-r2", pc.MTU, R2),
    ("pmtu-black-hole-at-r2", pc.MTU, R2), ("unreachable-at-r3", pc.UNREACHABLE, R3),
    ("loop-r1-r2", pc.LOOP, R1), ("unreachable-at-r3-first", pc.STOP, R2)])
def test_the_mesh_localises_the_recorded_faults(fault: str, kind: str, where: str) -> None:
    """The healthy recorded trace to the silent port is the reference; each recorded fault's
    trace, failing, is judged against it."""
    engine = PathEngine(PathPolicy(), TABLE, {"n1"})
    engine.ingest([_trace("udp-silent-port", False)], 1.0)
    engine.ingest([_trace(fault, True)], 2.0)
    loc = engine.localise("n1", 2.0)
    assert loc is not None
    found = loc.findings[0].finding
    assert found is not None and (found.kind, found.hop.addr) == (kind, where)
    if fault == "frag-needed-at-r2":
        assert found.mtu == 1280
    if kind == pc.STOP:
        assert found.next_hop is not None and found.next_hop.addr == R3
        assert found.network is not None and found.network.asn == 64602


def test_recorded_packets_cut_short_never_raise() -> None:
    """Every packet a real router sent, truncated at every length (and with junk after the
    cut): never an exception (test_trace_core fuzzes random bytes)."""
    record = records()["frag-needed-at-r2"]
    received = [bytes.fromhex(c[2]) for c in record["calls"] if c[0] == "recv"]
    core = replay(record)  # finished: what comes late changes nothing it found
    for data in received:
        for cut in range(len(data)):
            core.receive_datagram(data[:cut], None, 99.0)
            core.receive_datagram(data[:cut] + b"\xff" * 3, None, 99.0)
    assert msgspec.to_builtins(core.result()) == record["result"]
