"""A client for the HAProxy runtime API over a unix socket, TCP, or SSH (to a remote unix socket).

Every command opens its own connection: in non-interactive mode HAProxy answers one command line
and closes, so there is no session state to get wrong after a balancer restart. Answers are text;
an empty answer means success for the ``set``/``enable``/``disable`` commands we send.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from probes.mesh.publish.base import PermanentError, RetryableError

# admin state bits of `show servers state` (HAProxy's SRV_ADMF_*)
ADMF_FMAINT = 0x01  # forced maintenance (runtime API)
ADMF_IMAINT = 0x02  # inherited from a tracked server
ADMF_CMAINT = 0x04  # "disabled" in the configuration
ADMF_FDRAIN = 0x08  # forced drain (runtime API)
ADMF_IDRAIN = 0x10  # inherited drain
ADMF_RMAINT = 0x20  # DNS resolution failed
ADMF_HMAINT = 0x40  # maintenance because of a hostname change
ADMF_MAINT = ADMF_FMAINT | ADMF_IMAINT | ADMF_CMAINT | ADMF_RMAINT | ADMF_HMAINT
ADMF_DRAIN = ADMF_FDRAIN | ADMF_IDRAIN

OP_STOPPED, OP_STARTING, OP_RUNNING, OP_STOPPING = 0, 1, 2, 3

# answers that mean "your command was wrong", not "try again later"
_REJECTIONS = ("No such", "Require", "Unknown command", "Invalid", "Permission denied",
               "Can't find", "Unsupported", "Backend is using a static LB algorithm")


class RuntimeAPIError(RetryableError):
    """The runtime API could not be reached or answered nothing sensible."""


@dataclass(frozen=True, slots=True)
class ServerState:
    """One row of ``show servers state``."""

    backend: str
    server: str
    op_state: int
    admin_state: int
    user_weight: int
    initial_weight: int

    @property
    def admin(self) -> str:
        """The effective admin state: ``maint`` wins over ``drain`` wins over ``ready``."""
        if self.admin_state & ADMF_MAINT:
            return "maint"
        if self.admin_state & ADMF_DRAIN:
            return "drain"
        return "ready"

    @property
    def in_rotation(self) -> bool:
        """Would HAProxy send a new connection here: running, not in maint, not draining."""
        return self.op_state == OP_RUNNING and self.admin == "ready"


def parse_servers_state(text: str) -> dict[tuple[str, str], ServerState]:
    """Parse ``show servers state`` (format version 1) into rows keyed by (backend, server)."""
    columns: list[str] = []
    rows: dict[tuple[str, str], ServerState] = {}
    for line in text.splitlines():
        if line.startswith("# "):
            columns = line[2:].split()
            continue
        fields = line.split()
        if not columns or len(fields) < len(columns) - 2 or not fields[0].isdigit():
            continue
        row = dict(zip(columns, fields, strict=False))
        try:
            state = ServerState(row["be_name"], row["srv_name"], int(row["srv_op_state"]),
                                int(row["srv_admin_state"]), int(row["srv_uweight"]),
                                int(row["srv_iweight"]))
        except (KeyError, ValueError):
            continue
        rows[(state.backend, state.server)] = state
    return rows


@dataclass(frozen=True, slots=True)
class SSHTarget:
    host: str
    socket: str  # the runtime socket path on the remote host
    port: int = 22
    username: str | None = None
    client_keys: tuple[str, ...] = ()
    known_hosts: str | None = None  # None = asyncssh's default (~/.ssh/known_hosts)


class RuntimeAPI:
    """Send runtime API commands to one HAProxy. Exactly one of the three transports is set."""

    def __init__(self, *, socket_path: str | None = None, address: tuple[str, int] | None = None,
                 ssh: SSHTarget | None = None, timeout: float = 3.0) -> None:
        if sum(x is not None for x in (socket_path, address, ssh)) != 1:
            raise ValueError("set exactly one of socket_path, address, ssh")
        self.socket_path, self.address, self.ssh = socket_path, address, ssh
        self.timeout = timeout
        self._ssh_conn: Any = None

    def describe(self) -> str:
        if self.socket_path:
            return f"unix:{self.socket_path}"
        if self.address:
            return f"tcp:{self.address[0]}:{self.address[1]}"
        assert self.ssh is not None
        return f"ssh:{self.ssh.host}:{self.ssh.socket}"

    async def _open(self) -> tuple[Any, Any]:
        if self.socket_path is not None:
            return await asyncio.open_unix_connection(self.socket_path)
        if self.address is not None:
            return await asyncio.open_connection(*self.address)
        return await self._open_ssh()

    async def _open_ssh(self) -> tuple[Any, Any]:
        # one SSH connection, a direct-streamlocal channel per command (no socat on the far end)
        import asyncssh  # noqa: PLC0415 - optional transport, heavy import

        assert self.ssh is not None
        if self._ssh_conn is None:
            options: dict[str, Any] = {"port": self.ssh.port, "username": self.ssh.username,
                                       "client_keys": list(self.ssh.client_keys) or None}
            if self.ssh.known_hosts is not None:  # else asyncssh's default, ~/.ssh/known_hosts
                options["known_hosts"] = self.ssh.known_hosts
            self._ssh_conn = await asyncssh.connect(self.ssh.host, **options)
        try:
            return await self._ssh_conn.open_unix_connection(self.ssh.socket)  # type: ignore[no-any-return]
        except Exception:
            self._ssh_conn.close()
            self._ssh_conn = None
            raise

    async def command(self, line: str) -> str:
        """Send one command line and return the whole answer, stripped."""
        if "\n" in line:
            raise ValueError("one command per line")
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await self._open()
                try:
                    writer.write(line.encode() + b"\n")
                    await writer.drain()
                    answer: bytes = await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError, EOFError) as exc:
            raise RuntimeAPIError(f"{self.describe()}: {type(exc).__name__}: {exc}") from None
        except Exception as exc:  # asyncssh's errors are not OSErrors
            raise RuntimeAPIError(f"{self.describe()}: {type(exc).__name__}: {exc}") from None
        text = answer.decode(errors="replace") if isinstance(answer, bytes) else str(answer)
        return text.strip()

    async def set_command(self, line: str) -> None:
        """A command that answers nothing on success; an answer is the reason it failed."""
        answer = await self.command(line)
        if not answer:
            return
        if answer.startswith(_REJECTIONS):
            raise PermanentError(f"{line!r}: {answer}")
        raise RuntimeAPIError(f"{line!r}: {answer}")

    async def servers_state(self, backend: str | None = None) -> dict[tuple[str, str], ServerState]:
        answer = await self.command("show servers state" + (f" {backend}" if backend else ""))
        if "# be_id" not in answer:
            if answer.startswith(_REJECTIONS) or "Can't find backend" in answer:
                raise PermanentError(f"show servers state: {answer[:200]}")
            raise RuntimeAPIError(f"show servers state: unexpected answer {answer[:200]!r}")
        return parse_servers_state(answer)

    async def close(self) -> None:
        if self._ssh_conn is not None:
            self._ssh_conn.close()
            self._ssh_conn = None
