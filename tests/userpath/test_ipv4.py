"""The inner IPv4 codec: what a check builds, the kernel accepts (checksums), and what comes back
parses to what it claims; anything else parses to None, never an exception."""

from __future__ import annotations

import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.protocols import ipv4
from probes.protocols.inet import checksum

FAST = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=100_000, deadline=None, suppress_health_check=list(HealthCheck))


def _reply_to(packet: bytes) -> bytes:
    """What a host answers to our echo request (the same id, seq and payload)."""
    src = socket.inet_ntoa(packet[12:16])
    dst = socket.inet_ntoa(packet[16:20])
    icmp = packet[20:]
    ident, seq = int.from_bytes(icmp[4:6], "big"), int.from_bytes(icmp[6:8], "big")
    return ipv4.ipv4_packet(dst, src, ipv4.PROTO_ICMP,
                            ipv4.icmp_echo(ident, seq, icmp[8:], reply=True))


def test_echo_request_checksums_add_up_and_its_reply_parses() -> None:
    packet = ipv4.echo_packet("10.201.0.2", "198.51.100.7", 0x1234, 7, b"payload")
    assert checksum(packet[:20]) == 0 and checksum(packet[20:]) == 0
    assert ipv4.parse(_reply_to(packet)) == ipv4.EchoReply("198.51.100.7", 0x1234, 7)
    assert ipv4.parse(packet) is None  # a request is not an answer we read


def test_udp_datagram_round_trips_with_a_valid_checksum() -> None:
    packet = ipv4.udp_packet("10.201.0.2", "198.51.100.53", 40000, 53, b"query")
    pseudo = (socket.inet_aton("10.201.0.2") + socket.inet_aton("198.51.100.53")
              + bytes([0, ipv4.PROTO_UDP]) + (len(packet) - 20).to_bytes(2, "big"))
    assert checksum(pseudo + packet[20:]) == 0
    assert ipv4.parse(packet) == ipv4.UdpDatagram("10.201.0.2", "198.51.100.53", 40000, 53,
                                                  b"query")


@pytest.mark.parametrize(("quoted", "first", "second"), [
    (ipv4.udp_packet("10.201.0.2", "198.51.100.53", 40000, 53, b"q"), 40000, 53),
    (ipv4.echo_packet("10.201.0.2", "198.51.100.7", 99, 3, b"x"), 99, 3),
])
def test_an_icmp_error_names_the_packet_it_quotes(quoted: bytes, first: int,
                                                  second: int) -> None:
    body = bytes([ipv4.ICMP_DEST_UNREACH, 3, 0, 0, 0, 0, 0, 0]) + quoted[:28]
    error = ipv4.parse(ipv4.ipv4_packet("10.8.0.1", "10.201.0.2", ipv4.PROTO_ICMP, body))
    assert isinstance(error, ipv4.IcmpError)
    assert (error.dst, error.first, error.second) == (socket.inet_ntoa(quoted[16:20]), first,
                                                      second)
    assert error.describe() == "port unreachable from 10.8.0.1"


def test_fragments_truncations_and_other_protocols_are_not_answers() -> None:
    reply = _reply_to(ipv4.echo_packet("10.0.0.2", "10.0.0.1", 1, 1, b"abc"))
    fragment = reply[:6] + b"\x20\x00" + reply[8:]  # more fragments set
    assert ipv4.parse(fragment) is None
    assert ipv4.parse(reply[:19]) is None
    assert ipv4.parse(reply[:9] + bytes([47]) + reply[10:]) is None  # GRE
    assert ipv4.parse(b"\x60" + reply[1:]) is None  # IPv6 version nibble


@FAST
@given(st.binary(max_size=120))
def test_garbage_parses_to_none_or_a_packet(data: bytes) -> None:
    parsed = ipv4.parse(data)
    assert parsed is None or isinstance(parsed, (ipv4.EchoReply, ipv4.UdpDatagram,
                                                 ipv4.IcmpError))


@FAST
@given(st.binary(max_size=80), st.integers(0, 255), st.integers(0, 255))
def test_garbage_inside_an_icmp_error_never_raises(quoted: bytes, kind: int, code: int) -> None:
    body = bytes([kind, code, 0, 0, 0, 0, 0, 0]) + quoted
    parsed = ipv4.parse(ipv4.ipv4_packet("10.8.0.1", "10.201.0.2", ipv4.PROTO_ICMP, body))
    assert parsed is None or isinstance(parsed, (ipv4.IcmpError, ipv4.EchoReply))


@pytest.mark.slow
@SLOW
@given(st.binary(max_size=120))
def test_garbage_parses_without_raising_slow(data: bytes) -> None:
    ipv4.parse(data)


def test_pushed_resolvers_are_read_in_order_from_both_spellings() -> None:
    from probes.protocols.openvpn.keymethod import parse_push_reply
    reply = parse_push_reply(
        "PUSH_REPLY,route-gateway 10.8.0.1,dhcp-option DNS 10.9.0.53,dhcp-option DOMAIN lab,"
        "dns server 0 address 10.9.0.54:53 fd00::53,dhcp-option DNS not-an-address,"
        "dhcp-option DNS 10.9.0.53,ifconfig 10.8.0.2 255.255.255.0")
    assert reply.dns_servers == ("10.9.0.53", "10.9.0.54")
    assert parse_push_reply("PUSH_REPLY,ifconfig 10.8.0.2 255.255.255.0").dns_servers == ()
