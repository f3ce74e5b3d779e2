"""The user-space TCP client (probes.protocols.tcp), sans-I/O: handshake, data in order, a gap
answered with a duplicate ACK, overlapping resends, resends on the timer then giving up, the
peer's window, RSTs that fit and RSTs that do not, FIN; garbage never raises."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from probes.protocols import ipv4
from probes.protocols.tcp import (
    Connected,
    Event,
    GaveUp,
    PeerClosed,
    Received,
    Reset,
    TcpClient,
)

ME, SERVER = "10.201.0.2", "198.51.100.9"
ISS, IRS = 1000, 5_000_000


def _client(mss: int = 1200, rto: float = 0.5, max_sends: int = 4) -> TcpClient:
    return TcpClient(ME, SERVER, 40000, 443, ISS, mss=mss, rto=rto, max_sends=max_sends)


def _out(c: TcpClient) -> list[ipv4.TcpSegment]:
    segments = []
    for packet in c.packets_to_send(0.0):
        parsed = ipv4.parse(packet)
        assert isinstance(parsed, ipv4.TcpSegment)
        segments.append(parsed)
    return segments


def _seg(flags: int, seq: int, ack: int = ISS + 1, payload: bytes = b"",
         window: int = 65535) -> ipv4.TcpSegment:
    parsed = ipv4.parse(ipv4.tcp_packet(SERVER, ME, 443, 40000, seq=seq, ack=ack, flags=flags,
                                        window=window, payload=payload))
    assert isinstance(parsed, ipv4.TcpSegment)
    return parsed


def _events(c: TcpClient) -> list[Event]:
    out = []
    while (e := c.next_event()) is not None:
        out.append(e)
    return out


def _connected(mss: int = 1200) -> TcpClient:
    c = _client(mss=mss)
    c.connect(0.0)
    _out(c)
    c.receive(_seg(ipv4.TCP_SYN | ipv4.TCP_ACK, IRS), 0.01)
    assert _events(c) == [Connected()]
    _out(c)
    return c


def test_the_handshake_announces_the_mss_and_acknowledges_the_syn_ack() -> None:
    c = _client(mss=1100)
    c.connect(0.0)
    (syn,) = _out(c)
    assert syn.flags == ipv4.TCP_SYN and syn.seq == ISS and syn.payload == b""
    # the MSS option, as the SYN carries it
    packet = ipv4.tcp_packet(ME, SERVER, 40000, 443, seq=ISS, ack=0, flags=ipv4.TCP_SYN,
                             window=65535, mss=1100)
    assert packet[20 + 20:20 + 24] == bytes([2, 4]) + (1100).to_bytes(2, "big")
    c.receive(_seg(ipv4.TCP_SYN | ipv4.TCP_ACK, IRS), 0.01)
    assert _events(c) == [Connected()]
    (ack,) = _out(c)
    assert ack.flags == ipv4.TCP_ACK and ack.seq == ISS + 1 and ack.ack == IRS + 1
    assert c.get_timer() is None  # nothing unacknowledged


def test_a_syn_ack_for_another_syn_is_dropped() -> None:
    c = _client()
    c.connect(0.0)
    _out(c)
    c.receive(_seg(ipv4.TCP_SYN | ipv4.TCP_ACK, IRS, ack=ISS + 7), 0.01)
    assert _events(c) == [] and not c.established and c.dropped == 1


def test_data_goes_out_in_mss_segments_within_the_window_and_is_acknowledged() -> None:
    c = _connected(mss=600)
    c.receive(_seg(ipv4.TCP_ACK, IRS + 1, ack=ISS + 1, window=1000), 0.02)
    c.send(b"x" * 1500, 0.03)
    sent = _out(c)
    assert [len(s.payload) for s in sent] == [600, 400]  # the window holds 1000
    c.receive(_seg(ipv4.TCP_ACK, IRS + 1, ack=ISS + 1 + 1000, window=1000), 0.04)
    (last,) = _out(c)
    assert last.seq == ISS + 1 + 1000 and len(last.payload) == 500
    c.receive(_seg(ipv4.TCP_ACK, IRS + 1, ack=ISS + 1 + 1500), 0.05)
    assert c.all_acknowledged and c.get_timer() is None


def test_a_gap_is_answered_with_a_duplicate_ack_and_filled_by_the_resend() -> None:
    c = _connected()
    first, second = b"a" * 10, b"b" * 10
    c.receive(_seg(ipv4.TCP_ACK | ipv4.TCP_PSH, IRS + 11, payload=second), 0.02)
    (dup,) = _out(c)
    assert dup.ack == IRS + 1 and _events(c) == [] and c.dropped == 1
    c.receive(_seg(ipv4.TCP_ACK | ipv4.TCP_PSH, IRS + 1, payload=first), 0.03)
    assert _events(c) == [Received(first)]
    # the resend overlaps: only its new part is taken
    c.receive(_seg(ipv4.TCP_ACK | ipv4.TCP_PSH, IRS + 6, payload=b"a" * 5 + second), 0.04)
    assert _events(c) == [Received(second)]
    assert _out(c)[-1].ack == IRS + 21
    c.receive(_seg(ipv4.TCP_ACK | ipv4.TCP_FIN, IRS + 21), 0.05)
    assert _events(c) == [PeerClosed()] and _out(c)[-1].ack == IRS + 22


def test_unanswered_segments_are_resent_with_a_doubling_timer_then_given_up() -> None:
    c = _client(rto=0.5, max_sends=3)
    c.connect(0.0)
    assert len(_out(c)) == 1 and c.get_timer() == 0.5
    c.handle_timer(0.4)
    assert _out(c) == []  # not yet
    c.handle_timer(0.5)
    assert [s.flags for s in _out(c)] == [ipv4.TCP_SYN]
    assert c.get_timer() == 1.5
    c.handle_timer(1.5)
    assert len(_out(c)) == 1 and c.get_timer() == 3.5
    c.handle_timer(3.5)
    assert _events(c) == [GaveUp(connecting=True, sends=3)] and c.closed


def test_a_rst_to_the_syn_is_refused_a_blind_rst_is_ignored() -> None:
    c = _client()
    c.connect(0.0)
    _out(c)
    c.receive(_seg(ipv4.TCP_RST | ipv4.TCP_ACK, 0, ack=ISS + 99), 0.01)
    assert _events(c) == [] and not c.closed
    c.receive(_seg(ipv4.TCP_RST | ipv4.TCP_ACK, 0, ack=ISS + 1), 0.01)
    assert _events(c) == [Reset(during_connect=True)] and c.closed
    later = _connected()
    later.receive(_seg(ipv4.TCP_RST, IRS + 500), 0.02)  # not at rcv_nxt (RFC 5961)
    assert _events(later) == [] and not later.closed
    later.receive(_seg(ipv4.TCP_RST, IRS + 1), 0.02)
    assert _events(later) == [Reset(during_connect=False)]


def test_close_sends_a_fin_after_the_data_and_abort_a_rst() -> None:
    c = _connected()
    c.send(b"hello", 0.02)
    c.close(0.02)
    data, fin = _out(c)
    assert data.payload == b"hello" and fin.flags & ipv4.TCP_FIN and fin.seq == ISS + 6
    c.receive(_seg(ipv4.TCP_ACK, IRS + 1, ack=ISS + 7), 0.03)
    assert c.all_acknowledged
    c.abort()
    (rst,) = _out(c)
    assert rst.flags & ipv4.TCP_RST and c.closed


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0xFF), st.integers(0, 2**32 - 1),
                          st.integers(0, 2**32 - 1), st.binary(max_size=40),
                          st.integers(0, 0xFFFF)), max_size=12),
       st.lists(st.binary(max_size=80), max_size=6))
def test_hostile_segments_and_garbage_never_raise(
        segments: list[tuple[int, int, int, bytes, int]], garbage: list[bytes]) -> None:
    c = _client()
    c.connect(0.0)
    c.send(b"x" * 3000, 0.0)
    now = 0.0
    for flags, seq, ack, payload, window in segments:
        now += 0.3
        c.receive(_seg(flags, seq, ack=ack, payload=payload, window=window), now)
        c.handle_timer(now)
        c.packets_to_send(now)
        _events(c)
    for data in garbage:
        parsed = ipv4.parse(data)  # what the check does with an inner packet
        if isinstance(parsed, ipv4.TcpSegment):
            c.receive(parsed, now)
    assert c.closed or c.get_timer() is not None or c.all_acknowledged
