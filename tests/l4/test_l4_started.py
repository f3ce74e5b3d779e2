"""The L4 kinds' runs without a coroutine (``CheckKind.start``, what the scheduler uses) give
the coroutine's results, outcome for outcome: open, refused, wrong reply, ICMP unreachable,
unrouted, filtered (timeout)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from probes.checks import l4
from probes.checks.base import CheckKind, CheckResult

from .l4env import TCP_PORT, UDP_PORT, L4Lab

pytestmark = [pytest.mark.l4, pytest.mark.lab]


async def started(kind: CheckKind[Any], params: Any, timeout: float) -> CheckResult:
    assert kind.start is not None
    done: asyncio.Future[CheckResult] = asyncio.get_running_loop().create_future()
    run = kind.start(params, timeout, done.set_result)
    assert run is not None, "an IP literal without TLS is started without a coroutine"
    return await done


async def both(kind: CheckKind[Any], params: Any, timeout: float
               ) -> tuple[CheckResult, CheckResult]:
    return await kind.run(params, timeout), await started(kind, params, timeout)


def same(a: CheckResult, b: CheckResult) -> None:
    assert (a.ok, a.reason, a.detail, sorted(a.phases), a.facts) == (
        b.ok, b.reason, b.detail, sorted(b.phases), b.facts)
    assert (a.quality is None) == (b.quality is None)
    if a.quality is not None and b.quality is not None:
        assert (a.quality.sent, a.quality.received) == (b.quality.sent, b.quality.received)


def test_started_runs_give_the_coroutines_results(l4lab: L4Lab) -> None:
    host = l4lab.node.address
    cases: list[tuple[CheckKind[Any], Any, str]] = [
        (l4.TCP, l4.TcpParams(host=host, port=TCP_PORT), "ok"),
        (l4.TCP, l4.TcpParams(host=host, port=TCP_PORT + 10), "refused"),
        (l4.UDP, l4.UdpParams(host=host, port=UDP_PORT, send=b"hi", expect_prefix=b"pong:hi"),
         "ok"),
        (l4.UDP, l4.UdpParams(host=host, port=UDP_PORT, send=b"hi", expect_prefix=b"nope"),
         "unexpected-reply"),
        (l4.UDP, l4.UdpParams(host=host, port=UDP_PORT + 10, send=b"x"), "icmp-unreachable"),
        (l4.UDP, l4.UdpParams(host="10.77.250.2", port=9, send=b"x"), "icmp-unreachable"),
    ]
    for kind, params, reason in cases:
        coroutine, callbacks = l4lab.run(both(kind, params, 1.0))
        assert coroutine.reason.value == reason, (kind.name, params)
        same(coroutine, callbacks)
    l4lab.lab.partition(l4lab.agent)
    try:
        for kind, params in ((l4.TCP, l4.TcpParams(host=host, port=TCP_PORT)),
                             (l4.UDP, l4.UdpParams(host=host, port=UDP_PORT, send=b"x"))):
            coroutine, callbacks = l4lab.run(both(kind, params, 0.3))
            assert coroutine.reason.value == "timeout"
            same(coroutine, callbacks)
            assert callbacks.duration_seconds >= 0.3
    finally:
        l4lab.lab.heal(l4lab.agent)
