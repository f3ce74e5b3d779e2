"""CLI, keygen and telemetry parsing (no lab needed)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.checks import wireguard_telemetry as tel
from probes.cli import main
from probes.cli.keygen import wg_set_argv
from probes.config import parse_host_port as parse_endpoint
from probes.protocols import wireguard as wg

pytestmark = pytest.mark.wireguard

PUB_A = wg.encode_key(wg.public_key(b"\x01" * 32))
PUB_B = wg.encode_key(wg.public_key(b"\x02" * 32))
DUMP = (f"PRIVATEKEYPRIVATEKEYPRIVATEKEYPRIVATEKEY1234=\t{PUB_A}\t51820\toff\n"
        f"{PUB_B}\t(none)\t10.77.2.2:40000\t10.201.0.2/32\t1700000000\t1000\t2000\toff\n"
        f"{PUB_A}\tPSKPSK\t(none)\t10.201.0.3/32,10.201.0.4/32\t0\t0\t0\t25\n")


@pytest.mark.parametrize(("text", "expected"), [
    ("10.0.0.1:51820", ("10.0.0.1", 51820)), ("[2001:db8::1]:443", ("2001:db8::1", 443)),
    ("vpn.example.net:1", ("vpn.example.net", 1))])
def test_parse_endpoint(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["10.0.0.1", ":51820", "h:0", "h:70000", "2001:db8::1:443",
                                  "h:-1", "h:x"])
def test_parse_endpoint_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text)


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "a.key"
    path.write_text(wg.encode_key(os.urandom(32)) + "\n")
    return str(path)


@pytest.mark.parametrize("extra", [
    ["--endpoint", "nohostport"],
    ["--endpoint", "127.0.0.1:9", "--ping", "10.201.0.1"],  # without --tunnel-address
    ["--endpoint", "127.0.0.1:9", "--tunnel-address", "10.201.0.2/32", "--ping", "nope"],
    ["--endpoint", "127.0.0.1:9", "--count", "0", "--tunnel-address", "10.201.0.2/32",
     "--ping", "10.201.0.1"],
    ["--endpoint", "127.0.0.1:9", "--preshared-key-file", "/nonexistent"],
    ["--endpoint", "127.0.0.1:9", "--server-public-key", "short"],
])
def test_usage_errors_exit_2(extra: list[str], key_file: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["probe", "wireguard", "--server-public-key", PUB_A, "--private-key-file", key_file,
            "--no-state", *extra]
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_probe_json_failure_exit_1(key_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    # nothing listens on 127.0.0.1:9 (discard, UDP): the kernel answers port unreachable
    code = main(["probe", "wireguard", "--endpoint", "127.0.0.1:9", "--server-public-key", PUB_A,
                 "--private-key-file", key_file, "--no-state", "--timeout", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["ok"] is False and out["reason"] == "icmp-unreachable"
    assert {"duration_seconds", "phases"} <= set(out)


def test_keygen_writes_0600_keys_and_prints_peer_config(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["keygen", "wireguard", "--agent", "agent-7", "--dir", str(tmp_path), "--psk",
            "--allowed-ip", "10.201.0.7/32", "--interface", "wg1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    key, pub, psk = (tmp_path / f"agent-7.{ext}" for ext in ("key", "pub", "psk"))
    for secret in (key, psk):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    derived = subprocess.run(["wg", "pubkey"], input=key.read_text(), capture_output=True,
                             text=True, check=True).stdout.strip()
    assert pub.read_text().strip() == derived
    assert wg.encode_key(wg.public_key(wg.decode_key(key.read_text()))) == derived
    assert f"PublicKey = {derived}" in out and "AllowedIPs = 10.201.0.7/32" in out
    assert f"wg set wg1 peer {derived} preshared-key {psk} allowed-ips 10.201.0.7/32" in out
    assert psk.read_text().strip() not in out  # the secret is never printed
    assert main(argv) == 2  # refuses to overwrite an identity
    assert main([*argv, "--force"]) == 0
    assert pub.read_text().strip() != derived


@pytest.mark.parametrize("agent", ["", "../x", ".hidden", "a b"])
def test_keygen_rejects_bad_agent_names(tmp_path: Path, agent: str) -> None:
    assert main(["keygen", "wireguard", "--agent", agent, "--dir", str(tmp_path)]) == 2


def test_wg_set_argv() -> None:
    assert wg_set_argv("wg0", PUB_A, "10.0.0.2/32", "/dev/stdin") == [
        "wg", "set", "wg0", "peer", PUB_A, "preshared-key", "/dev/stdin",
        "allowed-ips", "10.0.0.2/32"]
    assert wg_set_argv("wg0", PUB_A, None, None, remove=True)[-1] == "remove"


def test_parse_dump_single_interface() -> None:
    (view,) = tel.parse_dump(DUMP, "wg0")
    assert view.public_key == PUB_A and view.listen_port == 51820 and len(view.peers) == 2
    first, second = view.peers
    assert first.endpoint == "10.77.2.2:40000" and not first.has_preshared_key
    assert second.allowed_ips == ("10.201.0.3/32", "10.201.0.4/32")
    assert second.persistent_keepalive == 25 and second.handshake_age(1e9) is None
    assert view.active_peers(now=1_700_000_100) == 1
    assert view.active_peers(now=1_700_000_181) == 0
    assert (view.rx_bytes, view.tx_bytes) == (1000, 2000)
    assert "PRIVATEKEY" not in repr(view)


def test_parse_dump_all_interfaces() -> None:
    text = "".join(f"{name}\t{line}\n" for name in ("wg0", "wg1")
                   for line in DUMP.splitlines())
    views = tel.parse_dump(text)
    assert [v.interface for v in views] == ["wg0", "wg1"] and all(len(v.peers) == 2 for v in views)


@pytest.mark.parametrize("bad", ["", "x\ty\n", DUMP.replace("51820", "99999"),
                                 DUMP.replace("1000", "-5"), DUMP.splitlines()[1]])
def test_parse_dump_rejects(bad: str) -> None:
    with pytest.raises(tel.TelemetryError):
        tel.parse_dump(bad, "wg0")


DUMP_FIELDS = st.sampled_from(["(none)", "off", "0", "12", PUB_A, "x", "", "\uff11"])
DUMP_ROWS = st.lists(st.lists(DUMP_FIELDS | st.text(max_size=8), min_size=0, max_size=10),
                     max_size=5)


@settings(max_examples=500, deadline=None)
@given(DUMP_ROWS, st.sampled_from(["", "wg0"]))
def test_fuzz_parse_dump(rows: list[list[str]], interface: str) -> None:
    _parse_dump_raises_only_telemetry_error(rows, interface)


@pytest.mark.slow
@settings(max_examples=100_000, deadline=None)
@given(DUMP_ROWS, st.sampled_from(["", "wg0"]))
def test_fuzz_parse_dump_100k(rows: list[list[str]], interface: str) -> None:
    _parse_dump_raises_only_telemetry_error(rows, interface)


def _parse_dump_raises_only_telemetry_error(rows: list[list[str]], interface: str) -> None:
    text = "\n".join("\t".join(r) for r in rows)
    try:
        views = tel.parse_dump(text, interface)
    except tel.TelemetryError:
        return
    for view in views:
        assert view.rx_bytes >= 0 and 0 <= view.listen_port <= 65535
