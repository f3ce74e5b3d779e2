"""Webhook publisher: POST a signed JSON envelope per verdict, and (weights on) one per batch of
weight changes (schemas in docs/webhooks.md).

Signing is the agent->mesh scheme of :mod:`probes.model.signing` (hex HMAC-SHA256 over
``timestamp + "." + body``), so one verifier serves both. The timestamp is taken per attempt: a
retry an hour later is signed afresh and still passes the receiver's freshness window.

Status codes: 2xx delivered; 409 (the receiver already has this idempotency key) delivered too;
408, 425, 429 and 5xx retried; so are 401, 403, 404 and 410: a receiver rotating its keys or
being redeployed answers them for a while, and dead-lettering at once lost verdicts for good
(Stripe retries any non-2xx). A redirect (3xx) is never followed — the verdict is for this URL
and its signature for this receiver — and is retried like a refusal. Any other 4xx is permanent
(the receiver rejects this body: sending it again cannot help). Retried failures are
dead-lettered after the publisher's ``retry.dead_letter_after``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import aiohttp

from probes.mesh.publish.base import PermanentError, Publisher, RetryableError
from probes.mesh.publish.envelope import (
    HEADER_EVENT,
    HEADER_IDEMPOTENCY_KEY,
    encode_envelope,
    encode_weights,
)
from probes.model import Verdict, WeightChange, signing

# timeouts and throttling, and refusals that end once the receiver's keys or routes are right
RETRYABLE_4XX = frozenset({401, 403, 404, 408, 410, 425, 429})
WEIGHTS_PER_POST = 500  # weight changes in one webhook body


class WebhookPublisher(Publisher):
    def __init__(self, name: str, url: str, key: bytes, key_id: str, *, timeout: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.url = url
        self.key = key
        self.key_id = key_id
        self.timeout = timeout
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None

    supports_weights = True

    def headers(self, verdict: Verdict, body: bytes) -> dict[str, str]:
        return self._headers("verdict", verdict.idempotency_key, body)

    def _headers(self, event: str, key: str, body: bytes) -> dict[str, str]:
        timestamp = signing.format_timestamp(self.clock())
        return {
            "Content-Type": "application/json",
            HEADER_EVENT: event,
            HEADER_IDEMPOTENCY_KEY: key,
            signing.HEADER_KEY_ID: self.key_id,
            signing.HEADER_TIMESTAMP: timestamp,
            signing.HEADER_SIGNATURE: signing.sign(self.key, timestamp, body),
        }

    async def deliver(self, verdict: Verdict) -> None:
        body = encode_envelope(verdict)
        await self._post(body, self.headers(verdict, body))

    async def deliver_weights(self, changes: Sequence[WeightChange]) -> None:
        for start in range(0, len(changes), WEIGHTS_PER_POST):
            key, body = encode_weights(list(changes[start:start + WEIGHTS_PER_POST]))
            await self._post(body, self._headers("weights", key, body))

    async def reconcile_weights(self, current: Mapping[str, WeightChange]) -> int:
        """A receiver keeps no state we can read: send every node's current weight."""
        await self.deliver_weights([current[n] for n in sorted(current)])
        return 0

    async def _post(self, body: bytes, headers: dict[str, str]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.post(self.url, data=body, headers=headers,
                                          allow_redirects=False) as resp:
                status = resp.status
                text = (await resp.text())[:200]
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise RetryableError(f"{type(exc).__name__}: {exc}") from None
        if 200 <= status < 300 or status == 409:
            return
        if 300 <= status < 400:
            where = resp.headers.get("Location", "?")[:200]
            raise RetryableError(f"HTTP {status} to {where}: redirects are not followed")
        if status >= 500 or status in RETRYABLE_4XX:
            raise RetryableError(f"HTTP {status}: {text}")
        raise PermanentError(f"HTTP {status}: {text}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
