"""``telemetry.load`` against a real node: the kernel's counters of a lab namespace, read inside
it (``netns``), while another host sends it packets; the daemon's CPU from its pid file."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from probes.checks import load
from probes.checks.base import execute
from probes.cli import build_parser, node_views
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


def test_cli_prints_the_rates_the_mesh_would_weigh(
        lab: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's two reads with a known burst between them, sent in place of its wait: the
    rates it prints are the burst's whatever the machine's load. (A ping at 100 a second during
    a real wait sent about half as many on a loaded machine, and a rate bound failed.)"""
    node, client = lab.add_host("node"), lab.add_host("client")

    async def burst_instead_of_the_wait(seconds: float) -> None:
        await asyncio.to_thread(client.run, ["ping", "-q", "-f", "-c", "2000", "-s", "200",
                                             node.address], timeout=60)

    monkeypatch.setattr(node_views, "asyncio",
                        SimpleNamespace(run=asyncio.run, sleep=burst_instead_of_the_wait))
    args = build_parser().parse_args(
        ["probe", "load-telemetry", "--netns", node.ns, "--interface", "eth0", "--cpu", "host",
         "--interval", "1", "--json"])
    assert args.handler(args) == 0
    got = json.loads(capsys.readouterr().out)
    # 2000 echo requests in, 2000 replies out (as in the in-process read above)
    moved = got["load"]["packets_per_second"] * got["load"]["interval_seconds"]
    assert 4000 <= moved <= 4200, got["load"]
    assert got["facts"]["node_interface_received_packets_total"] >= 2000
