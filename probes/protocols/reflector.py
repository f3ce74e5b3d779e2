"""The reflector's wire format and its answering logic (sans-I/O): what ``tunnelwatch
reflector`` speaks, and what the egress and throughput checks send to it through a tunnel.

A request is at least :data:`REQUEST_MIN` bytes: magic ``TWq1``, a kind (echo or burst), an
8-byte session id the agent picks per check run, a sequence number, then padding to the size the
agent wants to measure with. The answer is always :data:`REPLY_SIZE` bytes, never more than the
request: the reflector cannot amplify traffic toward a forged source. It says what the reflector
saw of the session so far — requests, bytes, and microseconds since the session's first
request — so the agent reads the rate that reached the far end from the far end's own clock,
whatever happened to the answers on their way back.

:class:`Reflector` answers; it keeps a bounded table of sessions (least recently used evicted)
and a token bucket per source address, so a flood costs it a dictionary lookup per packet and
gets no answers beyond the bucket.
"""

from __future__ import annotations

import enum
import struct
from collections import OrderedDict
from dataclasses import dataclass

REQUEST_MAGIC = b"TWq1"
REPLY_MAGIC = b"TWr1"
_REQUEST = struct.Struct("!4sB3x8sI")  # magic, kind, session, seq
_REPLY = struct.Struct("!4sB3x8sIIQQ")  # magic, kind, session, seq, count, bytes, elapsed_us
REPLY_SIZE = _REPLY.size  # 40
REQUEST_MIN = REPLY_SIZE  # a request is never smaller than its answer
REQUEST_MAX = 1472  # one unfragmented datagram on a 1500-byte path
SESSION_IDLE_SECONDS = 60.0
DEFAULT_MAX_SESSIONS = 4096
DEFAULT_SOURCE_RATE = 5000.0  # answered requests per second per source address
DEFAULT_SOURCE_TABLE = 4096


class Kind(enum.IntEnum):
    ECHO = 1  # egress: one request, one answer
    BURST = 2  # throughput: the answers carry the session's running totals


@dataclass(frozen=True, slots=True)
class Reply:
    kind: int
    session: bytes
    seq: int
    count: int  # requests of this session the reflector has received, this one included
    bytes: int  # their UDP payload bytes
    elapsed_us: int  # since the session's first request, by the reflector's clock


def build_request(kind: Kind, session: bytes, seq: int, size: int = REQUEST_MIN) -> bytes:
    """A request of ``size`` bytes (UDP payload), clamped to [REQUEST_MIN, REQUEST_MAX]."""
    head = _REQUEST.pack(REQUEST_MAGIC, kind, session, seq & 0xFFFFFFFF)
    size = min(max(size, REQUEST_MIN), REQUEST_MAX)
    return head + bytes(size - len(head))


def parse_reply(data: bytes) -> Reply | None:
    """A reflector answer, or None for anything else (never raises)."""
    if len(data) != REPLY_SIZE or not data.startswith(REPLY_MAGIC):
        return None
    _, kind, session, seq, count, total, elapsed = _REPLY.unpack(data)
    return Reply(kind, session, seq, count, total, elapsed)


@dataclass(slots=True)
class _Session:
    first: float
    count: int = 0
    bytes: int = 0
    last: float = 0.0


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


@dataclass(slots=True)
class ReflectorStats:
    answered: int = 0
    ignored: int = 0  # not a request (wrong magic, too short or too long, unknown kind)
    limited: int = 0  # over the source's rate
    sessions_evicted: int = 0


class Reflector:
    """Answers requests; ``answer(data, source, now)`` -> the reply, or None to stay silent."""

    def __init__(self, *, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 source_rate: float = DEFAULT_SOURCE_RATE,
                 max_sources: int = DEFAULT_SOURCE_TABLE) -> None:
        self.max_sessions = max_sessions
        self.source_rate = source_rate
        self.max_sources = max_sources
        self.stats = ReflectorStats()
        self._sessions: OrderedDict[tuple[str, int, bytes], _Session] = OrderedDict()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def answer(self, data: bytes, source: tuple[str, int], now: float) -> bytes | None:
        if not REQUEST_MIN <= len(data) <= REQUEST_MAX or not data.startswith(REQUEST_MAGIC):
            self.stats.ignored += 1
            return None
        _, kind, session_id, seq = _REQUEST.unpack_from(data)
        if kind not in (Kind.ECHO, Kind.BURST):
            self.stats.ignored += 1
            return None
        if not self._admit(source[0], now):
            self.stats.limited += 1
            return None
        key = (source[0], source[1], session_id)
        session = self._sessions.get(key)
        if session is None or now - session.last > SESSION_IDLE_SECONDS:
            session = self._sessions[key] = _Session(now)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
                self.stats.sessions_evicted += 1
        self._sessions.move_to_end(key)
        session.count += 1
        session.bytes += len(data)
        session.last = now
        self.stats.answered += 1
        elapsed = max(0, round((now - session.first) * 1e6))
        return _REPLY.pack(REPLY_MAGIC, kind, session_id, seq, session.count & 0xFFFFFFFF,
                           session.bytes, elapsed)

    def _admit(self, source: str, now: float) -> bool:
        """The source's token bucket (burst: one second's worth)."""
        bucket = self._buckets.get(source)
        if bucket is None:
            bucket = self._buckets[source] = _Bucket(self.source_rate, now)
            while len(self._buckets) > self.max_sources:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(source)
            bucket.tokens = min(self.source_rate,
                                bucket.tokens + (now - bucket.at) * self.source_rate)
            bucket.at = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True
