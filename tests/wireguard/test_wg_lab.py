"""WireGuard checks against real wireguard-go in lab namespaces (root; marker ``lab``)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from probes.checks import wireguard as check
from probes.checks.base import CheckResult
from probes.checks.wireguard_telemetry import collect
from probes.cli import main
from probes.lab import Host, Lab, WgPeer, wg_keypair, wg_psk
from probes.model import Reason
from tests.sshd import ThreadedCommandServer

pytestmark = [pytest.mark.wireguard, pytest.mark.lab]

AGENT_TUNNEL = "10.201.0.2/32"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Setup:
    lab: Lab
    node: Host
    agent: Host
    server: Any
    params: check.WireGuardParams


def _write(path: Path, text: str) -> str:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def wg_lab(lab: Lab) -> Setup:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    keys, psk = wg_keypair(), wg_psk()
    server = lab.start_wireguard(node, peers=[WgPeer(keys.public, AGENT_TUNNEL, psk)])
    params = check.WireGuardParams(
        host=node.address, port=server.port, server_public_key=server.public_key,
        private_key_file=_write(lab.dir / "agent.key", keys.private),
        preshared_key_file=_write(lab.dir / "agent.psk", psk),
        state_file=str(lab.dir / "state" / "wg-timestamps.json"), retry_interval=0.25,
        tunnel_address=AGENT_TUNNEL, canary=server.tunnel_address, echo_count=10,
        echo_interval=0.01)
    return Setup(lab, node, agent, server, params)


def _from(host: Host, coro_fn: Any, *args: Any, **kwargs: Any) -> CheckResult:
    with host.entered():
        result: CheckResult = asyncio.run(coro_fn(*args, **kwargs))
    return result


def test_handshake_and_session_against_wireguard_go(wg_lab: Setup) -> None:
    hs = _from(wg_lab.agent, check.run_handshake, wg_lab.params, 5.0)
    assert hs.ok and hs.reason is Reason.OK, hs
    assert float(hs.facts["handshake_rtt_seconds"]) > 0 and hs.phases["handshake"] > 0
    time.sleep(0.05)  # wireguard-go drops a peer's initiations < 20 ms apart
    session = _from(wg_lab.agent, check.run_session, wg_lab.params, 5.0)
    assert session.ok, session
    q = session.quality
    assert q is not None and q.sent == 10 and q.received == 10
    assert q.rtt_p50_seconds is not None and q.rtt_max_seconds is not None
    print(f"\nhandshake rtt {float(hs.facts['handshake_rtt_seconds']) * 1e3:.3f} ms, "
          f"in-tunnel rtt p50 {q.rtt_p50_seconds * 1e3:.3f} ms "
          f"max {q.rtt_max_seconds * 1e3:.3f} ms")
    peer = wg_lab.server.dump().splitlines()[1].split("\t")
    assert int(peer[4]) > 0 and int(peer[5]) > 0, "server recorded no handshake / no rx bytes"


def test_session_loss_measured_under_20_percent_loss(wg_lab: Setup) -> None:
    wg_lab.lab.set_loss(wg_lab.agent, 20)  # the agent's packets; the echo requests lose 20%
    params = msgspec.structs.replace(wg_lab.params, echo_count=200, echo_interval=0.005,
                                     loss_threshold=1.0)
    result = _from(wg_lab.agent, check.run_session, params, 10.0)
    assert result.ok, result
    q = result.quality
    assert q is not None and q.sent == 200
    print(f"\n20% injected: measured loss {q.loss_ratio:.1%} ({q.received}/{q.sent})")
    assert 0.10 <= q.loss_ratio <= 0.30


def test_wrong_server_key_is_timeout(wg_lab: Setup) -> None:
    params = msgspec.structs.replace(wg_lab.params, server_public_key=wg_keypair().public)
    result = _from(wg_lab.agent, check.run_handshake, params, 1.0)
    assert result.reason is Reason.TIMEOUT and "does not know this agent's key" in result.detail


def test_unknown_agent_key_is_timeout(wg_lab: Setup) -> None:
    other = _write(wg_lab.lab.dir / "other.key", wg_keypair().private)
    params = msgspec.structs.replace(wg_lab.params, private_key_file=other)
    result = _from(wg_lab.agent, check.run_handshake, params, 1.0)
    assert result.reason is Reason.TIMEOUT, result


def test_wrong_psk_is_bad_response(wg_lab: Setup) -> None:
    params = msgspec.structs.replace(wg_lab.params,
                     preshared_key_file=_write(wg_lab.lab.dir / "wrong.psk", wg_psk()))
    result = _from(wg_lab.agent, check.run_handshake, params, 2.0)
    assert result.reason is Reason.BAD_RESPONSE and "preshared" in result.detail, result


def test_server_stopped_is_icmp_unreachable(wg_lab: Setup) -> None:
    wg_lab.server.stop()
    result = _from(wg_lab.agent, check.run_handshake, wg_lab.params, 2.0)
    assert result.reason is Reason.ICMP_UNREACHABLE, result
    assert "type 3 code 3" in result.detail


def test_port_closed_is_icmp_unreachable(wg_lab: Setup) -> None:
    params = msgspec.structs.replace(wg_lab.params, port=wg_lab.params.port + 7)
    result = _from(wg_lab.agent, check.run_session, params, 2.0)
    assert result.reason is Reason.ICMP_UNREACHABLE, result


def test_partitioned_node_is_timeout(wg_lab: Setup) -> None:
    wg_lab.lab.partition(wg_lab.node)
    result = _from(wg_lab.agent, check.run_handshake, wg_lab.params, 1.0)
    assert result.reason is Reason.TIMEOUT, result


def test_restart_with_clock_stepped_back_still_handshakes(wg_lab: Setup) -> None:
    now = time.time_ns()
    first = _from(wg_lab.agent, check.run_handshake, wg_lab.params, 3.0, wall_ns=lambda: now)
    assert first.ok, first
    time.sleep(0.05)
    stepped = now - 600 * 10**9  # ten minutes back
    second = _from(wg_lab.agent, check.run_handshake, wg_lab.params, 3.0,
                   wall_ns=lambda: stepped)
    assert second.ok, second
    # control: without the persisted timestamp, wireguard-go drops the stale initiation
    forgetful = msgspec.structs.replace(wg_lab.params, state_file=None)
    third = _from(wg_lab.agent, check.run_handshake, forgetful, 1.0, wall_ns=lambda: stepped)
    assert third.reason is Reason.TIMEOUT, third


def test_under_load_cookie_then_mac2_succeeds(wg_lab: Setup) -> None:
    flooder = wg_lab.lab.add_host("flood")
    proc = flooder.popen([sys.executable, "-m", "tests.wireguard.wg_flood", wg_lab.node.address,
                          str(wg_lab.params.port), wg_lab.params.server_public_key, "40"],
                         name="flood", env={"PYTHONPATH": str(REPO)})
    results: list[CheckResult] = []
    try:
        deadline = time.monotonic() + 30
        time.sleep(0.5)  # let the handshake queue fill
        while time.monotonic() < deadline:
            result = _from(wg_lab.agent, check.run_handshake, wg_lab.params, 5.0)
            results.append(result)
            if result.facts.get("cookie_used"):
                break
            time.sleep(0.1)
    finally:
        wg_lab.lab.stop_process(proc)
    log = (wg_lab.lab.dir / "flood-flood.log").read_text()
    print(f"\nprobes under load: {[(r.reason.value, r.facts.get('cookie_used')) for r in results]}"
          f"; flooder: {log.strip()}")
    assert all(r.ok for r in results), results
    assert results[-1].facts["cookie_used"] is True and results[-1].facts["mac2_used"] is True
    assert "cookie" in results[-1].phases


# --- identity tooling, telemetry and the one-shot CLI against the real server -----------------


def test_keygen_ssh_provisioning_cli_json_and_telemetry(
        lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    server = lab.start_wireguard(node)  # no peers yet: keygen provisions ours
    # sshd is not installed: an in-process SSH server runs each command in the node's namespace
    sshd = ThreadedCommandServer(namespace=node.ns)
    ids = lab.dir / "ids"
    ssh = ["--ssh", "root@127.0.0.1", "--ssh-port", str(sshd.port), "--known-hosts", "none"]
    try:
        assert main(["keygen", "wireguard", "--agent", "probe-a", "--dir", str(ids), "--psk",
                     "--allowed-ip", AGENT_TUNNEL, "--interface", server.interface, *ssh]) == 0
        out = capsys.readouterr().out
        public = (ids / "probe-a.pub").read_text().strip()
        expected = (f"wg set {server.interface} peer {public} preshared-key /dev/stdin "
                    f"allowed-ips {AGENT_TUNNEL}")
        assert f"remote command on root@127.0.0.1: {expected}" in out
        assert sshd.commands == [expected]
        peer = server.dump().splitlines()[1].split("\t")
        assert peer[0] == public and peer[1] == (ids / "probe-a.psk").read_text().strip()

        cli = [sys.executable, "-m", "probes.cli", "probe", "wireguard",
               "--endpoint", f"{node.address}:{server.port}",
               "--server-public-key", server.public_key,
               "--private-key-file", str(ids / "probe-a.key"),
               "--preshared-key-file", str(ids / "probe-a.psk"),
               "--state-file", str(lab.dir / "cli-state.json"), "--json"]
        done = agent.run(cli, check=False)
        result = json.loads(done.stdout)
        assert done.returncode == 0 and result["ok"] is True and result["reason"] == "ok", done
        assert result["phases"]["handshake"] > 0 and result["duration_seconds"] > 0
        time.sleep(0.05)
        done = agent.run([*cli, "--tunnel-address", AGENT_TUNNEL, "--ping",
                          server.tunnel_address, "--count", "5"], check=False)
        result = json.loads(done.stdout)
        assert done.returncode == 0 and result["quality"]["received"] == 5, done
        print(f"\nCLI session JSON: {done.stdout.strip()}")

        with node.entered():
            view = asyncio.run(collect(server.interface))
        assert len(view.peers) == 1 and view.peers[0].public_key == public
        assert view.active_peers(time.time()) == 1 and view.rx_bytes > 0 and view.tx_bytes > 0

        assert main(["keygen", "wireguard", "--agent", "probe-a", "--dir", str(ids), "--remove",
                     "--interface", server.interface, *ssh]) == 0
        assert public not in server.dump()
        done = agent.run([*cli, "--timeout", "1"], check=False)
        assert done.returncode == 1 and json.loads(done.stdout)["reason"] == "timeout"
    finally:
        sshd.close()
