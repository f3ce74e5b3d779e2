"""ICMP packet and error-queue parsing: known packets, and fuzzing (bad bytes never crash)."""

from __future__ import annotations

import contextlib
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.checks import errqueue, icmp
from probes.model import Reason
from probes.protocols.inet import checksum

pytestmark = pytest.mark.l4


def _ipv4_header(payload_len: int) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, 0, 0, 64, 1, 0,
                       socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2"))


def test_echo_request_checksum_verifies() -> None:
    packet = icmp.build_echo_request(0x1234, 7, b"abcdefgh")
    assert checksum(packet) == 0  # a correct checksum sums to zero


def test_reply_and_quoted_error_parse() -> None:
    request = icmp.build_echo_request(0x1234, 7, b"token123")
    reply = bytes([icmp.ICMP_ECHO_REPLY]) + request[1:]
    msg = icmp.parse_icmp(reply)
    assert msg.is_reply and (msg.identifier, msg.sequence, msg.payload) == (0x1234, 7, b"token123")
    unreachable = struct.pack("!BBHI", 3, 1, 0, 0) + _ipv4_header(len(request)) + request
    err = icmp.parse_icmp(unreachable)
    assert not err.is_reply and (err.type, err.code, err.identifier) == (3, 1, 0x1234)


def test_errqueue_entry_maps_to_reason() -> None:
    payload = struct.pack("=IBBBBII", 111, errqueue.SO_EE_ORIGIN_ICMP, 3, 3, 0, 0, 0)
    entry = icmp.parse_errqueue([(socket.IPPROTO_IP, errqueue.IP_RECVERR, payload)])
    assert entry is not None and entry.reason is Reason.ICMP_UNREACHABLE
    local = struct.pack("=IBBBBII", 113, errqueue.SO_EE_ORIGIN_LOCAL, 0, 0, 0, 0, 0)
    entry = icmp.parse_errqueue([(socket.IPPROTO_IP, errqueue.IP_RECVERR, local)])
    assert entry is not None and entry.reason is Reason.NETWORK_UNREACHABLE
    assert icmp.parse_errqueue([(socket.IPPROTO_IP, errqueue.IP_RECVERR, b"\x00")]) is None


@settings(max_examples=3000)
@given(st.binary(max_size=200))
def test_parse_icmp_never_crashes(data: bytes) -> None:
    try:
        msg = icmp.parse_icmp(data)
    except icmp.IcmpParseError:
        return
    assert msg.type in (icmp.ICMP_ECHO_REPLY, icmp.ICMP_DEST_UNREACH, icmp.ICMP_TIME_EXCEEDED)


@settings(max_examples=2000)
@given(st.binary(max_size=100), st.integers(0, 300), st.integers(0, 300))
def test_parse_ancillary_never_crashes(payload: bytes, level: int, kind: int) -> None:
    icmp.parse_errqueue([(level, kind, payload)])
    errqueue.kernel_timestamp_ns([(level, kind, payload)])


@pytest.mark.slow
@settings(max_examples=100_000)
@given(st.binary(max_size=200))
def test_parse_icmp_fuzz_long(data: bytes) -> None:
    with contextlib.suppress(icmp.IcmpParseError):
        icmp.parse_icmp(data)
