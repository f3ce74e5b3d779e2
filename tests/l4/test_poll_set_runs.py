"""TCP connects and UDP exchanges started without a coroutine wait on the loop's one poll set:
no writer, reader or timer of their own per run, the coroutine's results outcome for outcome,
every deadline kept (never ended early, shorter ones first), and a cancelled run never reports."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from probes.checks import errqueue, l4
from probes.checks.base import CheckResult, Done, execute
from probes.checks.pollset import poll_set
from probes.model import Reason

pytestmark = pytest.mark.l4


@pytest.fixture
def open_port() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0), backlog=512) as server:
        yield server.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as server:
        return int(server.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose SYNs go unanswered: its listener's accept queue is full and never read."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as server:
        port = server.getsockname()[1]
        fillers = [socket.create_connection(("127.0.0.1", port), timeout=1) for _ in range(1)]
        try:
            yield port
        finally:
            for f in fillers:
                f.close()


def start(port: int, timeout: float, results: list[CheckResult]) -> Any:
    run = l4.start_tcp(l4.TcpParams(host="127.0.0.1", port=port), timeout, results.append)
    assert run is not None
    return run


async def until(cond: Callable[[], bool], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not cond():
            await asyncio.sleep(0.002)


def counting_loop_calls(monkeypatch: pytest.MonkeyPatch, *names: str) -> dict[str, int]:
    """How often the running loop's ``names`` are called from now on (its poll set made first:
    it is made once per loop, and its reader is not a run's)."""
    loop = asyncio.get_running_loop()
    poll_set()
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(loop, name)

        def counting(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(loop, name, counting)
    return calls


def gathering(count: int) -> tuple[list[CheckResult], asyncio.Future[None], Done]:
    """A run's ``done`` that keeps its results, and a future set once ``count`` came in."""
    results: list[CheckResult] = []
    all_done = asyncio.get_running_loop().create_future()

    def done(result: CheckResult) -> None:
        results.append(result)
        if len(results) == count:
            all_done.set_result(None)
    return results, all_done, done


async def test_many_connects_use_no_writer_or_timer_of_their_own(
        open_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_loop_calls(monkeypatch, "add_writer", "call_at")  # call_later: call_at
    results, all_done, done = gathering(64)
    for _ in range(64):
        assert l4.start_tcp(l4.TcpParams(host="127.0.0.1", port=open_port), 5.0, done)
    await all_done  # no sleep meanwhile: every timer counted is the runs'
    assert [r.reason for r in results] == [Reason.OK] * 64
    assert all(set(r.phases) == {"connect"} for r in results)
    assert calls["add_writer"] == 0
    # one timer for all 64 deadlines (armed at the first, none of the later ones is earlier)
    assert calls["call_at"] <= 1
    assert len(poll_set()) == 0


async def test_refused_and_open_give_the_coroutines_results(open_port: int,
                                                            closed_port: int) -> None:
    reasons = []
    for port in (open_port, closed_port):
        done: asyncio.Future[CheckResult] = asyncio.get_running_loop().create_future()
        assert l4.start_tcp(l4.TcpParams(host="127.0.0.1", port=port), 1.0, done.set_result)
        result = await done
        coroutine = await l4.run_tcp(l4.TcpParams(host="127.0.0.1", port=port), 1.0)
        assert (result.ok, result.reason, result.detail, sorted(result.phases)) == (
            coroutine.ok, coroutine.reason, coroutine.detail, sorted(coroutine.phases))
        reasons.append(result.reason)
    assert reasons == [Reason.OK, Reason.REFUSED]


async def test_unanswered_connects_end_at_their_own_deadlines(silent_port: int) -> None:
    longer: list[CheckResult] = []
    shorter: list[CheckResult] = []
    start(silent_port, 0.4, longer)
    start(silent_port, 0.15, shorter)  # started later, due earlier: the set re-arms for it
    await until(lambda: len(shorter) == 1)
    assert not longer, "a deadline was taken before it was reached"
    await until(lambda: len(longer) == 1)
    for results, timeout in ((shorter, 0.15), (longer, 0.4)):
        result = results[0]
        assert result.reason is Reason.TIMEOUT
        assert result.detail == f"no answer within {timeout:g}s"
        assert result.duration_seconds >= timeout
    coroutine = await l4.run_tcp(l4.TcpParams(host="127.0.0.1", port=silent_port), 0.15)
    assert (coroutine.reason, coroutine.detail) == (shorter[0].reason, shorter[0].detail)


async def test_a_cancelled_run_reports_nothing_and_leaves_the_set(silent_port: int,
                                                                  open_port: int) -> None:
    results: list[CheckResult] = []
    run = start(silent_port, 0.1, results)
    assert len(poll_set()) == 1
    run.cancel()
    assert len(poll_set()) == 0
    later: list[CheckResult] = []
    start(open_port, 1.0, later)  # may get the cancelled run's fd number
    await until(lambda: len(later) == 1)
    await asyncio.sleep(0.2)  # past the cancelled run's deadline
    assert results == []
    assert later[0].reason is Reason.OK


# ------------------------------------------------------------------------------- udp


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A UDP server answering ``pong:`` and the request, from a thread of its own."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = server.recvfrom(2048)
            except TimeoutError:
                continue
            server.sendto(b"pong:" + data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        server.close()


@pytest.fixture
def mute_port() -> Iterator[int]:
    """A bound UDP port that never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mute:
        mute.bind(("127.0.0.1", 0))
        yield mute.getsockname()[1]


def udp(port: int, expect: bytes | None = b"pong:hi") -> l4.UdpParams:
    return l4.UdpParams(host="127.0.0.1", port=port, send=b"hi", expect_prefix=expect)


async def test_many_udp_exchanges_use_no_reader_or_timer_of_their_own(
        echo_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_loop_calls(monkeypatch, "add_reader", "call_at")
    results, all_done, done = gathering(32)
    for _ in range(32):
        assert l4.start_udp(udp(echo_port), 5.0, done)
    await all_done
    assert [r.reason for r in results] == [Reason.OK] * 32
    assert all(0 < r.phases["rtt"] <= r.duration_seconds for r in results)
    assert calls == {"add_reader": 0, "call_at": 1}
    assert len(poll_set()) == 0


async def test_udp_outcomes_are_the_coroutines(echo_port: int, closed_port: int,
                                               mute_port: int) -> None:
    cases = [(udp(echo_port), 1.0, Reason.OK),
             (udp(echo_port, b"nope"), 1.0, Reason.UNEXPECTED_REPLY),
             (udp(closed_port), 1.0, Reason.ICMP_UNREACHABLE),
             (udp(mute_port), 0.15, Reason.TIMEOUT)]
    for params, timeout, reason in cases:
        done: asyncio.Future[CheckResult] = asyncio.get_running_loop().create_future()
        assert l4.start_udp(params, timeout, done.set_result)
        result = await done
        coroutine = await l4.run_udp(params, timeout)
        assert result.reason is reason
        assert (result.ok, result.reason, result.detail, sorted(result.phases)) == (
            coroutine.ok, coroutine.reason, coroutine.detail, sorted(coroutine.phases))
        if reason is Reason.TIMEOUT:
            assert result.duration_seconds >= timeout


@pytest.mark.parametrize(("family", "host", "icmp"), [
    (socket.AF_INET, "127.0.0.1", "ICMP type 3 code 3"),
    (socket.AF_INET6, "::1", "ICMP type 1 code 4"),
])
async def test_a_udp_exchanges_socket_queues_icmp_errors_and_takes_kernel_stamps(
        family: int, host: str, icmp: str) -> None:
    # the C socket type the started run uses is set up as DatagramProbe.make_socket does it:
    # non-blocking, the error queue (ICMP type and code), kernel receive stamps (the RTT)
    with socket.socket(family, socket.SOCK_DGRAM) as unused:
        unused.bind((host, 0))
        port = unused.getsockname()[1]
    done: asyncio.Future[CheckResult] = asyncio.get_running_loop().create_future()
    run = l4.start_udp(l4.UdpParams(host=host, port=port, send=b"x"), 1.0, done.set_result)
    assert isinstance(run, l4._UdpExchange)
    sock = run._sock
    level, option = errqueue.error_queue_option(family)
    assert sock.getsockopt(level, option) == 1
    assert sock.getsockopt(socket.SOL_SOCKET, errqueue.SO_TIMESTAMPNS) == 1
    assert sock.getblocking() is False
    result = await done
    assert (result.reason, result.detail) == (Reason.ICMP_UNREACHABLE, f"ECONNREFUSED ({icmp})")


async def test_a_cancelled_udp_exchange_reports_nothing(mute_port: int) -> None:
    results: list[CheckResult] = []
    run = l4.start_udp(udp(mute_port), 0.1, results.append)
    assert run is not None and len(poll_set()) == 1
    run.cancel()
    assert len(poll_set()) == 0
    await asyncio.sleep(0.2)
    assert results == []


def raising_once(real: Callable[..., Any]) -> Callable[..., Any]:
    """``real``, except that its first call raises: a bug in one run's callback."""
    calls = [0]

    def call(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("bug in a callback")
        return real(*args)
    return call


async def test_a_callback_that_raises_ends_its_run_and_the_others_still_end(
        open_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(l4, "_connect_failed", raising_once(l4._connect_failed))
    results: list[CheckResult] = []
    for _ in range(8):
        start(open_port, 5.0, results)
    await until(lambda: len(results) == 8)
    crashed = [r for r in results if r.reason is Reason.PROBE_ERROR]
    assert len(crashed) == 1 and "RuntimeError: bug in a callback" in crashed[0].detail
    assert all(r.ok for r in results if r is not crashed[0])


async def test_execute_ends_when_a_deadlines_callback_raises(
        silent_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(l4, "_connect_failed", raising_once(l4._connect_failed))
    params = l4.TcpParams(host="127.0.0.1", port=silent_port)
    result = await asyncio.wait_for(execute(l4.TCP, params, 0.1), 5.0)
    assert result.reason is Reason.PROBE_ERROR and not result.ok
    again = await asyncio.wait_for(execute(l4.TCP, params, 0.1), 5.0)  # the set still works
    assert again.reason is Reason.TIMEOUT


async def test_execute_ends_when_a_udp_replys_callback_raises(
        echo_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(l4, "_exchange_result", raising_once(l4._exchange_result))
    result = await asyncio.wait_for(execute(l4.UDP, udp(echo_port), 2.0), 5.0)
    assert result.reason is Reason.PROBE_ERROR
    again = await asyncio.wait_for(execute(l4.UDP, udp(echo_port), 2.0), 5.0)
    assert again.ok, again
