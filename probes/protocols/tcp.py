"""A minimal user-space TCP client for one short exchange inside a tunnel (docs/probes/
user-path.md, "TCP transaction"). Sans-I/O: inner IPv4 packets in, inner IPv4 packets out,
``now`` passed in, events out.

It is what a check needs to open one connection through a tunnel the agent has no kernel
interface for (the agent speaks WireGuard, OpenVPN and ESP itself), say a few hundred bytes (a
TLS ClientHello, an HTTP HEAD), read the answer and leave:

* a three-way handshake with an MSS option (small enough for the tunnel's inner MTU);
* data in order: a segment at ``rcv_nxt`` is taken (its new part, when it overlaps what we
  have), anything later is dropped and answered with a duplicate ACK, so the sender resends;
  every segment that carries data or a FIN is acknowledged at once (no delayed ACKs);
* what we send is kept until acknowledged and resent from the oldest unacknowledged byte when
  the retransmission timer runs out (go-back-N, the timer doubling each time), at most
  ``max_sends`` times per segment, then :class:`GaveUp`; never more in flight than the peer's
  window;
* a RST that fits the connection is :class:`Reset` (to our SYN: the port is closed);
* ``close()`` sends a FIN after the data; ``abort()`` a RST.

Not here, because one short exchange does not need them: congestion control, window scaling,
SACK, timestamps, urgent data, simultaneous open, TIME_WAIT (every connection has a fresh
random port and initial sequence number).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from probes.protocols import ipv4

MOD = 1 << 32
RECEIVE_WINDOW = 65_535
DEFAULT_MSS = 1200  # fits the inner MTU of WireGuard (1420), OpenVPN and ESP-in-UDP tunnels


def _after(a: int, b: int) -> bool:
    """``a`` comes after ``b`` in sequence space."""
    return 0 < (a - b) % MOD < MOD // 2


@dataclass(frozen=True, slots=True)
class Connected:
    """The SYN was answered with a SYN-ACK."""


@dataclass(frozen=True, slots=True)
class Received:
    data: bytes


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The peer sent its FIN: no more data will come."""


@dataclass(frozen=True, slots=True)
class Reset:
    during_connect: bool  # a RST to our SYN: nothing listens on the port


@dataclass(frozen=True, slots=True)
class GaveUp:
    connecting: bool  # the SYN itself was never answered
    sends: int


Event = Connected | Received | PeerClosed | Reset | GaveUp


@dataclass(slots=True)
class _Segment:
    seq: int
    flags: int
    payload: bytes
    sends: int = 0

    @property
    def length(self) -> int:  # in sequence space: SYN and FIN count one each
        return len(self.payload) + bool(self.flags & ipv4.TCP_SYN) + bool(
            self.flags & ipv4.TCP_FIN)


