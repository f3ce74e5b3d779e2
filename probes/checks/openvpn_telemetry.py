"""OpenVPN node telemetry from the management interface: ``status 3`` and ``load-stats``.

What a node says about itself (connected clients, bytes) complements what probes see from outside;
it also shows whether probe sessions linger (a probe that forgot EXIT holds a pool address until
ping-restart). Read it from the management unix socket on the node, or over SSH with asyncssh,
where the same commands go through ``socat`` on the node.

The parsers are pure and raise only :class:`TelemetryError` on malformed text.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from dataclasses import dataclass, field

from probes.checks.remote import NodeShell, TelemetryError, ssh_output

_LOAD_STATS = re.compile(r"SUCCESS: nclients=(\d+),bytesin=(\d+),bytesout=(\d+)")


@dataclass(frozen=True, slots=True)
class ClientRow:
    common_name: str
    real_address: str
    virtual_address: str
    bytes_received: int
    bytes_sent: int
    connected_since: int  # Unix seconds
    cipher: str = ""


@dataclass(frozen=True, slots=True)
class LoadStats:
    clients: int
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True, slots=True)
class StatusReport:
    title: str = ""
    time: int = 0
    clients: tuple[ClientRow, ...] = ()
    routes: int = 0
    global_stats: dict[str, str] = field(default_factory=dict)

    def clients_named(self, prefix: str) -> list[ClientRow]:
        return [c for c in self.clients if c.common_name.startswith(prefix)]


@dataclass(frozen=True, slots=True)
class Telemetry:
    status: StatusReport
    load: LoadStats | None


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise TelemetryError(f"{what} is not an integer: {text[:40]!r}") from None


def parse_status_v3(text: str) -> StatusReport:
    """Parse ``status 3`` output (tab-separated, the same as a ``--status-version 3`` file)."""
    headers: dict[str, list[str]] = {}
    title, when, routes = "", 0, 0
    clients: list[ClientRow] = []
    stats: dict[str, str] = {}
    ended = False
    for line in text.splitlines():
        fields = line.rstrip("\r").split("\t")
        kind = fields[0]
        if kind == "END":
            ended = True
            break
        if kind == "TITLE" and len(fields) > 1:
            title = fields[1]
        elif kind == "TIME" and len(fields) > 2:
            when = _int(fields[2], "TIME")
        elif kind == "HEADER" and len(fields) > 2:
            headers[fields[1]] = fields[2:]
        elif kind == "CLIENT_LIST":
            clients.append(_client_row(fields[1:], headers.get("CLIENT_LIST")))
        elif kind == "ROUTING_TABLE":
            routes += 1
        elif kind == "GLOBAL_STATS" and len(fields) > 2:
            stats[fields[1]] = fields[2]
    if not ended:
        raise TelemetryError("status output has no END line (truncated or not status 3)")
    return StatusReport(title, when, tuple(clients), routes, stats)


def _client_row(values: list[str], header: list[str] | None) -> ClientRow:
    if header is None:
        raise TelemetryError("CLIENT_LIST before its HEADER line")
    row = dict(zip(header, values, strict=False))
    try:
        return ClientRow(
            common_name=row["Common Name"], real_address=row["Real Address"],
            virtual_address=row.get("Virtual Address", ""),
            bytes_received=_int(row["Bytes Received"], "Bytes Received"),
            bytes_sent=_int(row["Bytes Sent"], "Bytes Sent"),
            connected_since=_int(row.get("Connected Since (time_t)", "0") or "0",
                                 "Connected Since (time_t)"),
            cipher=row.get("Data Channel Cipher", ""))
    except KeyError as exc:
        raise TelemetryError(f"CLIENT_LIST row lacks {exc.args[0]!r}") from None


def parse_load_stats(text: str) -> LoadStats:
    match = _LOAD_STATS.search(text)
    if match is None:
        raise TelemetryError("no 'SUCCESS: nclients=...' line in load-stats output")
    return LoadStats(*(int(g) for g in match.groups()))


def parse_management_output(text: str) -> Telemetry:
    """``status 3`` then ``load-stats`` output in one string (greeting lines are skipped)."""
    start = text.find("TITLE\t")
    if start < 0:
        raise TelemetryError("no status 3 output (missing TITLE line)")
    status = parse_status_v3(text[start:])
    rest = text[text.find("\nEND", start):]
    load = parse_load_stats(rest) if "SUCCESS: nclients=" in rest else None
    return Telemetry(status, load)


async def _read_until(reader: asyncio.StreamReader, done: re.Pattern[str]) -> str:
    lines: list[str] = []
    while True:
        raw = await reader.readline()
        if not raw:
            raise TelemetryError("management interface closed the connection mid-answer")
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith(">"):
            continue  # real-time notification (>INFO, >CLIENT...), not part of the answer
        lines.append(line)
        if done.match(line):
            return "\n".join(lines) + "\n"


_STATUS_DONE = re.compile(r"^(END|ERROR:.*)$")
_LOAD_DONE = re.compile(r"^(SUCCESS: nclients=.*|ERROR:.*)$")


async def read_management_socket(path: str, timeout: float = 2.0) -> Telemetry:
    """Ask a local management unix socket for ``status 3`` and ``load-stats``, one command at a
    time: the interface drops queued input it has not read yet when it answers."""
    async def exchange() -> str:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(b"status 3\n")
            status = await _read_until(reader, _STATUS_DONE)
            writer.write(b"load-stats\n")
            load = await _read_until(reader, _LOAD_DONE)
            writer.write(b"quit\n")
            return status + load
        finally:
            writer.close()

    try:
        text = await asyncio.wait_for(exchange(), timeout)
    except TimeoutError as exc:
        raise TelemetryError(f"management interface {path} did not answer in {timeout:g}s"
                             ) from exc
    except OSError as exc:
        raise TelemetryError(f"management interface {path}: {exc.strerror or exc}") from exc
    return parse_management_output(text)


def ssh_command(socket_path: str) -> str:
    """The remote command that feeds the management socket one command at a time (it drops
    input queued behind a command it is answering)."""
    path = shlex.quote(socket_path)
    return (f"(printf 'status 3\\n'; sleep 0.3; printf 'load-stats\\n'; sleep 0.3; "
            f"printf 'quit\\n') | socat -t 2 - UNIX-CONNECT:{path}")


async def read_management(path: str, shell: NodeShell | None, timeout: float) -> Telemetry:
    """The management socket here (``shell`` None), or on the node over SSH (needs ``socat``
    there)."""
    if shell is None:
        return await read_management_socket(path, timeout)
    return parse_management_output(await ssh_output(
        shell.host, ssh_command(path), error=TelemetryError, timeout=timeout,
        **shell.ssh_options()))
