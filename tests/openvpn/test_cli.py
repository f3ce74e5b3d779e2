"""``tunnelwatch probe openvpn``: argument handling, exit codes and the JSON contract."""

from __future__ import annotations

import json
import sys

import pytest

from probes.cli import main
from probes.config import parse_host_port as parse_endpoint
from probes.lab import Lab
from tests.openvpn.pki import static_key_text

pytestmark = pytest.mark.openvpn


def test_parse_endpoint() -> None:
    assert parse_endpoint("10.0.0.1:1194") == ("10.0.0.1", 1194)
    assert parse_endpoint("[2001:db8::1]:443") == ("2001:db8::1", 443)
    for bad in ("host", "host:", ":1194", "host:0", "host:99999", "host:x"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


@pytest.mark.parametrize("extra", [
    ["--endpoint", "nohost"],
    ["--endpoint", "127.0.0.1:1", "--ca", "/nonexistent/ca.crt", "--level", "tls"],
    ["--endpoint", "127.0.0.1:1", "--tls-crypt", "/nonexistent/tc.key", "--level", "reset"],
    ["--endpoint", "127.0.0.1:1", "--cert", "/x.crt", "--level", "reset"],
    ["--endpoint", "127.0.0.1:1", "--key-direction", "1", "--level", "reset"],
    ["--endpoint", "127.0.0.1:1", "--count", "0", "--level", "reset"],
])
def test_usage_errors_exit_2(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "openvpn", *extra]) == 2
    assert "error" in capsys.readouterr().err


def test_bad_key_file_is_a_usage_error(tmp_path: object, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    from pathlib import Path

    key = Path(str(tmp_path)) / "short.key"
    key.write_text(static_key_text(bytes(100)))
    assert main(["probe", "openvpn", "--endpoint", "127.0.0.1:1", "--tls-crypt", str(key),
                 "--level", "reset"]) == 2


@pytest.mark.lab
def test_cli_against_the_lab(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    server = lab.start_openvpn(node, proto="udp", wrap="tls-crypt")
    argv = [sys.executable, "-m", "probes.cli", "probe", "openvpn",
            "--endpoint", f"{server.endpoint[0]}:{server.endpoint[1]}", "--proto", "udp",
            "--ca", str(server.ca_file), "--cert", str(server.client.cert),
            "--key", str(server.client.key), "--tls-crypt", str(server.wrap_key_file),
            "--level", "session", "--json"]
    done = agent.run(argv, check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["ok"] is True and out["reason"] == "ok"
    assert set(out["phases"]) >= {"reset", "tls", "key_exchange", "push"}
    assert out["facts"]["pushed_ifconfig"].startswith("10.8.")
    capsys.readouterr()
    assert main(["probe", "openvpn-telemetry", "--management-socket",
                 str(server.management_socket), "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["clients"] <= 1 and view["bytes_in"] > 0  # the probe's instance may be exiting
    server.stop()
    failed = agent.run([*argv[:-2], "reset", "--json", "--timeout", "1"], check=False)
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["reason"] == "icmp-unreachable"


def test_telemetry_cli_without_a_socket(tmp_path: object, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    assert main(["probe", "openvpn-telemetry", "--management-socket",
                 f"{tmp_path}/none.sock"]) == 1
    assert "No such file" in capsys.readouterr().out
