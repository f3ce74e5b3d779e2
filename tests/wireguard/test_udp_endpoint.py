"""The generic connected UDP endpoint (probes/checks/udp.py) on loopback: no root needed."""

from __future__ import annotations

import asyncio
import socket

import pytest

from probes.checks.errqueue import SO_EE_ORIGIN_ICMP
from probes.checks.udp import (
    Datagram,
    IcmpError,
    SendStamp,
    UdpEndpoint,
    round_trip_seconds,
)
from probes.model import Reason

pytestmark = pytest.mark.wireguard


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_round_trip_with_kernel_timestamp() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    try:
        async with await UdpEndpoint.open("127.0.0.1", server.getsockname()[1]) as udp:
            sent = udp.send(b"ping")
            data, addr = await asyncio.to_thread(server.recvfrom, 100)
            server.sendto(data[::-1], addr)
            got = await udp.recv(2.0)
            assert got is not None and got.data == b"gnip"
            assert got.kernel_wall_ns is not None
            rtt = round_trip_seconds(sent, got)
            assert 0 <= rtt <= got.received_monotonic - sent.monotonic
            assert udp.local_address[0] == "127.0.0.1"
            assert await udp.recv(0.05) is None  # nothing more: a timeout is None, not an error
    finally:
        server.close()


async def test_port_unreachable_is_reported_with_icmp_details() -> None:
    async with await UdpEndpoint.open("127.0.0.1", _closed_port()) as udp:
        udp.send(b"x")
        with pytest.raises(IcmpError) as caught:
            await udp.recv(2.0)
    err = caught.value
    assert err.origin == SO_EE_ORIGIN_ICMP and (err.icmp_type, err.icmp_code) == (3, 3)
    assert err.offender == "127.0.0.1" and err.reason is Reason.ICMP_UNREACHABLE
    assert "ICMP type 3 code 3" in str(err)


def test_round_trip_falls_back_to_monotonic_when_the_wall_clock_jumped() -> None:
    sent = SendStamp(monotonic=10.0, wall_ns=5_000_000_000)
    stepped_back = Datagram(b"", received_monotonic=10.002, kernel_wall_ns=4_000_000_000)
    assert round_trip_seconds(sent, stepped_back) == pytest.approx(0.002)
    fine = Datagram(b"", received_monotonic=10.002, kernel_wall_ns=5_001_000_000)
    assert round_trip_seconds(sent, fine) == pytest.approx(0.001)
    assert round_trip_seconds(sent, Datagram(b"", 10.003, None)) == pytest.approx(0.003)
