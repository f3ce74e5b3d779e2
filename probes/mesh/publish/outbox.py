"""What the delivery loop reads: the mesh store's verdict log, seen as a per-publisher outbox.

The mesh's store is the outbox (its verdict log doubles as one; each publisher keeps its own
acknowledged position), reached through :class:`probes.mesh.storethread.StoreOutbox` so reads and
acknowledgements run on the store's thread, never on the event loop: the contract is
asynchronous. :class:`MemoryOutbox` is the same contract in memory, for tests and for a receiver
that feeds a local publisher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec

from probes.model import Verdict


class OutboxEntry(Protocol):
    """One verdict log entry (``probes.mesh.store.StoredVerdict`` is one)."""

    @property
    def id(self) -> int:
        """Position in the verdict log: increases with every verdict change."""
        ...

    @property
    def verdict(self) -> Verdict: ...


class Entry(msgspec.Struct, frozen=True):
    id: int
    verdict: Verdict


class Outbox(Protocol):
    async def outbox(self, publisher: str, limit: int = 100) -> Sequence[OutboxEntry]:
        """Verdicts ``publisher`` has not acknowledged yet, oldest first."""
        ...

    async def ack(self, publisher: str, position: int) -> None:
        """``publisher`` delivered (or dead-lettered) everything up to log id ``position``."""
        ...

    async def node_verdicts(self) -> dict[str, Verdict]:
        """The latest verdict per node (what reconcile converges to)."""
        ...


class MemoryOutbox:
    """An in-memory verdict log with per-publisher positions."""

    def __init__(self) -> None:
        self.log: list[Entry] = []
        self.positions: dict[str, int] = {}

    def append(self, verdict: Verdict) -> int:
        position = len(self.log) + 1
        self.log.append(Entry(position, verdict))
        return position

    async def outbox(self, publisher: str, limit: int = 100) -> list[Entry]:
        after = self.positions.get(publisher, 0)
        return self.log[after : after + limit]

    async def ack(self, publisher: str, position: int) -> None:
        self.positions[publisher] = max(self.positions.get(publisher, 0), position)

    async def node_verdicts(self) -> dict[str, Verdict]:
        latest: dict[str, Verdict] = {}
        for entry in self.log:
            latest[entry.verdict.node] = entry.verdict
        return latest
