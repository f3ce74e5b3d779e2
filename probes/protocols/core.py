"""The one contract every sans-I/O protocol core keeps (the aioquic ``QuicConnection`` style).

A core owns a protocol's state and nothing else: no sockets, no clocks, no tasks. It is driven by
five verbs and read through events:

* ``start(now)`` — begin: queue the first datagram(s);
* ``receive_datagram(data, addr, now)`` — one datagram from ``addr`` arrived at ``now``;
* ``datagrams_to_send(now)`` — what to send now, as ``(data, addr)`` pairs;
* ``get_timer()`` / ``handle_timer(now)`` — the next instant the core wants to act (a
  retransmission), and acting on it;
* ``next_event()`` — what happened, in order; ``None`` when nothing is left.

Bad input never raises out of a core: a datagram it cannot use (malformed, not authentic, not
for us) becomes a :class:`BadDatagram` event carrying why, and the check decides what that means
(a failed check with a reason, or noise it counts). :mod:`probes.checks.driver` pumps any core
over real sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

Address = tuple[str, int]  # (host, port) of the remote end a datagram came from or goes to

E_co = TypeVar("E_co", covariant=True)


@dataclass(frozen=True, slots=True)
class BadDatagram:
    """A datagram the core could not use, and why (never an exception)."""

    detail: str


class Core(Protocol[E_co]):
    """The verbs of every protocol core; ``E_co`` is its event type."""

    def start(self, now: float) -> None: ...

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None: ...

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]: ...

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...

    def next_event(self) -> E_co | None: ...
