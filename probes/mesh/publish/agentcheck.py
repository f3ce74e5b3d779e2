"""HAProxy agent-check responder: HAProxy pulls each node's state and weight from the mesh.

With ``agent-check agent-addr <mesh> agent-port <port> agent-send "<node>\\n"`` on a server
line, HAProxy connects every ``agent-inter``, sends the node's name and reads one line back
(HAProxy's "agent check" protocol, configuration.txt 5.2). The answer, from the node's published
verdict and weight (docs/weights.md):

=============  ==========================  ============================================
verdict        answer                      HAProxy does
=============  ==========================  ============================================
UP, DEGRADED   ``up ready <weight>%``      operational up, admin ready, weight set
DRAINING       ``drain``                   no new connections, existing ones stay
MAINTENANCE    ``maint``                   out of rotation
DOWN           ``down``                    operational down
UNKNOWN        (an empty line)             nothing changes
=============  ==========================  ============================================

With weights off the weight is 100 % (UP) or ``degraded_weight_percent`` (DEGRADED). An unknown
node name is answered with an empty line and counted, never guessed at.

This is the pull side of the HAProxy integration; the runtime API publisher is the push side.
Use one of them per server: both would set the same weight twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from probes.model import VerdictState

log = logging.getLogger(__name__)

# what the mesh knows of a node: its published state and weight (None: weights off)
NodeStatus = Callable[[str], tuple[VerdictState, int | None] | None]
READ_TIMEOUT = 2.0
MAX_LINE = 256


def agent_reply(state: VerdictState, weight: int | None, degraded_percent: int = 50) -> str:
    """The agent-check answer line (without its newline) for a node's state and weight."""
    if state in (VerdictState.UP, VerdictState.DEGRADED):
        if weight is None:
            weight = degraded_percent if state == VerdictState.DEGRADED else 100
        return f"up ready {weight}%"
    if state == VerdictState.DRAINING:
        return "drain"
    if state == VerdictState.MAINTENANCE:
        return "maint"
    if state == VerdictState.DOWN:
        return "down"
    return ""


class AgentCheckServer:
    """A TCP listener answering HAProxy's agent checks from the mesh's live state."""

    def __init__(self, status: NodeStatus, *, servers: Mapping[str, str] | None = None,
                 degraded_weight_percent: int = 50) -> None:
        self.status = status
        self.servers = dict(servers or {})  # what HAProxy sends -> node id (default: itself)
        self.degraded_weight_percent = degraded_weight_percent
        self.answered: dict[str, int] = {"ok": 0, "unknown": 0, "bad": 0}
        self._server: asyncio.Server | None = None

    def answer(self, line: str) -> str:
        name = line.strip()
        node = self.servers.get(name, name)
        found = self.status(node) if node else None
        if found is None:
            self.answered["unknown" if node else "bad"] += 1
            return ""
        self.answered["ok"] += 1
        return agent_reply(found[0], found[1], self.degraded_weight_percent)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            raw = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            text = raw[:MAX_LINE].decode("ascii", "replace")
            writer.write((self.answer(text) + "\n").encode())
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            self.answered["bad"] += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port (useful with port 0)."""
        self._server = await asyncio.start_server(self._handle, host, port)
        bound: int = self._server.sockets[0].getsockname()[1]
        log.info("agent-check responder on %s:%d", host, bound)
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
