"""A load in a process of its own beside a timed client (the benchmarks of the mesh)."""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any


class Beside:
    """A load (the attacker, heavy ingest) in a process of its own beside the timed agents, so
    its work never delays the timing loop: ``target(*args, ready, stop, report)`` sets ``ready``
    once its load is under way, runs until ``stop`` is set on leaving the block, then puts what
    it did on ``report``."""

    def __init__(self, target: Any, *args: Any) -> None:
        context = multiprocessing.get_context("fork")
        self.ready = context.Event()
        self.stop = context.Event()
        self.report: Any = context.Queue()
        self.proc = context.Process(target=target,
                                    args=(*args, self.ready, self.stop, self.report))

    def __enter__(self) -> Beside:
        self.proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()

    async def under_way(self, timeout: float = 120.0) -> None:
        assert await asyncio.to_thread(self.ready.wait, timeout), "the load never started"

    async def result(self) -> Any:
        got = await asyncio.to_thread(self.report.get, True, 60)
        await asyncio.to_thread(self.proc.join, 30)
        return got
