"""Run one command for node telemetry, on this host or on the node over SSH (asyncssh).

Both return the command's stdout or raise the caller's error type with a message that says what
went wrong (could not start, timed out, non-zero exit with the start of stderr). SSH is key-based;
``known_hosts`` is what asyncssh takes: a file path, ``()`` for the user's default known_hosts,
or ``None`` to skip host key verification (lab use only). The error is raised *from* what
caused it (``TimeoutError``, ``OSError``, ``asyncssh.Error``; none for a non-zero exit), so a
caller can tell a silent node from a refusing one.
"""

from __future__ import annotations

import asyncio
import errno
import shlex
from collections.abc import Sequence
from typing import Any

import msgspec

from probes.model import Reason

KnownHosts = str | tuple[()] | None


class TelemetryError(ValueError):
    """A node's telemetry could not be read: the command did not run or failed, or what it
    printed makes no sense (:func:`failure_reason` tells which)."""

_STDERR_SHOWN = 200


async def local_output(argv: Sequence[str], *, error: type[Exception],
                       timeout: float = 10.0) -> str:
    """``argv``'s stdout here; raises ``error`` if it cannot start, times out or exits != 0."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise error(f"cannot run {argv[0]}: {exc.strerror}") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise error(f"`{shlex.join(argv)}` did not finish in {timeout:g}s") from exc
    if proc.returncode != 0:
        raise error(f"`{shlex.join(argv)}` exited {proc.returncode}: "
                    f"{err.decode(errors='replace').strip()[:_STDERR_SHOWN]}")
    return out.decode(errors="replace")


async def ssh_output(host: str, command: str, *, error: type[Exception],
                     username: str | None = None, port: int = 22,
                     known_hosts: KnownHosts = (), client_keys: list[Any] | None = None,
                     stdin: str | None = None, timeout: float = 10.0) -> str:
    """``command``'s stdout on ``host``; raises ``error`` on timeout, SSH failure or exit != 0.
    ``client_keys``: key file paths or asyncssh key objects; None = the user's default keys.
    ``stdin`` is fed to the command's stdin (e.g. a key for ``wg set ... /dev/stdin``)."""
    import asyncssh  # noqa: PLC0415 - only remote collection needs it

    options: dict[str, Any] = {"port": port, "known_hosts": known_hosts}
    if username:
        options["username"] = username
    if client_keys is not None:
        options["client_keys"] = client_keys
    try:
        async with asyncio.timeout(timeout):
            async with asyncssh.connect(host, **options) as conn:
                done = await conn.run(command, input=stdin, check=False)
    except TimeoutError as exc:
        raise error(f"ssh {host}: no result in {timeout:g}s") from exc
    except (OSError, asyncssh.Error) as exc:
        raise error(f"ssh {host}: {exc}") from exc
    if done.exit_status != 0:
        raise error(f"ssh {host}: `{command}` exited {done.exit_status}: "
                    f"{str(done.stderr).strip()[:_STDERR_SHOWN]}")
    return str(done.stdout)


async def node_output(argv: Sequence[str], shell: NodeShell | None, *, error: type[Exception],
                      timeout: float) -> str:
    """``argv``'s stdout on this host (``shell`` None) or on the node over SSH."""
    if shell is None:
        return await local_output(argv, error=error, timeout=timeout)
    return await ssh_output(shell.host, shlex.join(argv), error=error, timeout=timeout,
                            **shell.ssh_options())


class NodeShell(msgspec.Struct, frozen=True, kw_only=True):
    """How a telemetry read logs in to its node (the ``ssh_output`` arguments, ready made)."""

    host: str
    port: int = 22
    username: str | None = None
    key_file: str | None = None
    known_hosts_file: str | None = None
    verify_host_key: bool = True

    def ssh_options(self) -> dict[str, Any]:
        known_hosts: KnownHosts = (self.known_hosts_file if self.known_hosts_file
                                   else () if self.verify_host_key else None)
        return {"username": self.username, "port": self.port, "known_hosts": known_hosts,
                "client_keys": [self.key_file] if self.key_file else None}


def failure_reason(exc: BaseException) -> Reason:
    """Why telemetry could not be read, from what caused the error (see probes.checks.remote)."""
    cause = exc.__cause__
    if isinstance(cause, TimeoutError):
        return Reason.TIMEOUT
    if isinstance(cause, ConnectionRefusedError):
        return Reason.REFUSED
    if isinstance(cause, OSError) and cause.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return Reason.NETWORK_UNREACHABLE
    if cause is not None:
        return Reason.PROBE_ERROR  # could not run the command, or SSH refused our key
    return Reason.BAD_RESPONSE  # the node answered, but not with telemetry we can read
