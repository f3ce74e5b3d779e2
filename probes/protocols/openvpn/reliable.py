"""The control channel's reliability layer: message ids, ACKs, in-order delivery, retransmission.

Each control packet (resets included) carries a message id counting from 0; the peer ACKs every
one, duplicates included, so retransmissions stop. Timers are driven by the ``now`` the caller
passes; nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from probes.protocols.openvpn.packet import MAX_ACKS, Opcode

RECEIVE_WINDOW = 12  # TLS_RELIABLE_N_REC_BUFFERS: ids further ahead are dropped, not ACKed
SEND_WINDOW = 6  # TLS_RELIABLE_N_SEND_BUFFERS: most unacknowledged packets in flight


@dataclass(slots=True)
class _Outgoing:
    opcode: Opcode
    payload: bytes
    due: float | None = None  # None: never sent yet
    timeout: float = 0.0
    sends: int = 0


@dataclass(slots=True)
class ReliableSender:
    """Assigns message ids and decides when each unacknowledged packet is (re)sent."""

    initial_timeout: float = 1.0
    max_timeout: float = 8.0
    retransmit: bool = True  # False over TCP: the stream already retransmits
    next_id: int = 0
    _unacked: dict[int, _Outgoing] = field(default_factory=dict)
    retransmissions: int = 0

    def queue(self, opcode: Opcode, payload: bytes) -> int:
        message_id = self.next_id
        self.next_id += 1
        self._unacked[message_id] = _Outgoing(opcode, payload)
        return message_id

    def ack(self, message_ids: tuple[int, ...]) -> None:
        for message_id in message_ids:
            self._unacked.pop(message_id, None)

    def is_acked(self, message_id: int) -> bool:
        return message_id < self.next_id and message_id not in self._unacked

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    @property
    def fewest_sends_unacked(self) -> int:
        """How often the least-tried packet still waiting for an ACK was sent (0: none waits).
        Silence after several sends of every pending packet is the server's doing, not loss."""
        return min((e.sends for e in self._unacked.values() if e.sends), default=0)

    def due(self, now: float) -> list[tuple[int, Opcode, bytes]]:
        """Packets to put on the wire now (first sends within the window, then retransmits)."""
        out: list[tuple[int, Opcode, bytes]] = []
        window_end = min(self._unacked, default=self.next_id) + SEND_WINDOW
        for message_id, entry in sorted(self._unacked.items()):
            if message_id >= window_end:
                break
            if entry.due is None:
                entry.timeout = self.initial_timeout
            elif not self.retransmit or now < entry.due:
                continue
            else:
                entry.timeout = min(entry.timeout * 2, self.max_timeout)
                self.retransmissions += 1
            entry.sends += 1
            entry.due = now + entry.timeout
            out.append((message_id, entry.opcode, entry.payload))
        return out

    def expedite(self, now: float) -> None:
        """Make every packet already sent and still unacknowledged due now (used for the
        last words of a session, where waiting out the backoff would hold the server's
        instance longer)."""
        for entry in self._unacked.values():
            if entry.due is not None:
                entry.due = min(entry.due, now)

    def timer(self) -> float | None:
        if not self.retransmit:
            return None
        dues = [e.due for e in self._unacked.values() if e.due is not None]
        return min(dues, default=None)


@dataclass(slots=True)
class ReliableReceiver:
    """Buffers out-of-order packets, delivers them in order, remembers what to ACK."""

    expected: int = 0
    _buffered: dict[int, tuple[Opcode, bytes]] = field(default_factory=dict)
    _pending_acks: list[int] = field(default_factory=list)

    def receive(self, message_id: int, opcode: Opcode, payload: bytes
                ) -> list[tuple[int, Opcode, bytes]]:
        """Accept one packet; return what is now deliverable in order."""
        if message_id >= self.expected + RECEIVE_WINDOW:
            return []  # beyond our window: the peer will resend it
        if message_id not in self._pending_acks:
            self._pending_acks.append(message_id)
        if message_id >= self.expected:
            self._buffered.setdefault(message_id, (opcode, payload))
        delivered: list[tuple[int, Opcode, bytes]] = []
        while self.expected in self._buffered:
            op, data = self._buffered.pop(self.expected)
            delivered.append((self.expected, op, data))
            self.expected += 1
        return delivered

    @property
    def has_acks(self) -> bool:
        return bool(self._pending_acks)

    def take_acks(self) -> tuple[int, ...]:
        acks = tuple(self._pending_acks[:MAX_ACKS])
        del self._pending_acks[:MAX_ACKS]
        return acks
