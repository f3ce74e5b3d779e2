"""Reconnects seen in successive views of a node's sessions (pure; no clocks, no I/O).

Each telemetry run yields a view: client id -> session identity, for the sessions active now.
A client that was active before and is active again after a gap, or whose session identity
changed between two views (the old session ended and a new one began in between), counts as one
reconnect. A client seen for the first time does not: a first connection is not a reconnect, and
an agent that starts (or restarts) must not count every existing session.

What the id and identity are is the caller's choice per protocol: OpenVPN's common name and the
session's ``connected since`` + real address; WireGuard's peer key and a constant (a peer's
session is its run of recent handshakes, so only "gone, then back" is visible).
"""

from __future__ import annotations

from collections.abc import Mapping

# clients remembered after they leave; beyond it the longest-gone are forgotten (their next
# connection then counts as a first one)
DEFAULT_MEMORY = 100_000


class ReconnectCounter:
    def __init__(self, memory: int = DEFAULT_MEMORY) -> None:
        if memory < 1:
            raise ValueError("memory must be >= 1")
        self.memory = memory
        self.total = 0  # reconnects since this counter began
        self._identity: dict[str, str] = {}  # client -> last session identity, oldest first
        self._active: frozenset[str] = frozenset()

    def observe(self, sessions: Mapping[str, str]) -> int:
        """Take one view; returns the reconnects it reveals (also added to :attr:`total`)."""
        found = 0
        for client, identity in sessions.items():
            before = self._identity.pop(client, None)
            if before is not None and (before != identity or client not in self._active):
                found += 1
            self._identity[client] = identity  # re-inserted: now the most recently seen
        while len(self._identity) > self.memory:
            del self._identity[next(iter(self._identity))]
        self._active = frozenset(sessions)
        self.total += found
        return found

    @property
    def remembered(self) -> int:
        return len(self._identity)