class TcpClient:
    """One connection from ``src``:``sport`` to ``dst``:``dport`` (IPv4, inner addresses)."""

    def __init__(self, src: str, dst: str, sport: int, dport: int, iss: int, *,
                 mss: int = DEFAULT_MSS, rto: float = 0.5, max_sends: int = 4) -> None:
        self.src, self.dst, self.sport, self.dport = src, dst, sport, dport
        self.mss, self.rto_initial, self.max_sends = mss, rto, max_sends
        self.iss = iss % MOD
        self.snd_una = self.snd_nxt = self.iss
        self.rcv_nxt = 0
        self.peer_window = 0
        self.established = False
        self.closed = False  # reset, given up or aborted: nothing more to do
        self.peer_closed = False
        self.dropped = 0  # segments not taken: out of order, outside the window, bad acks
        self._pending = b""  # data not yet segmented
        self._fin_queued = False
        self._unacked: deque[_Segment] = deque()
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        self._timer: float | None = None
        self._rto = rto

    # ---- verbs --------------------------------------------------------------------------------

    def connect(self, now: float) -> None:
        self._queue(_Segment(self.iss, ipv4.TCP_SYN, b""), now)

    def send(self, data: bytes, now: float) -> None:
        self._pending += data
        self._segment(now)

    def close(self, now: float) -> None:
        """A FIN once everything before it is sent."""
        self._fin_queued = True
        self._segment(now)

    def abort(self) -> None:
        """A RST: the peer forgets the connection at once (nothing is resent after it)."""
        if not self.closed and self.snd_nxt != self.iss:
            self._out.append(self._packet(self.snd_nxt, ipv4.TCP_RST | ipv4.TCP_ACK, b""))
        self._finish()

    def receive(self, segment: ipv4.TcpSegment, now: float) -> None:
        """A segment addressed to this connection (the caller matched addresses and ports)."""
        if self.closed:
            return
        if segment.flags & ipv4.TCP_RST:
            self._on_reset(segment)
            return
        if not self.established:
            self._on_syn_ack(segment, now)
            return
        if segment.flags & ipv4.TCP_ACK:
            self._on_ack(segment, now)
        if segment.flags & ipv4.TCP_SYN:  # our ACK of its SYN was lost: say it again
            self._ack()
            return
        self._on_data(segment)

    def packets_to_send(self, now: float) -> list[bytes]:
        del now
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        return self._timer

    def handle_timer(self, now: float) -> None:
        if self._timer is None or now < self._timer or self.closed:
            return
        if not self._unacked:
            self._timer = None
            return
        if self._unacked[0].sends >= self.max_sends:
            self._events.append(GaveUp(not self.established, self._unacked[0].sends))
            self._finish()
            return
        self._rto *= 2
        for segment in self._unacked:  # go back N: everything from the oldest unacknowledged
            self._transmit(segment)
        self._timer = now + self._rto

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def all_acknowledged(self) -> bool:
        return not self._unacked and not self._pending

    # ---- receiving ----------------------------------------------------------------------------

    def _on_reset(self, segment: ipv4.TcpSegment) -> None:
        if not self.established:
            ok = bool(segment.flags & ipv4.TCP_ACK) and segment.ack == (self.iss + 1) % MOD
        else:  # RFC 5961: only a RST at the exact next sequence number counts
            ok = segment.seq == self.rcv_nxt
        if not ok:
            self.dropped += 1
            return
        self._events.append(Reset(during_connect=not self.established))
        self._finish()

    def _on_syn_ack(self, segment: ipv4.TcpSegment, now: float) -> None:
        wanted = ipv4.TCP_SYN | ipv4.TCP_ACK
        if segment.flags & wanted != wanted or segment.ack != (self.iss + 1) % MOD:
            self.dropped += 1
            return
        self.rcv_nxt = (segment.seq + 1) % MOD
        self.established = True
        self._acked_up_to(segment.ack, segment.window, now)
        self._events.append(Connected())
        self._ack()
        self._segment(now)

    def _on_ack(self, segment: ipv4.TcpSegment, now: float) -> None:
        ack = segment.ack
        if _after(ack, self.snd_nxt):  # acknowledges what we never sent
            self.dropped += 1
            return
        self._acked_up_to(ack, segment.window, now)

    def _acked_up_to(self, ack: int, window: int, now: float) -> None:
        self.peer_window = window
        if not _after(ack, self.snd_una):
            return
        self.snd_una = ack
        while self._unacked:
            head = self._unacked[0]
            end = (head.seq + head.length) % MOD
            if _after(end, ack):
                break
            self._unacked.popleft()
        self._rto = self.rto_initial
        self._timer = now + self._rto if self._unacked else None
        self._segment(now)

    def _on_data(self, segment: ipv4.TcpSegment) -> None:
        fin = bool(segment.flags & ipv4.TCP_FIN)
        if not segment.payload and not fin:
            return  # a bare ACK
        offset = (self.rcv_nxt - segment.seq) % MOD
        if offset >= MOD // 2:  # starts beyond rcv_nxt: a gap; the sender resends
            self.dropped += 1
            self._ack()
            return
        if offset < len(segment.payload):
            data = segment.payload[offset:]
            self.rcv_nxt = (self.rcv_nxt + len(data)) % MOD
            self._events.append(Received(data))
        if fin and offset <= len(segment.payload) and not self.peer_closed:
            self.rcv_nxt = (self.rcv_nxt + 1) % MOD
            self.peer_closed = True
            self._events.append(PeerClosed())
        self._ack()

    # ---- sending ------------------------------------------------------------------------------

    def _segment(self, now: float) -> None:
        """Cut pending data (and a queued FIN) into segments, as far as the peer's window
        allows."""
        if not self.established or self.closed:
            return
        while self._pending:
            in_flight = (self.snd_nxt - self.snd_una) % MOD
            room = min(self.mss, self.peer_window - in_flight)
            if room <= 0:
                return
            chunk, self._pending = self._pending[:room], self._pending[room:]
            self._queue(_Segment(self.snd_nxt, ipv4.TCP_ACK | ipv4.TCP_PSH, chunk), now)
        if self._fin_queued:
            self._fin_queued = False
            self._queue(_Segment(self.snd_nxt, ipv4.TCP_ACK | ipv4.TCP_FIN, b""), now)

    def _queue(self, segment: _Segment, now: float) -> None:
        self._unacked.append(segment)
        self.snd_nxt = (self.snd_nxt + segment.length) % MOD
        self._transmit(segment)
        if self._timer is None:
            self._timer = now + self._rto

    def _transmit(self, segment: _Segment) -> None:
        segment.sends += 1
        syn = bool(segment.flags & ipv4.TCP_SYN)
        self._out.append(self._packet(segment.seq, segment.flags, segment.payload,
                                      mss=self.mss if syn else None))

    def _ack(self) -> None:
        self._out.append(self._packet(self.snd_nxt, ipv4.TCP_ACK, b""))

    def _packet(self, seq: int, flags: int, payload: bytes, *, mss: int | None = None) -> bytes:
        ack = self.rcv_nxt if flags & ipv4.TCP_ACK else 0
        return ipv4.tcp_packet(self.src, self.dst, self.sport, self.dport, seq=seq, ack=ack,
                               flags=flags, window=RECEIVE_WINDOW, payload=payload, mss=mss)

    def _finish(self) -> None:
        self.closed = True
        self._unacked.clear()
        self._pending = b""
        self._timer = None
