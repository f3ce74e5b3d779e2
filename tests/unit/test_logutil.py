"""Rate-limited log lines for repeated trouble."""

from __future__ import annotations

import asyncio
import logging

import pytest

from probes.logutil import RateLimitedLog, RateLimitFilter, install_loop_exception_limiter


def test_one_line_per_key_per_interval_saying_how_many_were_held(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("t"), interval=10.0, clock=lambda: now[0])
    logged = []
    for i in range(100):
        now[0] = i * 0.25  # 25 s of the same trouble, four times a second
        logged.append(limited("disk", "commit failed: %s", "full"))
        limited("other", "another trouble")
    assert sum(logged) == 3  # at 0, 10 and 20 s
    lines = [r.getMessage() for r in caplog.records if "commit failed" in r.getMessage()]
    assert lines[0] == "commit failed: full"
    assert lines[1] == "commit failed: full (39 more like it in the last 10 s not logged)"
    assert len([r for r in caplog.records if "another" in r.getMessage()]) == 3


async def test_the_loop_reports_descriptor_exhaustion_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    install_loop_exception_limiter(loop, RateLimitedLog(logging.getLogger("t"), 60.0))
    try:
        for _ in range(1000):
            loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                         "exception": OSError(24, "Too many open files")})
    finally:
        loop.set_exception_handler(None)
    assert len([r for r in caplog.records if "accept" in r.getMessage()]) == 1


def test_a_library_logger_is_limited_and_keeps_tracebacks_only_for_server_bugs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    logger = logging.getLogger("t.filtered")
    logger.addFilter(RateLimitFilter(RateLimitedLog(logger, 10.0, clock=lambda: now[0]),
                                     (ValueError,)))
    for i in range(40):
        now[0] = i * 0.5  # 20 s of it, two of each a second, from ever new addresses
        for exc in (ValueError("bad head\n  b'x'\n   ^"), KeyError("bug")):
            try:
                raise exc
            except Exception:
                logger.exception("Error handling request from %s", f"10.0.0.{i}")
    bad = [r for r in caplog.records if "ValueError" in r.getMessage()]
    bugs = [r for r in caplog.records if r.exc_info and r.exc_info[0] is KeyError]
    assert [r.getMessage() for r in bad] == [
        "Error handling request from 10.0.0.0: ValueError: bad head",
        "Error handling request from 10.0.0.20: ValueError: bad head"
        " (19 more like it in the last 10 s not logged)"]
    assert all(r.exc_info is None for r in bad)  # the client's fault: no traceback
    assert len(bugs) == 2  # a server bug keeps its traceback, once per interval
    assert len(caplog.records) == 4
