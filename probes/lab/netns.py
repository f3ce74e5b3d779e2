"""Network namespaces: create, run commands inside, enter from a thread, delete.

Only ``ip`` from iproute2 is used. ``ip netns exec`` execs in place (it does not fork), so the PID
of a process started through it is the daemon's own PID, which is what we stop later.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")

_libc = ctypes.CDLL(None, use_errno=True)


class LabError(RuntimeError):
    """The lab could not be built or a command inside it failed."""


def run(argv: Sequence[str], *, check: bool = True, input_text: str | None = None,
        timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, input=input_text,
                              timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise LabError(f"command not found: {argv[0]}") from exc
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def create(name: str) -> None:
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def delete(name: str) -> None:
    if exists(name):
        run(["ip", "netns", "del", name], check=False)


def list_names(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def pids(ns: str) -> list[int]:
    """Processes inside namespace ``ns`` (none when it is gone)."""
    proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                          check=False, timeout=10)
    return [int(line) for line in proc.stdout.split() if line.isdigit()]


def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def popen(ns: str, argv: Sequence[str], *, log_path: Path | None = None,
          env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - owned by Popen
    try:
        return subprocess.Popen(exec_argv(ns, argv), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=full_env, start_new_session=True)
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise LabError(f"setns failed: {os.strerror(err)}")


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Move the calling thread into namespace ``name`` for the duration of the block.

    Sockets created inside stay in that namespace after the block ends, so an in-process probe
    runs "from" a lab host. Only this thread moves; other threads are unaffected.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)
