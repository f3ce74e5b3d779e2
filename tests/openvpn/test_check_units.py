"""Small pieces of the asyncio shell that need no server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from probes.checks import openvpn as check
from probes.checks.tunnel import build_echo, echo_quality, parse_echo_reply
from probes.model import Reason

pytestmark = pytest.mark.openvpn


class _FakeEndpoint:
    def __init__(self, port: int) -> None:
        self.port = port
        self.closed = False

    @property
    def local_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        self.closed = True


def test_recent_source_ports_are_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    ports = iter([5000, 5000, 5001])
    opened: list[_FakeEndpoint] = []

    async def fake_open(host: str, port: int, **_: Any) -> _FakeEndpoint:
        opened.append(_FakeEndpoint(next(ports)))
        return opened[-1]

    monkeypatch.setattr(check.UdpEndpoint, "open", fake_open)
    monkeypatch.setattr(check, "_recent_ports", {})
    first = asyncio.run(check._open_fresh_udp("192.0.2.1", 1194))
    second = asyncio.run(check._open_fresh_udp("192.0.2.1", 1194))
    assert (first.local_address[1], second.local_address[1]) == (5000, 5001)
    assert opened[1].closed and not opened[2].closed


def test_parse_echo_reply() -> None:
    reply = bytes.fromhex("450000210000000040010000" "0a080001" "0a080002") + bytes.fromhex(
        "0000" "0000" "0007" "0001") + b"hello"
    assert parse_echo_reply(reply) == (7, 1)
    assert parse_echo_reply(reply[:22]) is None
    assert parse_echo_reply(b"\x60" + reply[1:]) is None  # not IPv4
    request = reply[:20] + b"\x08" + reply[21:]
    assert parse_echo_reply(request) is None


def test_quality_and_config_errors(tmp_path: Any) -> None:
    q = echo_quality(4, [0.003, 0.001, 0.002])
    assert (q.sent, q.received, q.loss_ratio, q.rtt_p50_seconds, q.rtt_max_seconds) == (
        4, 3, 0.25, 0.002, 0.003)
    assert echo_quality(3, []).loss_ratio == 1.0
    params = check.OpenVPNParams(host="127.0.0.1", port=9, tls_crypt_file=str(tmp_path / "x"))
    result = asyncio.run(check.run_level(params, 1.0, check.Level.RESET))
    assert (result.ok, result.reason) == (False, Reason.PROBE_ERROR)
    both = check.OpenVPNParams(host="h", tls_crypt_file="a", tls_auth_file="b")
    with pytest.raises(check.ConfigError):
        check.build_wrapper(both, 0)
    with pytest.raises(check.ConfigError):
        check.build_ssl_context(check.OpenVPNParams(host="h"))


def test_in_tunnel_echo_matches_scapy() -> None:
    from scapy.layers.inet import ICMP, IP

    for seq in (1, 255, 65535):
        want = bytes(IP(src="10.8.0.2", dst="10.8.0.1", flags="DF", id=0)
                     / ICMP(id=9, seq=seq) / b"payload!")
        assert build_echo("10.8.0.2", "10.8.0.1", 9, seq, b"payload!") == want
