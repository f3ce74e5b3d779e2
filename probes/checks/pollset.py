"""Many probe sockets waited on at once: one epoll set that the loop watches as one reader, and
one loop timer for all their deadlines.

Why not ``loop.add_writer`` and ``loop.call_later`` per probe: on uvloop each ``add_writer``
makes a poll handle whose set-up and tear-down cost six ``epoll_ctl`` calls (three of them
failing) and an ``ioctl`` per socket, and each ``call_later`` a timer handle. At 2,000 TCP
probes a second that was more system calls than the probe's own (socket, connect, close).
Here a socket costs one ``epoll_ctl`` (``EPOLLONESHOT``: closing the socket drops it from the
set, no second call), every socket ready at the same loop turn is read with one
``epoll_wait``, and the deadlines sit in a heap under one loop timer.

A waiter whose ``ready`` or ``expired`` raises is told :meth:`Waiter.broken`: the run ends as a
probe error (as a check's coroutine that raises does), and the other waiters of that turn are
still told.

A deadline is kept (not cancelled) when its socket is answered first: it is skipped when it
comes up, and holds no reference to the run meanwhile (a second of finished runs would stay in
memory otherwise, thousands at full rate). A timer fires at the earliest deadline plus
``_GRAIN``, so a run never ends before its deadline (the loop's timers round to milliseconds).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import select
import time
import weakref
from typing import Protocol

_GRAIN = 0.001  # the loop's timer resolution: a deadline is never taken before it is reached
_MAX_EVENTS = 1024  # per epoll_wait; more ready sockets are read at the next loop turn


class Waiter(Protocol):
    """What waits on a socket: told once, either that the socket is ready or that its deadline
    passed first (and nothing at all after :meth:`PollSet.forget`)."""

    def ready(self, events: int) -> None: ...

    def expired(self) -> None: ...

    def broken(self, exc: Exception) -> None:
        """``ready`` or ``expired`` raised (a bug): end the run with a probe error, so that
        its caller is told and no slot of the agent waits on it for ever."""


class PollSet:
    """The sockets of one event loop that wait for readiness within a deadline."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop_ref = weakref.ref(loop)  # the loop holds this set (its reader), not back
        self._epoll = select.epoll()
        self._waiting: dict[int, tuple[int, Waiter]] = {}  # fd -> (its watch's number, waiter)
        self._deadlines: list[tuple[float, int, int]] = []  # (deadline, watch number, fd)
        self._serial = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        loop.add_reader(self._epoll.fileno(), self._ready)

    def __len__(self) -> int:
        return len(self._waiting)

    def watch(self, fd: int, events: int, waiter: Waiter, deadline: float) -> None:
        """Tell ``waiter`` when ``fd`` has one of ``events`` (``select.EPOLL*``), or that the
        monotonic ``deadline`` passed first. The caller closes the socket after either (that
        also takes it out of the epoll set)."""
        self._epoll.register(fd, events | select.EPOLLONESHOT)
        self._add(fd, waiter, deadline)

    def rewatch(self, fd: int, events: int, waiter: Waiter, deadline: float) -> None:
        """Wait on ``fd`` again (a readiness that came to nothing), from :meth:`Waiter.ready`."""
        self._epoll.modify(fd, events | select.EPOLLONESHOT)
        self._add(fd, waiter, deadline)

    def _add(self, fd: int, waiter: Waiter, deadline: float) -> None:
        serial = next(self._serial)
        self._waiting[fd] = (serial, waiter)
        heapq.heappush(self._deadlines, (deadline, serial, fd))
        if deadline < self._timer_at:
            self._arm(deadline)

    def forget(self, fd: int) -> None:
        """Stop waiting on ``fd`` (a cancelled run): its waiter hears nothing more."""
        self._waiting.pop(fd, None)

    def _ready(self) -> None:
        events = self._epoll.poll(0, _MAX_EVENTS)
        waiting = self._waiting
        # waiters first, then their calls: a waiter's callback may close its socket and start
        # another run that gets the same fd number, which must not take this turn's event
        ready = [(waiting.pop(fd, None), ev) for fd, ev in events]
        for entry, ev in ready:
            if entry is not None:
                try:
                    entry[1].ready(ev)
                except Exception as exc:  # the other waiters of this turn are still told
                    entry[1].broken(exc)

    def _arm(self, deadline: float) -> None:
        loop = self._loop_ref()
        if loop is None or loop.is_closed():
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = loop.call_later(max(deadline - time.monotonic(), 0.0) + _GRAIN,
                                      self._expire)

    def _expire(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        now = time.monotonic()
        heap, waiting = self._deadlines, self._waiting
        while heap and heap[0][0] <= now:
            _, serial, fd = heapq.heappop(heap)
            entry = waiting.get(fd)
            if entry is not None and entry[0] == serial:
                del waiting[fd]
                try:
                    entry[1].expired()
                except Exception as exc:  # as in _ready: the heap goes on, the timer is re-armed
                    entry[1].broken(exc)
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)  # answered or forgotten: nothing to wait for
        if heap:
            self._arm(heap[0][0])

    def _live(self, deadline: tuple[float, int, int]) -> bool:
        entry = self._waiting.get(deadline[2])
        return entry is not None and entry[0] == deadline[1]


_SETS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PollSet] = (
    weakref.WeakKeyDictionary())


def poll_set() -> PollSet:
    """The running loop's :class:`PollSet` (made at its first use)."""
    loop = asyncio.get_running_loop()
    found = _SETS.get(loop)
    if found is None:
        found = _SETS[loop] = PollSet(loop)
    return found
