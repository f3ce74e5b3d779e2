"""QUIC / MTU check helpers that need no network: reason mapping, targets, configuration, ICMP."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from aioquic.quic.events import ConnectionTerminated

from probes.agent.plan import plan_target
from probes.checks import errqueue, mtu, quic
from probes.config import QUICTarget, Target
from probes.model import Reason

pytestmark = pytest.mark.quic


def _closed(code: int) -> ConnectionTerminated:
    return ConnectionTerminated(error_code=code, frame_type=None, reason_phrase="")


@pytest.mark.parametrize(("code", "reason"), [
    (0x100 + 42, Reason.CERT_VERIFY_FAILED),  # bad_certificate
    (0x100 + 48, Reason.CERT_VERIFY_FAILED),  # unknown_ca
    (0x100 + 45, Reason.CERT_EXPIRED),
    (0x100 + 120, Reason.NO_ALPN),  # no_application_protocol
    (0x100 + 40, Reason.TLS_FAILED),  # handshake_failure
    (0x0A, Reason.BAD_RESPONSE),  # PROTOCOL_VIOLATION
])
def test_connection_close_codes_map_to_reasons(code: int, reason: Reason) -> None:
    assert quic.reason_for_close(_closed(code)) is reason


@pytest.mark.parametrize(("text", "expected"), [
    ("10.0.0.1:7", ("10.0.0.1", 7)),
    ("[fd00::1]:443", ("fd00::1", 443)),
    ("echo.example:65535", ("echo.example", 65535)),
])
def test_split_target(text: str, expected: tuple[str, int]) -> None:
    assert quic.split_target(text) == expected


@pytest.mark.parametrize("text", ["10.0.0.1", ":80", "host:0", "host:70000", "host:x"])
def test_split_target_rejects(text: str) -> None:
    with pytest.raises(quic.ConfigError):
        quic.split_target(text)


def test_client_configuration_rejects_unreadable_or_non_pem_ca(tmp_path: Path) -> None:
    with pytest.raises(quic.ConfigError, match="cannot load CA"):
        quic.client_configuration(quic.QuicParams(host="h", ca_file=str(tmp_path / "none")))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(quic.ConfigError):
        quic.client_configuration(quic.QuicParams(host="h", ca_file=str(junk)))


def test_client_configuration_offers_h3_datagrams_and_sni() -> None:
    config = quic.client_configuration(quic.QuicParams(host="10.0.0.1", server_name="n.lab"))
    assert config.alpn_protocols == ["h3"]
    assert config.server_name == "n.lab"
    assert config.max_datagram_frame_size == quic.MAX_DATAGRAM_FRAME_SIZE


async def test_bad_ca_file_is_a_probe_error_not_a_node_failure(tmp_path: Path) -> None:
    params = quic.QuicParams(host="127.0.0.1", ca_file=str(tmp_path / "missing.pem"))
    result = await quic.run_handshake(params, 1.0)
    assert result.reason is Reason.PROBE_ERROR


async def test_connect_udp_without_target_is_a_probe_error() -> None:
    result = await quic.run_connect_udp(quic.QuicParams(host="127.0.0.1"), 1.0)
    assert result.reason is Reason.PROBE_ERROR
    assert "target" in result.detail


def test_ipv6_target_is_percent_encoded_in_the_path() -> None:
    assert quic._path_segment("fd00::1") == "fd00%3A%3A1"


# ------------------------------------------------------------------------------------ MTU


def _errqueue(origin: int, icmp_type: int, icmp_code: int,
              info: int) -> list[tuple[int, int, bytes]]:
    ext = struct.pack("=IBBBBII", 90, origin, icmp_type, icmp_code, 0, info, 0)
    return [(socket.IPPROTO_IP, errqueue.IP_RECVERR, ext + bytes(16))]


def test_frag_needed_report_carries_mtu_and_probe_token() -> None:
    payload = struct.pack("!5sIH", b"twmtu", 7, 1500) + bytes(20)
    report = mtu.parse_error_report(payload, _errqueue(errqueue.SO_EE_ORIGIN_ICMP, 3, 4, 1400))
    assert report is not None
    assert report.frag_needed and not report.port_unreachable
    assert (report.info, report.token) == (1400, (7, 1500))


def test_port_unreachable_and_packet_too_big_are_told_apart() -> None:
    port = mtu.parse_error_report(b"", _errqueue(errqueue.SO_EE_ORIGIN_ICMP, 3, 3, 0))
    assert port is not None and port.port_unreachable and port.token is None
    too_big = mtu.parse_error_report(b"", _errqueue(errqueue.SO_EE_ORIGIN_ICMP6, 2, 0, 1280))
    assert too_big is not None and too_big.frag_needed


def test_error_report_ignores_other_ancillary_data() -> None:
    assert mtu.parse_error_report(b"", [(socket.SOL_SOCKET, 35, bytes(16))]) is None
    assert mtu.parse_error_report(b"", [(socket.IPPROTO_IP, errqueue.IP_RECVERR, b"\x00")]) is None


def test_search_tries_the_reported_mtu_and_the_size_above_first() -> None:
    search = mtu._Search(low=576, high=1500, frag_needed_mtus={1400})
    assert mtu._next_size(search, set()) == 1400
    search.low = 1400
    assert mtu._next_size(search, {1400}) == 1401
    search.high = 1401
    assert search.high - search.low == 1  # done after two probes


def test_search_bisects_without_icmp() -> None:
    assert mtu._next_size(mtu._Search(low=576, high=1500, frag_needed_mtus=set()), set()) == 1038


def test_mtu_params_out_of_order_is_a_probe_error() -> None:
    import asyncio

    from probes.checks.base import execute

    params = mtu.MtuParams(host="127.0.0.1", port=9, min_size=1400, max_size=1300)
    result = asyncio.run(execute(mtu.UDP, params, 2.0))
    assert result.reason is Reason.PROBE_ERROR


# ------------------------------------------------------------------------ agent plan wiring


def _target(checks: tuple[str, ...] = (), **quic_fields: Any) -> Target:
    return Target(id="n1", pool="p", pop="ams", region="eu", address="192.0.2.10",
                  quic=QUICTarget(**quic_fields), checks=list(checks))


def test_agent_plans_handshake_and_connect_udp_from_the_quic_section(tmp_path: Path) -> None:
    target = _target(port=4433, server_name="n1.vpn", ca_file="ca.pem",
                     connect_udp_target="10.0.0.1:7")
    planned = {p.check: p for p in plan_target(target, tmp_path, tmp_path)}
    assert set(planned) == {"quic.handshake", "quic.connect-udp"}
    params = planned["quic.connect-udp"].params
    assert (params.host, params.port, params.server_name) == ("192.0.2.10", 4433, "n1.vpn")
    assert params.ca_file == str(tmp_path / "ca.pem")
    assert params.target == "10.0.0.1:7"


def test_connect_ip_is_planned_only_when_asked_for(tmp_path: Path) -> None:
    assert [p.check for p in plan_target(_target(), tmp_path, tmp_path)] == [
        "quic.handshake"]
    asked = _target(checks=("quic.connect-ip",))
    assert [p.check for p in plan_target(asked, tmp_path, tmp_path)] == [
        "quic.connect-ip"]


def test_ipv4_icmp_echo_packet_and_lab_reply_round_trip() -> None:
    import ipaddress

    from probes.checks.tunnel import build_echo, parse_echo_reply
    from probes.lab.masque import icmp_echo_reply_for
    from probes.protocols.inet import checksum

    def reply_sequence(packet: bytes, ident: int) -> int | None:
        echo = parse_echo_reply(packet)
        return echo[1] if echo is not None and echo[0] == ident else None

    src, dst = ipaddress.IPv4Address("10.200.0.2"), ipaddress.IPv4Address("10.200.0.1")
    request = build_echo(str(src), str(dst), 0x1234, 7, b"abc")
    assert len(request) == 20 + 8 + 3
    assert checksum(request[:20]) == 0 and checksum(request[20:]) == 0  # valid checksums
    assert reply_sequence(request, 0x1234) is None  # a request is not a reply
    reply = icmp_echo_reply_for(request)
    assert reply is not None
    assert reply[12:16] == dst.packed and reply[16:20] == src.packed
    assert checksum(reply[:20]) == 0 and checksum(reply[20:]) == 0
    assert reply_sequence(reply, 0x1234) == 7
    assert reply_sequence(reply, 0x9999) is None
    assert reply_sequence(b"\x45junk", 0x1234) is None
    other = build_echo(str(src), "10.200.0.9", 1, 1, b"")
    assert icmp_echo_reply_for(other) is None


async def test_connect_ip_with_a_bad_ping_address_is_a_probe_error() -> None:
    result = await quic.run_connect_ip(quic.QuicParams(host="127.0.0.1", ip_ping="nope"), 1.0)
    assert result.reason is Reason.PROBE_ERROR


def test_mtu_udp_without_a_port_is_a_probe_error() -> None:
    import asyncio

    result = asyncio.run(mtu.run_udp(mtu.MtuParams(host="127.0.0.1"), 1.0))
    assert result.reason is Reason.PROBE_ERROR
    assert "port" in result.detail


@pytest.mark.parametrize("overrides", [{"echo_count": 0}, {"payload_size": 5000}])
async def test_echo_parameters_out_of_range_are_a_probe_error(overrides: dict[str, int]) -> None:
    params = quic.QuicParams(host="127.0.0.1", target="127.0.0.1:7", **overrides)
    result = await quic.run_connect_udp(params, 1.0)
    assert result.reason is Reason.PROBE_ERROR
