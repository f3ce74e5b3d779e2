"""The Paris traceroute core (probes/protocols/traceroute.py) on a simulated path: flows keep
their flow id, answers are matched to probes, each way a flow can end, pacing, bad input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.model import HopReply, TraceProtocol, TraceStop
from probes.protocols.traceroute import TraceCore, TraceSpec
from tests.paths.netsim import SimNet, drive, icmp_packet, ip_header

pytestmark = pytest.mark.paths

SRC, NODE = "10.0.0.2", "10.9.0.2"
ROUTERS = ["10.0.0.1", "10.1.0.1", "10.2.0.1", "10.3.0.1"]


def spec(protocol: TraceProtocol = TraceProtocol.UDP, **kw: object) -> TraceSpec:
    base: dict[str, object] = {"source": SRC, "target": NODE, "protocol": protocol,
                               "port": 51820 if protocol is not TraceProtocol.ICMP else 0,
                               "flows": (61000,), "probe_timeout": 0.5, "id_base": 100}
    base.update(kw)
    return TraceSpec(**base)  # type: ignore[arg-type]


def addrs(flow: object) -> list[str]:
    return [h.addr for h in flow.hops]  # type: ignore[attr-defined]


@pytest.mark.parametrize("protocol", list(TraceProtocol))
def test_the_node_answering_ends_the_flow_reached(protocol: TraceProtocol) -> None:
    core = TraceCore(spec(protocol))
    drive(core, SimNet(NODE, lambda sport: ROUTERS))
    (flow,) = core.result()
    assert flow.stop is TraceStop.REACHED
    assert addrs(flow) == [*ROUTERS, NODE]
    expected = {TraceProtocol.UDP: HopReply.PORT_UNREACHABLE,
                TraceProtocol.TCP: HopReply.TCP_RESET,
                TraceProtocol.ICMP: HopReply.ECHO_REPLY}[protocol]
    assert flow.hops[-1].reply is expected
    assert all(h.reply is HopReply.TIME_EXCEEDED for h in flow.hops[:-1])
    assert all(h.rtt_seconds is not None and h.rtt_seconds >= 0 for h in flow.hops)


def test_tcp_syn_ack_and_big_probes_are_matched() -> None:
    core = TraceCore(spec(TraceProtocol.TCP, port=443, big_size=1400))
    drive(core, SimNet(NODE, lambda sport: ROUTERS, tcp_open=True))
    small, big = core.result()
    assert small.hops[-1].reply is HopReply.TCP_SYN_ACK and small.stop is TraceStop.REACHED
    # the RST to a SYN carrying data acknowledges the data too: still matched
    core = TraceCore(spec(TraceProtocol.TCP, port=443, big_size=1400))
    drive(core, SimNet(NODE, lambda sport: ROUTERS))
    assert core.result()[1].hops[-1].reply is HopReply.TCP_RESET
    assert big.size == 1400


@pytest.mark.parametrize("protocol", list(TraceProtocol))
def test_every_probe_of_a_flow_has_the_same_flow_id(protocol: TraceProtocol) -> None:
    """Paris: addresses, protocol and the first transport bytes a load balancer hashes (UDP
    header; ICMP type, code, checksum and identifier; TCP ports) never change within a flow."""
    net = SimNet(NODE, lambda sport: ROUTERS)
    core = TraceCore(spec(protocol, flows=(61000, 61001), attempts=1))
    drive(core, net)
    by_flow: dict[bytes, set[bytes]] = {}
    for packet in net.sent:
        l4 = packet[20:]
        key = packet[12:20] + bytes([packet[9]])
        head = l4[:4] if protocol is TraceProtocol.TCP else l4[:8]
        flow_id = l4[:2] if protocol is not TraceProtocol.ICMP else l4[4:6]
        by_flow.setdefault(key + flow_id, set()).add(head)
    assert len(by_flow) == 2
    assert all(len(heads) == 1 for heads in by_flow.values())
    ids = [struct.unpack_from("!H", p, 4)[0] for p in net.sent]
    assert len(set(ids)) == len(ids) and 0 not in ids  # the IP id tells probes apart
    assert all(p[6] & 0x40 for p in net.sent)  # DF on every probe


def test_a_silent_node_ends_the_flow_after_the_gap() -> None:
    core = TraceCore(spec(gap_limit=2))
    duration = drive(core, SimNet(NODE, lambda sport: ROUTERS, node_answers=False))
    (flow,) = core.result()
    assert flow.stop is TraceStop.GAP
    assert addrs(flow) == ROUTERS  # trailing silence is left out
    assert duration < 2.0  # a silent hop costs attempts x timeout, not more


def test_a_black_hole_stops_every_flow_after_the_hop() -> None:
    core = TraceCore(spec(flows=(61000, 61001, 61002)))
    drive(core, SimNet(NODE, lambda sport: ROUTERS, black_hole_after=2))
    assert all(addrs(f) == ROUTERS[:2] and f.stop is TraceStop.GAP for f in core.result())


def test_flows_take_their_own_ecmp_branch() -> None:
    def routes(sport: int) -> list[str]:
        branch = "10.2.0.1" if sport % 2 else "10.2.0.9"
        return ["10.0.0.1", "10.1.0.1", branch, "10.3.0.1"]

    core = TraceCore(spec(flows=(61000, 61001, 61002, 61003)))
    drive(core, SimNet(NODE, routes))
    third = {f.sport: f.hops[2].addr for f in core.result()}
    assert third == {61000: "10.2.0.9", 61001: "10.2.0.1", 61002: "10.2.0.9",
                     61003: "10.2.0.1"}


def test_a_rate_limited_router_answers_the_second_attempt() -> None:
    core = TraceCore(spec(attempts=2))
    drive(core, SimNet(NODE, lambda sport: ROUTERS, rate_limit={2: 2}))
    (flow,) = core.result()
    assert addrs(flow) == [*ROUTERS, NODE]
    core = TraceCore(spec(attempts=1))
    drive(core, SimNet(NODE, lambda sport: ROUTERS, rate_limit={2: 2}))
    (flow,) = core.result()
    # a hole where the router kept quiet, and the trace goes on past it
    assert addrs(flow) == [ROUTERS[0], "", *ROUTERS[2:], NODE]
    assert flow.stop is TraceStop.REACHED


def test_frag_needed_names_the_mtu_and_the_router() -> None:
    core = TraceCore(spec(big_size=1500))
    drive(core, SimNet(NODE, lambda sport: ROUTERS, mtu_after=(2, 1280, True)))
    small, big = core.result()
    assert addrs(small) == [*ROUTERS, NODE]
    assert big.size == 1500 and big.stop is TraceStop.UNREACHABLE
    frag = big.hops[-1]
    assert (frag.reply, frag.mtu, frag.addr) == (HopReply.FRAG_NEEDED, 1280, ROUTERS[1])


def test_a_pmtu_black_hole_shows_as_big_probes_stopping_early() -> None:
    core = TraceCore(spec(big_size=1500, gap_limit=2))
    drive(core, SimNet(NODE, lambda sport: ROUTERS, mtu_after=(2, 1280, False)))
    small, big = core.result()
    assert addrs(small) == [*ROUTERS, NODE]
    assert addrs(big) == ROUTERS[:2] and big.stop is TraceStop.GAP


def test_unreachable_from_a_router_ends_the_flow() -> None:
    core = TraceCore(spec())
    drive(core, SimNet(NODE, lambda sport: ROUTERS, unreachable_at=3))
    (flow,) = core.result()
    assert flow.stop is TraceStop.UNREACHABLE
    assert flow.hops[-1].reply is HopReply.UNREACHABLE and flow.hops[-1].addr == ROUTERS[2]


def test_a_forwarding_loop_is_detected() -> None:
    loop = ["10.0.0.1", "10.1.0.1", "10.2.0.1", "10.1.0.1", "10.2.0.1", "10.1.0.1"] * 5
    core = TraceCore(spec(max_ttl=30))
    drive(core, SimNet(NODE, lambda sport: loop, node_answers=False))
    (flow,) = core.result()
    assert flow.stop is TraceStop.LOOP
    assert len(flow.hops) <= 5


def test_routers_quoting_more_than_eight_bytes_are_matched_too() -> None:
    core = TraceCore(spec())
    drive(core, SimNet(NODE, lambda sport: ROUTERS, quote=500))
    assert addrs(core.result()[0]) == [*ROUTERS, NODE]


def test_nothing_answering_ends_after_the_gap_with_no_hops() -> None:
    core = TraceCore(spec(gap_limit=3))
    drive(core, SimNet(NODE, lambda sport: [], node_answers=False))
    (flow,) = core.result()
    assert flow.hops == [] and flow.stop is TraceStop.GAP


def test_probes_are_paced() -> None:
    core = TraceCore(spec(flows=tuple(range(61000, 61016)), packets_per_second=100,
                          window=4))
    core.start(0.0)
    first = core.datagrams_to_send(0.0)
    assert len(first) <= 5  # the burst: 50 ms worth
    timer = core.get_timer()
    assert timer is not None and 0 < timer <= 0.011
    assert len(core.datagrams_to_send(1.0)) <= 6


def test_answers_to_other_traffic_are_ignored() -> None:
    """Another host's probes, another port, an echo reply from elsewhere: not ours."""
    other = ip_header(SRC, "10.8.8.8", 17, 8, ident=100) + struct.pack("!HHHH", 61000, 51820,
                                                                        8, 0)
    wrong_port = ip_header(SRC, NODE, 17, 8, ident=100) + struct.pack("!HHHH", 61000, 53, 8, 0)
    junk = [icmp_packet("10.5.5.5", SRC, 11, 0, 0, other),
            icmp_packet("10.5.5.5", SRC, 11, 0, 0, wrong_port),
            icmp_packet("10.5.5.5", SRC, 0, 0, 0, b"\x00\x64\xff\x9b"),
            b"", b"\x45", b"\x60" + bytes(40)]
    core = TraceCore(spec())
    drive(core, SimNet(NODE, lambda sport: ROUTERS), extra=lambda now: junk)
    assert addrs(core.result()[0]) == [*ROUTERS, NODE]


