"""``telemetry.load`` against a real node: the kernel's counters of a lab namespace, read inside
it (``netns``), while another host sends it packets; the daemon's CPU from its pid file."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest

from probes.checks import load
from probes.checks.base import execute
from probes.model import Reason

pytestmark = [pytest.mark.agent, pytest.mark.lab]


def test_load_read_in_a_namespace_sees_its_traffic(lab: Any) -> None:
    node, client = lab.add_host("node"), lab.add_host("client")
    wg = lab.start_wireguard(node)
    assert wg.proc is not None
    pid_file = lab.dir / "wg.pid"
    pid_file.write_text(f"{wg.proc.pid}\n")
    params = load.LoadParams(node="lab-node", netns=node.ns, interfaces=("eth0",),
                             daemon_pid_file=str(pid_file), wireguard_interface=wg.interface)

    async def read() -> Any:
        return await execute(load.LOAD, params, 5.0)

    first = asyncio.run(read())
    assert first.ok, first.detail
    assert first.load is None  # nothing to rate against yet
    assert first.facts["node_sessions"] == 0  # no peer has handshaken
    client.run(["ping", "-q", "-f", "-c", "2000", "-s", "200", node.address], timeout=60)
    second = asyncio.run(read())
    assert second.ok, second.detail
    rates = second.load
    assert rates is not None and rates.interval_seconds > 0
    # 2000 echo requests in, 2000 replies out, 228-byte IP packets plus Ethernet framing
    moved = rates.packets_per_second * rates.interval_seconds
    assert 4000 <= moved <= 4200, rates
    assert rates.bytes_per_second * rates.interval_seconds >= 4000 * 228
    assert rates.cpu_busy_ratio is not None and 0.0 <= rates.cpu_busy_ratio <= 1.0
    facts = second.facts
    assert facts["node_interface_received_packets_total"] >= 2000
    assert facts["node_interface_sent_packets_total"] >= 2000
    assert "node_softnet_dropped_packets_total" in facts
    assert "node_udp_receive_errors_total" in facts


def test_unreadable_node_is_a_failed_read_with_a_reason(lab: Any) -> None:
    params = load.LoadParams(node="gone", netns=f"{lab.prefix}no-such-namespace")
    result = asyncio.run(execute(load.LOAD, params, 5.0))
    assert not result.ok
    assert result.reason in (Reason.BAD_RESPONSE, Reason.PROBE_ERROR)
    assert result.load is None


def test_cli_prints_the_rates_the_mesh_would_weigh(lab: Any) -> None:
    node, client = lab.add_host("node"), lab.add_host("client")
    pinger = client.popen(["ping", "-q", "-i", "0.01", node.address], name="ping")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "probes.cli", "probe", "load-telemetry", "--netns", node.ns,
             "--interface", "eth0", "--cpu", "host", "--interval", "1", "--json"],
            capture_output=True, text=True, timeout=60, check=False)
    finally:
        lab.stop_process(pinger)
    assert done.returncode == 0, done.stdout + done.stderr
    got = json.loads(done.stdout)
    assert 100 <= got["load"]["packets_per_second"] <= 300  # 100 echo requests + replies a s
    assert got["facts"]["node_interface_received_packets_total"] > 0
