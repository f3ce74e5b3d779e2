"""The order in which waiting engine inputs take their turn: small batches pass heavy ones.

Inputs are applied and committed one at a time. With a plain lock they take turns in arrival
order, so a 20-observation batch that arrives behind four 2,000-observation batches waits for all
four to be decoded, applied and committed: a low-rate agent beside heavy ingest saw p99 of
201.6 ms against 6.6 ms on an idle mesh.

Here each input waits with a deadline, ``arrival + size x ALLOWANCE_SECONDS_PER_OBSERVATION``,
and the waiting input with the earliest deadline goes next (earliest deadline first). A
2,000-observation batch may be passed by inputs that arrive within 200 ms after it, never later,
so nothing waits forever; ticks and operator actions (size 0) go at their arrival. A batch is
decoded in its turn (:meth:`MeshService.accept_body`), so the order covers its decoding too.
One source's inputs never pass each other (their deadlines are made non-decreasing): an agent's
batch_seq order is kept, and a later batch cannot make an earlier one a replay.

The order only decides which input is applied next: each is still applied, journaled and
committed whole, once, and verdicts are published in commit order, which the journal records (a
restart or ``mesh replay`` applies them in that same order).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable

# what an observation of a waiting batch adds to its deadline. A heavy batch's turn (apply, then
# commit on the store thread) took ~20 ms on a loaded machine: with 10 us per observation (20 ms
# for 2,000) heavy batches queued that long were already due, and a light agent beside them still
# waited for each (p50 58 ms, p99 211 ms); 100 us lets small inputs pass a queue of heavy ones
ALLOWANCE_SECONDS_PER_OBSERVATION = 100e-6


class InputQueue:
    """A lock whose waiters take their turn by deadline (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._held = False
        self._waiting: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        # per source: the latest deadline given to an input still waiting or running
        self._last_deadline: dict[str, float] = {}
        self._pending: dict[str, int] = {}
        self.passed_total = 0  # inputs that went ahead of one that arrived before them

    @property
    def waiting(self) -> int:
        return sum(1 for *_, fut in self._waiting if not fut.done())

    @contextlib.asynccontextmanager
    async def turn(self, source: str = "", size: int = 0) -> AsyncIterator[None]:
        """Hold the turn of an input from ``source`` with ``size`` observations."""
        deadline = self._clock() + size * ALLOWANCE_SECONDS_PER_OBSERVATION
        if source:
            deadline = max(deadline, self._last_deadline.get(source, deadline))
            self._last_deadline[source] = deadline
            self._pending[source] = self._pending.get(source, 0) + 1
        try:
            await self._acquire(deadline)
            try:
                yield
            finally:
                self._release()
        finally:
            if source:
                left = self._pending[source] - 1
                if left:
                    self._pending[source] = left
                else:
                    del self._pending[source]
                    del self._last_deadline[source]

    async def _acquire(self, deadline: float) -> None:
        if not self._held and not self._waiting:
            self._held = True
            return
        order = next(self._order)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (deadline, order, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # the turn was handed over just as the waiter gave up
            raise
        if any(o < order for _, o, f in self._waiting if not f.done()):
            self.passed_total += 1

    def _release(self) -> None:
        """Hand the turn to the waiter with the earliest deadline, or free it."""
        while self._waiting:
            _, _, fut = heapq.heappop(self._waiting)
            if not fut.done():  # a cancelled waiter's future is done: skipped
                fut.set_result(None)
                return
        self._held = False
