"""The order in which waiting engine inputs take their turn: light inputs first, bulk fairly.

Inputs are applied and committed one at a time. With a plain lock they took turns in arrival
order, so a 20-observation batch that arrived behind four 2,000-observation batches waited for
all four (p99 201.6 ms against 6.6 ms idle). Ordered by a deadline (arrival plus 100 us per
observation) it passed heavy batches that arrived shortly before it, but once the mesh's core
was nearly full, heavy batches that had waited longer than their allowance were all due first,
and a verdict-changing request waited behind every one of them (decision p99 93-128 ms at 80 %
of the maximum ingest rate, against 3-8 ms idle).

Now each waiting input is in one of three classes, and the class decides before arrival does:

1. **control**: ticks, operator actions, store recovery (no source): in arrival order, first.
2. **light**: a batch from a source whose waiting inputs add up to at most
   ``LIGHT_OBSERVATIONS``: a low-rate agent, or a verdict-changing request.
3. **bulk**: every other batch.

Within a class the sources take turns: only each source's oldest waiting input is a candidate,
so a source's inputs never pass each other (an agent's ``batch_seq`` order is kept, and a later
batch cannot make an earlier one a replay), and one agent with many batches queued gets one turn
per round, never all of them before another agent's single batch.

Light inputs go ahead of waiting bulk ones only up to ``LIGHT_CREDIT`` observations' worth of
work (each input counts its size plus ``INPUT_COST`` for its fixed cost); then the oldest bulk
input's source goes, and the credit is full again. So a light input waits for at most the turn
in progress and one bulk turn, while any number of light sources (or one agent cutting its
batches small) get at most about half of the mesh when bulk waits, never all of it: nothing
waits forever. The turn in progress is never interrupted.

The order only decides which input is applied next: each is still applied, journaled and
committed whole, once, and verdicts are published in commit order, which the journal records (a
restart or ``mesh replay`` applies them in that same order).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

# a source with at most this many observations waiting is light: a low-rate agent's batch, or
# one that changes a verdict (a few observations); 2,000-observation batches are bulk
LIGHT_OBSERVATIONS = 250
# the fixed cost of an input (HTTP request, commit, answer) in observations' worth of work:
# ~150 us against ~2 us an observation
INPUT_COST = 75
# how much light work may pass waiting bulk inputs before one of them goes: about one bulk
# batch, so bulk keeps at least half of the mesh under any flood of light inputs
LIGHT_CREDIT = 2_000

CONTROL, LIGHT, BULK = 0, 1, 2


@dataclass(eq=False, slots=True)
class _Waiter:
    source: str
    size: int
    arrival: int  # arrival order, over all sources
    future: asyncio.Future[None]


class InputQueue:
    """A lock whose waiters take their turn by class, then round-robin over sources (see the
    module docstring)."""

    def __init__(self) -> None:
        self._held = False
        self._sources: dict[str, deque[_Waiter]] = {}  # waiting inputs per source, oldest first
        self._pending: dict[str, int] = {}  # observations waiting per source
        # the candidates (each source's oldest waiting input) per class: (order, waiter), where
        # order counts when it became its source's candidate: round-robin over sources
        self._candidates: tuple[list[tuple[int, _Waiter]], ...] = ([], [], [])
        self._order = itertools.count()
        self._credit = LIGHT_CREDIT
        self.passed_total = 0  # inputs that went ahead of one that arrived before them

    @property
    def waiting(self) -> int:
        return sum(not w.future.done() for queue in self._sources.values() for w in queue)

    @contextlib.asynccontextmanager
    async def turn(self, source: str = "", size: int = 0) -> AsyncIterator[None]:
        """Hold the turn of an input from ``source`` (none: a control input) with ``size``
        observations."""
        await self.acquire(source, size)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, source: str = "", size: int = 0) -> None:
        """Wait for the turn (see :meth:`turn`); the holder then calls :meth:`release` once,
        from whichever task."""
        if not self._held and not self._sources:
            self._held = True
            return
        waiter = _Waiter(source, size, next(self._order),
                         asyncio.get_running_loop().create_future())
        queue = self._sources.setdefault(source, deque())
        queue.append(waiter)
        self._pending[source] = self._pending.get(source, 0) + size
        if len(queue) == 1:
            self._nominate(waiter)
        if not self._held:  # only waiters that gave up were in the way
            self.release()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # the turn was handed over just as the waiter gave up
            else:
                self._forget(waiter)
                if not self._held:  # it was passed over while giving up: the next one goes
                    self.release()
            raise

    def _nominate(self, waiter: _Waiter) -> None:
        """Make ``waiter`` (its source's oldest) a candidate in its class."""
        if not waiter.source:
            kind = CONTROL
        elif self._pending[waiter.source] <= LIGHT_OBSERVATIONS:
            kind = LIGHT
        else:
            kind = BULK
        heapq.heappush(self._candidates[kind], (next(self._order), waiter))

    def _forget(self, waiter: _Waiter) -> None:
        """A waiter that gave up: out of its source's queue (a candidate is skipped when met)."""
        queue = self._sources[waiter.source]
        was_oldest = queue[0] is waiter
        queue.remove(waiter)
        self._left(waiter)
        if was_oldest and queue:
            self._nominate(queue[0])

    def _left(self, waiter: _Waiter) -> None:
        source = waiter.source
        self._pending[source] -= waiter.size
        if not self._sources[source]:
            del self._sources[source]
            del self._pending[source]

    def _next(self) -> _Waiter | None:
        """The candidate whose turn it is (removed from its class), or None."""
        control, light, bulk = self._candidates
        for heap in self._candidates:  # drop the candidates that gave up
            while heap and heap[0][1].future.done():
                heapq.heappop(heap)
        if control:
            return heapq.heappop(control)[1]
        if light and (self._credit > 0 or not bulk):
            waiter = heapq.heappop(light)[1]
            if bulk:
                self._credit -= waiter.size + INPUT_COST
            return waiter
        if bulk:
            self._credit = LIGHT_CREDIT
            return heapq.heappop(bulk)[1]
        return None

    def release(self) -> None:
        """Hand the turn to the next waiter (see the module docstring), or free it."""
        waiter = self._next()
        if waiter is None:
            self._held = False
            return
        self._held = True
        queue = self._sources[waiter.source]
        queue.popleft()
        self._left(waiter)
        if queue:
            self._nominate(queue[0])
        if any(q[0].arrival < waiter.arrival for q in self._sources.values()):
            self.passed_total += 1
        waiter.future.set_result(None)
