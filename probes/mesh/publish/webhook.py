"""Webhook publisher: POST a signed JSON envelope per verdict (schema in docs/webhooks.md).

Signing is the agent->mesh scheme of :mod:`probes.model.signing` (hex HMAC-SHA256 over
``timestamp + "." + body``), so one verifier serves both. The timestamp is taken per attempt: a
retry an hour later is signed afresh and still passes the receiver's freshness window.

Status codes: 2xx delivered; 409 (the receiver already has this idempotency key) delivered too;
408, 425, 429 and 5xx retried; any other 4xx is permanent (the receiver rejects this body: sending
it again cannot help).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import aiohttp

from probes.mesh.publish.base import PermanentError, Publisher, RetryableError
from probes.mesh.publish.envelope import HEADER_EVENT, HEADER_IDEMPOTENCY_KEY, encode_envelope
from probes.model import Verdict, signing

RETRYABLE_4XX = frozenset({408, 425, 429})


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

    def headers(self, verdict: Verdict, body: bytes) -> dict[str, str]:
        timestamp = signing.format_timestamp(self.clock())
        return {
            "Content-Type": "application/json",
            HEADER_EVENT: "verdict",
            HEADER_IDEMPOTENCY_KEY: verdict.idempotency_key,
            signing.HEADER_KEY_ID: self.key_id,
            signing.HEADER_TIMESTAMP: timestamp,
            signing.HEADER_SIGNATURE: signing.sign(self.key, timestamp, body),
        }

    async def deliver(self, verdict: Verdict) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        body = encode_envelope(verdict)
        try:
            async with self._session.post(self.url, data=body,
                                          headers=self.headers(verdict, body)) as resp:
                status = resp.status
                text = (await resp.text())[:200]
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise RetryableError(f"{type(exc).__name__}: {exc}") from None
        if 200 <= status < 300 or status == 409:
            return
        if status >= 500 or status in RETRYABLE_4XX:
            raise RetryableError(f"HTTP {status}: {text}")
        raise PermanentError(f"HTTP {status}: {text}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
