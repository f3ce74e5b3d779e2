"""Run one command on a node over SSH (asyncssh) for node telemetry: stdout, or an error that
says what went wrong. Key-based auth; ``known_hosts`` as asyncssh takes it."""

from __future__ import annotations

import asyncio
from typing import Any


async def ssh_output(host: str, command: str, *, error: type[Exception],
                     username: str | None = None, port: int = 22,
                     known_hosts: str | None = None, client_keys: list[str] | None = None,
                     timeout: float = 10.0) -> str:
    """``command``'s stdout on ``host``; raises ``error`` on timeout, SSH failure or exit != 0."""
    import asyncssh  # noqa: PLC0415 - only remote collection needs it

    options: dict[str, Any] = {"port": port, "known_hosts": known_hosts}
    if username:
        options["username"] = username
    if client_keys is not None:
        options["client_keys"] = client_keys
    try:
        async with asyncio.timeout(timeout):
            async with asyncssh.connect(host, **options) as conn:
                done = await conn.run(command, check=False)
    except TimeoutError:
        raise error(f"ssh {host}: no result in {timeout:g}s") from None
    except (OSError, asyncssh.Error) as exc:
        raise error(f"ssh {host}: {exc}") from None
    if done.exit_status != 0:
        raise error(f"ssh {host}: `{command}` exited {done.exit_status}: "
                    f"{str(done.stderr).strip()[:200]}")
    return str(done.stdout)
