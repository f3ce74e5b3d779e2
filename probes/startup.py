"""Start-up mistakes as one line each: a port already in use, a port or file the process may not
use, a file that is not there. They are the operator's to fix (exit 2), and a 12-frame traceback
only hid the one line that said which address or file."""

from __future__ import annotations

import errno
import os


class StartupError(Exception):
    """The process cannot start; the message is one line saying what and where."""


_BIND_HINTS = {
    errno.EADDRINUSE: "another process listens there (ss -ltnp shows which)",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
    errno.EADDRNOTAVAIL: "no interface of this host has that address",
}


def bind_error(exc: OSError, host: str, port: int) -> StartupError:
    """A listen socket that could not be bound, as one line with what to do."""
    what = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
    hint = _BIND_HINTS.get(exc.errno or 0)
    return StartupError(f"cannot listen on {host}:{port}: {what}" + (f"; {hint}" if hint
                                                                       else ""))


def os_error_line(exc: OSError) -> str:
    """An OSError as ``FILE: reason`` (or just the reason)."""
    reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason
