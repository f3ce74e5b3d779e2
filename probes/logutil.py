"""Log lines for repeated trouble, rate-limited: one line per kind of trouble per interval,
saying how many were held back, instead of one per occurrence.

A full disk or an exhausted descriptor table fails every call, many times a second; logging
each (with a traceback) fills the disk that is already full and buries the first line that said
why. What is rate-limited here is the log line, never the counting: callers keep their metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any


class RateLimitedLog:
    """``log(key, message, *args)``: at most one line per ``key`` per ``interval`` seconds."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, key: str, message: str, *args: Any, level: int = logging.ERROR,
                 exc_info: bool = False) -> bool:
        """Log unless ``key`` was logged less than ``interval`` ago; True when it was logged."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        held = self._held.pop(key, 0)
        if held and last is not None:
            message += f" ({held} more like it in the last {now - last:.0f} s not logged)"
        self._last[key] = now
        self.logger.log(level, message, *args, exc_info=exc_info)
        return True


def install_loop_exception_limiter(loop: asyncio.AbstractEventLoop,
                                   limiter: RateLimitedLog) -> None:
    """Route the event loop's own error reports (e.g. "socket.accept() out of system resource"
    when descriptors run out) through ``limiter``, one line per message per interval."""
    def handler(loop_: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", "event loop error"))
        exc = context.get("exception")
        key = message + (f": {type(exc).__name__}" if exc is not None else "")
        detail = f": {exc}" if exc is not None else ""
        limiter(key, "%s%s", message, detail)

    loop.set_exception_handler(handler)
