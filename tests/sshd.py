"""An in-process SSH server for tests (sshd is not installed here).

It runs every command it is given for real, with ``sh -c`` (inside a lab namespace when one is
named), returns stdout, stderr and the exit status, and records the commands. Authentication:
none, or public-key against one client key. Use :func:`command_server` inside a running event
loop, or :class:`ThreadedCommandServer` when the code under test runs its own loop
(``asyncio.run`` in a CLI).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncssh


@dataclass
class CommandServer:
    port: int = 0
    commands: list[str] = field(default_factory=list)


def _server_class(client_key: asyncssh.SSHKey | None) -> type[asyncssh.SSHServer]:
    class Server(asyncssh.SSHServer):  # type: ignore[misc]
        def begin_auth(self, username: str) -> bool:
            return client_key is not None  # False: no authentication (loopback, tests only)

        def public_key_auth_supported(self) -> bool:
            return True

        def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
            return client_key is not None and bool(key.public_data == client_key.public_data)

    return Server


def _handler(state: CommandServer, namespace: str | None) -> Any:
    async def handle(process: Any) -> None:
        command = str(process.command or "")
        state.commands.append(command)
        data = await process.stdin.read() if "/dev/stdin" in command else ""
        argv = ["sh", "-c", command]
        if namespace is not None:
            argv = ["ip", "netns", "exec", namespace, *argv]
        done = await asyncio.to_thread(subprocess.run, argv, input=data, capture_output=True,
                                       text=True, check=False)
        process.stdout.write(done.stdout)
        process.stderr.write(done.stderr)
        process.exit(done.returncode)

    return handle


@contextlib.asynccontextmanager
async def command_server(*, client_key: asyncssh.SSHKey | None = None,
                         namespace: str | None = None) -> AsyncIterator[CommandServer]:
    state = CommandServer()
    server = await asyncssh.create_server(
        _server_class(client_key), "127.0.0.1", 0, process_factory=_handler(state, namespace),
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")])
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


class ThreadedCommandServer:
    """The same server on its own event loop in a thread; ``close()`` when done."""

    def __init__(self, *, client_key: asyncssh.SSHKey | None = None,
                 namespace: str | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        ready = threading.Event()
        self.state = CommandServer()

        async def serve() -> None:
            async with command_server(client_key=client_key, namespace=namespace) as state:
                self.state = state
                self._stop = asyncio.Event()
                ready.set()
                await self._stop.wait()

        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(serve(),),
                                        daemon=True)
        self._thread.start()
        assert ready.wait(10), "test SSH server did not start"

    @property
    def port(self) -> int:
        return self.state.port

    @property
    def commands(self) -> list[str]:
        return self.state.commands

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)
        self._loop.close()
