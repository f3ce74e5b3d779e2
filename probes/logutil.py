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

    def admit(self, key: str) -> str | None:
        """None when ``key`` was let through less than ``interval`` ago (it is counted as held
        back); otherwise the suffix to add to its line: how many were held back, or ""."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        held = self._held.pop(key, 0)
        self._last[key] = now
        if held and last is not None:
            return f" ({held} more like it in the last {now - last:.0f} s not logged)"
        return ""

    def __call__(self, key: str, message: str, *args: Any, level: int = logging.ERROR,
                 exc_info: bool = False) -> bool:
        """Log unless ``key`` was logged less than ``interval`` ago; True when it was logged."""
        suffix = self.admit(key)
        if suffix is None:
            return False
        self.logger.log(level, message + suffix, *args, exc_info=exc_info)
        return True


class RateLimitFilter(logging.Filter):
    """The same limit for lines a library logs itself (aiohttp's "Error handling request"):
    one record per message and exception type per ``interval``, keyed on the unformatted
    message so a client's address does not make a new kind. A record whose exception is one of
    ``client_errors`` (the client's fault, e.g. a malformed request head) loses its traceback
    and names the exception on its line instead; any other keeps it, so a server bug stays
    visible with its traceback at least once per interval."""

    def __init__(self, limiter: RateLimitedLog,
                 client_errors: tuple[type[BaseException], ...] = ()) -> None:
        super().__init__()
        self.limiter = limiter
        self.client_errors = client_errors

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        key = str(record.msg) + (f": {type(exc).__name__}" if exc is not None else "")
        suffix = self.limiter.admit(key)
        if suffix is None:
            return False
        message = record.getMessage()
        if exc is not None and isinstance(exc, self.client_errors):
            # aiohttp's exceptions carry a multi-line message (with the offending bytes and a
            # caret); its first non-empty line says what was wrong
            text = str(getattr(exc, "message", exc))
            first = next((line.strip() for line in text.splitlines() if line.strip()), "")
            message += f": {type(exc).__name__}: {first}"
            record.exc_info = None
            record.exc_text = None
        record.msg, record.args = message + suffix, None
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
