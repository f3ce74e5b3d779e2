"""The store, off the event loop: every call to it runs on one thread of its own.

SQLite commits, journal pruning and reads stall for milliseconds to hundreds of milliseconds (a
prune after a snapshot took 200 ms, a commit 114 ms); done on the event loop, every request in
flight waited for them (a low-rate client saw p99 of 77-316 ms under load). One thread keeps
the store's calls in order and its connection to itself; the loop awaits the result and serves
other requests meanwhile (SQLite releases the GIL while it waits on the disk).

:class:`StoreOutbox` is the store as the publishers' outbox, through the same thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from probes.mesh.store import MeshStore, StoredVerdict
from probes.model import Verdict

T = TypeVar("T")


class StoreThread:
    """One worker thread; :meth:`call` runs a function there and awaits its result."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-store")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(fn, *args))

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` there and wait, from a thread without an event loop (start-up, tests)."""
        return self._executor.submit(fn, *args).result()

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class StoreOutbox:
    """The verdict log as the publishers' outbox, read and acknowledged on the store thread."""

    def __init__(self, store: MeshStore, thread: StoreThread) -> None:
        self.store = store
        self.thread = thread

    async def outbox(self, publisher: str, limit: int = 100) -> Sequence[StoredVerdict]:
        return await self.thread.call(self.store.outbox, publisher, limit)

    async def ack(self, publisher: str, position: int) -> None:
        await self.thread.call(self.store.ack, publisher, position)

    async def node_verdicts(self) -> dict[str, Verdict]:
        return await self.thread.call(self.store.node_verdicts)
