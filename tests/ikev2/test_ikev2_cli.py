"""``tunnelwatch probe ikev2``: usage errors, JSON contract, exit codes."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from probes.cli import main
from probes.config import parse_host_port

pytestmark = pytest.mark.ikev2


def split_endpoint(text: str) -> tuple[str, int]:
    return parse_host_port(text, default_port=500)


def test_endpoint_forms() -> None:
    assert split_endpoint("vpn.example") == ("vpn.example", 500)
    assert split_endpoint("10.0.0.1:4500") == ("10.0.0.1", 4500)
    assert split_endpoint("[2001:db8::1]:500") == ("2001:db8::1", 500)
    with pytest.raises(ValueError):
        split_endpoint("host:port")


@pytest.mark.parametrize("argv", [
    ["--endpoint", "127.0.0.1", "--proposal", "aes256-whirlpool-modp768"],
    ["--endpoint", "127.0.0.1", "--level", "auth"],
    ["--endpoint", "127.0.0.1:99999"],
    ["--endpoint", "127.0.0.1", "--level", "tunnel", "--psk-file", "/nonexistent/psk"],
    ["--endpoint", "127.0.0.1", "--ping", "not-an-ip"],
])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "ikev2", *argv]) == 2
    assert "error" in capsys.readouterr().err


def test_closed_port_is_a_failed_check_in_json(capsys: pytest.CaptureFixture[str]) -> None:
    # UDP to a closed loopback port: ICMP port unreachable comes back at once
    code = main(["probe", "ikev2", "--endpoint", "127.0.0.1:9", "--timeout", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["ok"] is False and out["reason"] == "icmp-unreachable"
    assert set(out) >= {"ok", "reason", "duration_seconds", "phases"}


@pytest.mark.lab
def test_cli_auth_and_tunnel_against_strongswan(lab: Any,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    ike = lab.start_strongswan(node)
    common = ["probe", "ikev2", "--endpoint", node.address, "--psk-file", str(ike.psk_file),
              "--local-id", ike.remote_id, "--remote-id", ike.local_id, "--json"]
    with agent.entered():
        auth_code = main([*common, "--level", "auth"])
        auth = json.loads(capsys.readouterr().out)
        tunnel_code = main([*common, "--level", "tunnel", "--ping", ike.inner_address,
                            "--inner-address", "10.211.0.9", "--count", "3"])
        tunnel = json.loads(capsys.readouterr().out)
        wrong_code = main([*common[:-1], "--remote-id", "someone.else", "--level", "auth"])
        capsys.readouterr()
    assert auth_code == 0 and auth["ok"] and auth["facts"]["responder_auth_verified"], auth
    assert tunnel_code == 0 and tunnel["quality"]["received"] == 3, tunnel
    assert wrong_code == 1  # strongSwan has no such identity: the IKE_AUTH is refused
    for _ in range(60):  # charon destroys a deleted SA just after answering the Delete
        assert main(["probe", "ikev2-telemetry", "--uri", f"unix://{ike.vici_socket}",
                     "--json"]) == 0
        counts = json.loads(capsys.readouterr().out)
        if counts["ike_sas"] == 0:
            break
        time.sleep(0.05)
    assert counts["ike_sas"] == 0 and counts["child_sas"] == 0  # every probe cleaned up
