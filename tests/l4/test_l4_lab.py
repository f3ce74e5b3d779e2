"""L4 probes against a lab node: open, closed, filtered, unreachable, ICMP echo, random loss."""

from __future__ import annotations

import asyncio

import pytest

from probes.checks import l4
from probes.checks.base import CheckResult, execute
from probes.model import Reason

from .l4env import TCP_PORT, UDP_PORT, L4Lab

pytestmark = [pytest.mark.l4, pytest.mark.lab]


def test_tcp_open_and_closed(l4lab: L4Lab) -> None:
    host = l4lab.node.address
    ok = l4lab.run(l4.run_tcp(l4.TcpParams(host=host, port=TCP_PORT), 1.0))
    assert ok.ok and ok.reason is Reason.OK and "connect" in ok.phases
    closed = l4lab.run(l4.run_tcp(l4.TcpParams(host=host, port=TCP_PORT + 10), 1.0))
    assert not closed.ok and closed.reason is Reason.REFUSED


def test_udp_reply_prefix_and_closed_port(l4lab: L4Lab) -> None:
    host = l4lab.node.address
    good = l4lab.run(l4.run_udp(l4.UdpParams(host=host, port=UDP_PORT, send=b"hi",
                                             expect_prefix=b"pong:hi"), 1.0))
    assert good.ok and good.phases["rtt"] > 0
    wrong = l4lab.run(l4.run_udp(l4.UdpParams(host=host, port=UDP_PORT, send=b"hi",
                                              expect_prefix=b"nope"), 1.0))
    assert wrong.reason is Reason.UNEXPECTED_REPLY
    closed = l4lab.run(l4.run_udp(l4.UdpParams(host=host, port=UDP_PORT + 10, send=b"x"), 1.0))
    assert closed.reason is Reason.ICMP_UNREACHABLE
    assert "type 3 code 3" in closed.detail


def test_unrouted_address_is_icmp_unreachable(l4lab: L4Lab) -> None:
    # the router has no route to 10.77.250.0/24 and answers with ICMP net unreachable
    result = l4lab.run(l4.run_udp(l4.UdpParams(host="10.77.250.2", port=9, send=b"x"), 1.0))
    assert result.reason is Reason.ICMP_UNREACHABLE


@pytest.mark.parametrize("ping_socket", [True, False], ids=["ping-socket", "raw-socket"])
def test_icmp_echo(l4lab: L4Lab, ping_socket: bool) -> None:
    group_range = "0 2147483647" if ping_socket else "1 0"
    l4lab.agent.run(["sysctl", "-qw", f"net.ipv4.ping_group_range={group_range}"])
    result = l4lab.run(l4.run_icmp(l4.IcmpParams(host=l4lab.node.address, count=3,
                                                 interval=0.05), 2.0))
    assert result.ok and result.quality is not None
    assert result.quality.received == 3 and result.quality.rtt_p50_seconds is not None
    assert result.facts["socket"] == ("ping" if ping_socket else "raw")


def test_filtered_is_timeout(l4lab: L4Lab) -> None:
    host = l4lab.node.address
    l4lab.lab.partition(l4lab.agent)
    for kind, params in ((l4.TCP, l4.TcpParams(host=host, port=TCP_PORT)),
                         (l4.UDP, l4.UdpParams(host=host, port=UDP_PORT, send=b"x")),
                         (l4.ICMP, l4.IcmpParams(host=host))):
        result = l4lab.run(execute(kind, params, 0.3))
        assert result.reason is Reason.TIMEOUT, kind.name
    l4lab.lab.heal(l4lab.agent)
    assert l4lab.run(l4.run_tcp(l4.TcpParams(host=host, port=TCP_PORT), 1.0)).ok


async def _many(kind: object, params: object, n: int, concurrency: int = 25) -> list[bool]:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> bool:
        async with gate:
            return (await execute(kind, params, 0.5)).ok  # type: ignore[arg-type]

    return list(await asyncio.gather(*(one() for _ in range(n))))


@pytest.mark.parametrize("kind", ["udp", "icmp"])
def test_loss_rate_matches_injected(l4lab: L4Lab, kind: str) -> None:
    host = l4lab.node.address
    l4lab.lab.set_loss(l4lab.agent, 20)
    # one packet per probe (no ICMP resends), so each outcome is one Bernoulli trial of the loss
    params = (l4.UdpParams(host=host, port=UDP_PORT, send=b"x") if kind == "udp"
              else l4.IcmpParams(host=host, retries=0))
    n = 300
    outcomes = l4lab.run(_many(l4.UDP if kind == "udp" else l4.ICMP, params, n))
    failed = outcomes.count(False) / n
    # binomial(300, 0.2): sd 2.3 points; 12..28 % is > 3 sd either side
    assert 0.12 <= failed <= 0.28, failed


def test_a_liveness_echo_rides_out_loss_by_resending(l4lab: L4Lab) -> None:
    """A single-echo probe resends while nothing answered (at timeout/4, then 3/4): at 20 %
    loss it fails only when all three echoes are lost (~1 %), and says how many it sent."""
    l4lab.lab.set_loss(l4lab.agent, 20)
    params = l4.IcmpParams(host=l4lab.node.address)

    async def run_all() -> list[CheckResult]:
        return [await execute(l4.ICMP, params, 0.5) for _ in range(150)]

    results = l4lab.run(run_all())
    failed = [r for r in results if not r.ok]
    resent = [r for r in results if r.ok and int(r.facts["echo_resends"]) > 0]
    assert len(failed) <= 8, len(failed)  # 3 trials at 20 %: 0.8 % expected; 8 of 150 is 5 %
    assert resent, "no probe needed a resend at 20 % loss"
    # a resend is not loss in the probe's quality: one echo asked for, one answered
    assert all(r.quality is not None and (r.quality.sent, r.quality.received,
                                          r.quality.loss_ratio) == (1, 1, 0.0) for r in resent)
