"""QUIC / MASQUE checks against the lab's aioquic MASQUE server, from a separate agent namespace."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from probes.checks import quic
from probes.checks.base import CheckKind, CheckResult, execute
from probes.model import Reason

from .conftest import ALPN_PORT, DEAD_PORT, ECHO_PORT, QUIC_PORT, REFUSE_PORT, SERVER_NAME, QuicLab

pytestmark = [pytest.mark.quic, pytest.mark.lab]


def _check(env: QuicLab, kind: CheckKind[quic.QuicParams], timeout: float = 5.0,
           **overrides: Any) -> CheckResult:
    fields: dict[str, Any] = {"host": env.node.address, "port": QUIC_PORT,
                              "server_name": SERVER_NAME, "ca_file": str(env.ca_file)}
    fields.update(overrides)
    return env.run(execute(kind, quic.QuicParams(**fields), timeout))


def test_handshake_succeeds_with_h3_and_quic_v1(quiclab: QuicLab) -> None:
    result = _check(quiclab, quic.HANDSHAKE)
    assert result.ok, result
    assert result.reason is Reason.OK
    assert result.facts["alpn"] == "h3"
    assert result.facts["quic_version"] == "0x00000001"
    assert result.facts["session_resumed"] is False
    assert "handshake" in result.phases


def test_second_handshake_resumes_with_the_session_ticket(quiclab: QuicLab) -> None:
    result = _check(quiclab, quic.HANDSHAKE, resume=True)
    assert result.ok, result
    assert result.facts["ticket_received"] is True
    assert result.facts["resumed"] is True
    assert "resumed_handshake" in result.phases


def test_connect_udp_echoes_datagrams_through_the_proxy(quiclab: QuicLab) -> None:
    result = _check(quiclab, quic.CONNECT_UDP, target=f"{quiclab.node.address}:{ECHO_PORT}",
                    echo_count=10, echo_interval=0.01)
    assert result.ok, result
    assert result.quality is not None
    assert (result.quality.sent, result.quality.received) == (10, 10)
    assert result.quality.rtt_p50_seconds is not None
    assert {"handshake", "settings", "connect", "echo"} <= set(result.phases)


def test_connect_udp_to_a_silent_target_is_tunnel_no_reply(quiclab: QuicLab) -> None:
    # the proxy accepts, but nothing listens at the target port: datagrams go nowhere
    result = _check(quiclab, quic.CONNECT_UDP, target=f"{quiclab.node.address}:{ECHO_PORT + 1}",
                    echo_count=3, echo_interval=0.01)
    assert not result.ok
    assert result.reason is Reason.TUNNEL_NO_REPLY


def test_connect_udp_measures_loss_behind_the_proxy(quiclab: QuicLab) -> None:
    # the target's replies are dropped at random (50 %): the QUIC path itself stays clean
    quiclab.lab.set_loss(quiclab.far, 50)
    try:
        result = _check(quiclab, quic.CONNECT_UDP, target=f"{quiclab.far.address}:{ECHO_PORT}",
                        echo_count=40, echo_interval=0.005, loss_threshold=0.1)
    finally:
        quiclab.lab.heal(quiclab.far)
    assert result.quality is not None
    assert 0 < result.quality.received < 40, result.quality  # P(fail) = 2 * 0.5**40
    assert result.reason is Reason.TUNNEL_LOSS
    clean = _check(quiclab, quic.CONNECT_UDP, target=f"{quiclab.far.address}:{ECHO_PORT}",
                   echo_count=10, echo_interval=0.005, loss_threshold=0.1)
    assert clean.ok, clean


def test_connect_ip_gets_2xx_and_a_parsed_address_assign(quiclab: QuicLab) -> None:
    result = _check(quiclab, quic.CONNECT_IP)
    assert result.ok, result
    assert result.facts["assigned"] == "10.200.0.2/32"
    assert result.facts["routes"] == 1


def test_connect_ip_echoes_icmp_inside_the_tunnel(quiclab: QuicLab) -> None:
    result = _check(quiclab, quic.CONNECT_IP, ip_ping="10.200.0.1", echo_count=5,
                    echo_interval=0.01)
    assert result.ok, result
    assert result.quality is not None and result.quality.received == 5


def test_wrong_ca_is_cert_verify_failed(quiclab: QuicLab) -> None:
    result = _check(quiclab, quic.HANDSHAKE, ca_file=str(quiclab.other_ca_file))
    assert result.reason is Reason.CERT_VERIFY_FAILED, result


def test_wrong_server_name_is_cert_verify_failed(quiclab: QuicLab) -> None:
    result = _check(quiclab, quic.HANDSHAKE, server_name="not-the-node.lab")
    assert result.reason is Reason.CERT_VERIFY_FAILED, result


def test_server_without_h3_is_no_alpn(quiclab: QuicLab) -> None:
    result = _check(quiclab, quic.HANDSHAKE, port=ALPN_PORT)
    assert result.reason is Reason.NO_ALPN, result


@pytest.mark.parametrize("kind", [quic.CONNECT_UDP, quic.CONNECT_IP])
def test_connect_answered_403_is_connect_refused(quiclab: QuicLab,
                                                 kind: CheckKind[quic.QuicParams]) -> None:
    result = _check(quiclab, kind, port=REFUSE_PORT,
                    target=f"{quiclab.node.address}:{ECHO_PORT}")
    assert result.reason is Reason.CONNECT_REFUSED, result
    assert "403" in result.detail


def test_server_process_down_is_icmp_unreachable(quiclab: QuicLab) -> None:
    result = _check(quiclab, quic.HANDSHAKE, port=DEAD_PORT)
    assert result.reason is Reason.ICMP_UNREACHABLE, result


def test_server_host_down_is_timeout(quiclab: QuicLab) -> None:
    up = _check(quiclab, quic.HANDSHAKE, host=quiclab.gone.address)
    assert up.ok, up  # the same server answers while its link is up
    quiclab.lab.partition(quiclab.gone)
    result = _check(quiclab, quic.HANDSHAKE, timeout=1.0, host=quiclab.gone.address)
    assert result.reason is Reason.TIMEOUT, result


# ------------------------------------------------------------------------------ one-shot CLI


def _cli(env: QuicLab, *argv: str) -> tuple[int, str]:
    proc = env.agent.run([sys.executable, "-m", "probes.cli", "probe", "quic", *argv],
                         check=False)
    return proc.returncode, proc.stdout


def test_cli_connect_udp_json_contract(quiclab: QuicLab) -> None:
    code, out = _cli(quiclab, quiclab.node.address, "--port", str(QUIC_PORT),
                     "--server-name", SERVER_NAME, "--ca-file", str(quiclab.ca_file),
                     "--connect-udp", f"{quiclab.node.address}:{ECHO_PORT}", "--json")
    result = json.loads(out)
    assert code == 0, out
    assert result["ok"] is True and result["reason"] == "ok"
    assert result["quality"]["received"] == 5
    assert {"duration_seconds", "phases"} <= set(result)


def test_cli_exit_codes_for_failure_and_usage_error(quiclab: QuicLab) -> None:
    code, out = _cli(quiclab, quiclab.node.address, "--port", str(REFUSE_PORT),
                     "--server-name", SERVER_NAME, "--ca-file", str(quiclab.ca_file),
                     "--connect-ip")
    assert code == 1
    assert "reason=connect-refused" in out
    code, _ = _cli(quiclab, quiclab.node.address, "--ca-file", "/nonexistent/ca.pem")
    assert code == 2
