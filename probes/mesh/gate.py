"""The body of a signed request, read only once its headers deserve it.

Agents (and the mesh towards webhook receivers) sign ``timestamp + "." + body`` with a key named
by ``X-Tunnelwatch-Key-Id`` (:mod:`probes.model.signing`). The signature needs the body, but
everything else can be judged from the headers, so an unauthenticated client is turned away
before it costs more than a header's worth of memory:

1. a ``Content-Encoding`` other than identity: 415 (bodies are never decompressed: a gzip bomb
   of 1 MB once froze the event loop inflating it, before any check);
2. a missing signing header: 401;
3. no ``Content-Length`` (chunked): 411; a declared length over the limit: 413;
4. a timestamp outside the window: 401 (checked before the key id: the answer must not depend
   on whether a key id exists);
5. an unknown key id: 401 ``bad-signature``, the same answer as a wrong signature, so key ids
   cannot be enumerated;
6. a key id whose bodies failed their signature lately: a body over :data:`DRAIN_LIMIT` only
   within that key id's budget of failed bytes (:class:`FailureBudget`; beyond: 503 ``busy``,
   from the headers). Reading and refusing 8 MiB bodies signed with a known key id once took
   the CPU legitimate agents waited for (their p99 74.4 ms under attack, 15.6 ms without);
7. only then the body is read: within ``timeout`` seconds (a stalled body no longer holds its
   connection for minutes), while at most ``per_key`` bodies per key id and ``budget`` bytes in
   all are being read unverified (beyond: 503 ``busy``, retry), then the HMAC is checked.

A rejection answered before the body was read closes the connection when a large body is still
coming, rather than draining it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from probes.model import signing

# a declared body up to this size is drained after an early rejection (so a misconfigured
# client can still read the answer); a larger one gets the connection closed instead
DRAIN_LIMIT = 64 * 1024


class Rejected(Exception):
    """An answer instead of a body: status, a reason from a closed set (a metric label), and
    a detail for the client."""

    def __init__(self, status: int, reason: str, detail: str, path: str = "",
                 *, close: bool = False, extra: dict[str, int] | None = None) -> None:
        super().__init__(detail)
        self.extra = extra or {}  # machine-readable context (a replay's position)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.path = path
        self.close = close  # close the connection after answering (an unread body is coming)

    def response(self) -> web.Response:
        payload: dict[str, object] = {"error": self.public_reason, "detail": self.detail,
                                      **self.extra}
        if self.path:
            payload["field"] = self.path
        headers = {"Retry-After": "1"} if self.status == 503 else None
        resp = web.json_response(payload, status=self.status, headers=headers)
        if self.close:
            resp.force_close()
        return resp

    @property
    def public_reason(self) -> str:
        # one answer for an unknown key id and a wrong signature, and one for every kind of
        # "too busy to read your body" (the metric keeps them apart)
        return _PUBLIC.get(self.reason, self.reason)


_PUBLIC = {"unknown-key": "bad-signature", "failing-key": "busy"}


@dataclass(frozen=True, slots=True)
class SignedBody:
    key_id: str
    timestamp: str
    body: bytes


UNAUTHENTICATED = "key id unknown or signature does not match"

# a key id's budget of failed bytes is refilled at this rate, up to one largest body
FAILURE_BYTES_PER_SECOND = 256 * 1024


class FailureBudget:
    """Per key id, how many bytes of bodies that failed their signature it may still have
    read (a token bucket, kept only for key ids that failed lately).

    Bodies up to :data:`DRAIN_LIMIT` are always read (an agent's usual batch costs little to
    refuse): a key id's owner whose key id an attacker knows keeps sending small batches while
    its large ones wait for the budget; refusing them costs the attacker's budget, not the
    owner's. Unknown key ids never get this far (refused from the headers)."""

    def __init__(self, burst: int, rate: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.rate = FAILURE_BYTES_PER_SECOND if rate is None else rate
        self.clock = clock
        self._left: dict[str, tuple[float, float]] = {}  # key id -> (bytes left, at)

    def _level(self, key_id: str) -> float:
        left, at = self._left.get(key_id, (self.burst, 0.0))
        return min(self.burst, left + (self.clock() - at) * self.rate)

    def allows(self, key_id: str, length: int) -> bool:
        return (length <= DRAIN_LIMIT or key_id not in self._left
                or self._level(key_id) >= min(length, self.burst))

    def failed(self, key_id: str, length: int) -> None:
        # a debt of at most one burst: the key's owner waits at most two bursts' refill
        self._left[key_id] = (max(-self.burst, self._level(key_id) - length), self.clock())

    def verified(self, key_id: str) -> None:
        """A body of ``key_id`` verified: if its budget is full again, forget it."""
        if key_id in self._left and self._level(key_id) >= self.burst:
            del self._left[key_id]


class BodyGate:
    """Judges a signed request's headers, then reads and verifies its body (see the module)."""

    def __init__(self, keys: Mapping[str, bytes], *, max_body_bytes: int,
                 window_seconds: float, timeout: float, budget_bytes: int, per_key: int = 2,
                 clock: Callable[[], float] = time.time) -> None:
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.window = window_seconds
        self.timeout = timeout
        self.budget_bytes = budget_bytes
        self.per_key = per_key
        self.clock = clock
        self.reading_bytes = 0  # bodies being read now, not yet verified
        self._reading_per_key: dict[str, int] = {}
        self.failures = FailureBudget(max_body_bytes)

    async def read(self, request: web.Request) -> SignedBody:
        """The verified body, or :class:`Rejected`."""
        headers = request.headers
        length = request.content_length
        big = length is None or length > DRAIN_LIMIT
        encoding = headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise Rejected(415, "encoding", "request bodies are not decoded: send identity",
                           close=big)
        key_id = headers.get(signing.HEADER_KEY_ID, "")
        timestamp = headers.get(signing.HEADER_TIMESTAMP, "")
        signature = headers.get(signing.HEADER_SIGNATURE, "")
        missing = [name for name, value in ((signing.HEADER_KEY_ID, key_id),
                                            (signing.HEADER_TIMESTAMP, timestamp),
                                            (signing.HEADER_SIGNATURE, signature)) if not value]
        if missing:
            raise Rejected(401, "missing-header", f"missing {', '.join(missing)}", close=big)
        if length is None:
            raise Rejected(411, "length-required", "a Content-Length is required", close=True)
        if length > self.max_body_bytes:
            raise Rejected(413, "too-large", f"body of {length} bytes over {self.max_body_bytes}",
                           close=big)
        if not signing.timestamp_fresh(timestamp, self.clock(), self.window):
            raise Rejected(401, "stale-timestamp", f"timestamp not within {self.window:g} s",
                           close=big)
        key = self.keys.get(key_id)
        if key is None:
            raise Rejected(401, "unknown-key", UNAUTHENTICATED, close=big)
        if not self.failures.allows(key_id, length):
            raise Rejected(503, "failing-key", "too many bodies being read; retry", close=big)
        async with self._reading(key_id, length):
            try:
                async with asyncio.timeout(self.timeout):
                    body = await request.content.readexactly(length)
            except TimeoutError:
                raise Rejected(408, "body-timeout",
                               f"body not received within {self.timeout:g} s", close=True) from None
            except asyncio.IncompleteReadError:
                raise Rejected(400, "body-timeout", "body cut short", close=True) from None
        if not signing.verify(key, timestamp, body, signature):
            self.failures.failed(key_id, length)
            raise Rejected(401, "bad-signature", UNAUTHENTICATED)
        self.failures.verified(key_id)
        return SignedBody(key_id, timestamp, body)

    @contextlib.asynccontextmanager
    async def _reading(self, key_id: str, length: int) -> AsyncIterator[None]:
        """Hold ``length`` bytes of the unverified budget and one of the key's slots."""
        held = self._reading_per_key.get(key_id, 0)
        if held >= self.per_key or self.reading_bytes + length > self.budget_bytes:
            raise Rejected(503, "busy", "too many bodies being read; retry", close=True)
        self._reading_per_key[key_id] = held + 1
        self.reading_bytes += length
        try:
            yield
        finally:
            self.reading_bytes -= length
            left = self._reading_per_key[key_id] - 1
            if left:
                self._reading_per_key[key_id] = left
            else:
                del self._reading_per_key[key_id]


async def answer(request: web.Request, rejected: Rejected) -> web.Response:
    """Send ``rejected``'s answer; when it asks, close the connection right after it instead of
    draining a body nobody will read."""
    resp = rejected.response()
    if rejected.close:
        await resp.prepare(request)
        await resp.write_eof()
        request.protocol.force_close()
    return resp