def test_local_refusal_ends_only_that_lane() -> None:
    core = TraceCore(spec(big_size=9000))
    core.start(0.0)
    for packet in core.datagrams_to_send(0.0):
        if len(packet) == 9000:
            core.local_error(packet)
    small, big = core.result()
    assert big.stop is TraceStop.LOCAL_ERROR and small.stop is not TraceStop.LOCAL_ERROR


def test_bad_specs_are_refused() -> None:
    for bad in ({"flows": ()}, {"first_ttl": 0}, {"max_ttl": 300}, {"attempts": 0},
                {"probe_timeout": 0.0}):
        with pytest.raises(ValueError):
            spec(**bad)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=20), st.sampled_from(list(TraceProtocol)))
def test_fuzz_random_packets_never_raise(packets: list[bytes], protocol: TraceProtocol) -> None:
    core = TraceCore(spec(protocol, flows=(61000, 61001), big_size=1400))
    core.start(0.0)
    sent = core.datagrams_to_send(0.0)
    for data in packets:
        core.receive_datagram(data, None, 0.1)
    # and answers built from our own probes with random damage
    for packet in sent:
        for cut in (0, 7, 20, 27, 28, len(packet)):
            core.receive_datagram(icmp_packet(ROUTERS[0], SRC, 11, 0, 0, packet[:cut]), None,
                                  0.2)
    core.handle_timer(100.0)
    core.result()


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=1, max_value=6), st.integers(min_value=0, max_value=6),
       st.integers(min_value=1, max_value=3), st.booleans(), st.sampled_from(list(TraceProtocol)))
def test_fuzz_paths_always_end_and_hops_increase(hops: int, hole: int, rate: int,
                                                 answers: bool, protocol: TraceProtocol) -> None:
    routers = [f"10.{i}.0.1" for i in range(hops)]
    net = SimNet(NODE, lambda sport: routers, node_answers=answers,
                 black_hole_after=hole if hole < hops else None,
                 rate_limit={1: rate} if rate > 1 else {})
    core = TraceCore(spec(protocol, flows=(61000, 61001), big_size=1300, gap_limit=2))
    drive(core, net)
    assert core.done
    for flow in core.result():
        ttls = [h.ttl for h in flow.hops]
        assert ttls == sorted(set(ttls))
        assert not flow.hops or flow.hops[-1].addr
