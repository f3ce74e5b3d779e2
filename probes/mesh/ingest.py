"""``POST /v1/batches``: authenticated, validated, all-or-nothing ingest of agent batches.

Checks, in order (the first that fails answers, and nothing is applied):

====================  ======  =======================================================
reason                status  when
====================  ======  =======================================================
``too-large``         413     body over ``max_body_bytes`` (by Content-Length or read)
``missing-header``    401     one of the four X-Tunnelwatch-* headers is absent
``unknown-key``       401     the key id is not configured
``identity``          403     the key belongs to another agent than X-Tunnelwatch-Agent
``stale-timestamp``   401     timestamp malformed or outside the window
``bad-signature``     401     HMAC does not match (see :mod:`probes.model.signing`)
``schema``            400     not JSON / not a batch; the answer names the field
``identity``          403     batch.agent or an observation's vantage is not the agent
``replay``            409     batch_seq not above the last accepted one for this agent
``store``             503     the store failed; nothing was kept, the agent retries
====================  ======  =======================================================

A 409 ``replay`` for a batch the agent sent before means the mesh already has it (the answer to
the first attempt was lost): the agent drops it from its spool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from probes.mesh.reprobe import ReprobePlanner
from probes.mesh.service import MeshService
from probes.mesh.store import StoreError
from probes.model import SchemaError, Verdict, decode_batch, signing

log = logging.getLogger(__name__)

REJECT_REASONS = (
    "too-large",
    "missing-header",
    "unknown-key",
    "identity",
    "stale-timestamp",
    "bad-signature",
    "schema",
    "replay",
    "store",
)


@dataclass(frozen=True, slots=True)
class AgentKey:
    agent: str
    key: bytes


@dataclass(slots=True)
class IngestStats:
    batches_total: int = 0
    observations_total: int = 0
    bytes_total: int = 0
    rejects: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))


class Rejected(Exception):
    def __init__(self, status: int, reason: str, detail: str, path: str = "") -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.path = path


class Ingest:
    """The batch handler. ``clock`` is wall time (injected for tests)."""

    def __init__(
        self,
        service: MeshService,
        keys: dict[str, AgentKey],
        max_body_bytes: int,
        timestamp_window_seconds: float,
        clock: Callable[[], float] = time.time,
        *,
        reprobe: ReprobePlanner | None = None,
    ) -> None:
        self.service = service
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.window = timestamp_window_seconds
        self.clock = clock
        self.stats = IngestStats()
        self.reprobe = reprobe

    async def handle(self, request: web.Request) -> web.Response:
        try:
            body = await self._read(request)
            verdicts = self._accept(request, body)
        except Rejected as exc:
            self.stats.rejects[exc.reason] += 1
            payload = {"error": exc.reason, "detail": exc.detail}
            if exc.path:
                payload["field"] = exc.path
            return web.json_response(payload, status=exc.status)
        reply: dict[str, object] = {"accepted": True, "verdicts": len(verdicts)}
        if self.reprobe is not None:
            # corroboration on demand: the failures this batch began go to the other vantages,
            # and this vantage gets what others' failures asked of it (probes/mesh/reprobe.py)
            now = self.service.last_now
            self.reprobe.plan(self.service.engine, now)
            asks = self.reprobe.take(request.headers[signing.HEADER_AGENT], now)
            if asks:
                reply["reprobe"] = asks
        return web.json_response(reply)

    async def _read(self, request: web.Request) -> bytes:
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise Rejected(413, "too-large", f"body of {length} bytes over {self.max_body_bytes}")
        try:
            # the app's client_max_size is max_body_bytes: aiohttp stops reading beyond it
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Rejected(413, "too-large", f"body over {self.max_body_bytes} bytes") from None
        if len(body) > self.max_body_bytes:
            raise Rejected(413, "too-large", f"body over {self.max_body_bytes} bytes")
        return body

    def _accept(self, request: web.Request, body: bytes) -> list[Verdict]:
        headers = request.headers
        agent = headers.get(signing.HEADER_AGENT)
        key_id = headers.get(signing.HEADER_KEY_ID)
        timestamp = headers.get(signing.HEADER_TIMESTAMP)
        signature = headers.get(signing.HEADER_SIGNATURE)
        if not (agent and key_id and timestamp and signature):
            missing = [
                name
                for name, value in (
                    (signing.HEADER_AGENT, agent),
                    (signing.HEADER_KEY_ID, key_id),
                    (signing.HEADER_TIMESTAMP, timestamp),
                    (signing.HEADER_SIGNATURE, signature),
                )
                if not value
            ]
            raise Rejected(401, "missing-header", f"missing {', '.join(missing)}")
        known = self.keys.get(key_id)
        if known is None:
            raise Rejected(401, "unknown-key", "unknown key id")
        if known.agent != agent:
            raise Rejected(403, "identity", "key id belongs to another agent")
        now = self.clock()
        if not signing.timestamp_fresh(timestamp, now, self.window):
            raise Rejected(401, "stale-timestamp", f"timestamp not within {self.window:g} s")
        if not signing.verify(known.key, timestamp, body, signature):
            raise Rejected(401, "bad-signature", "signature does not match")
        try:
            batch = decode_batch(body)
        except SchemaError as exc:
            raise Rejected(400, "schema", str(exc), exc.path) from None
        except UnicodeDecodeError as exc:  # msgspec lets invalid UTF-8 in a string through
            raise Rejected(400, "schema", f"invalid UTF-8: {exc.reason}", "$") from None
        if batch.agent != agent:
            raise Rejected(403, "identity", "batch from another agent", "$.agent")
        for i, obs in enumerate(batch.observations):
            if obs.vantage != agent:
                raise Rejected(
                    403,
                    "identity",
                    "an agent reports only as its own vantage",
                    f"$.observations[{i}].vantage",
                )
        last = self.service.agent_seq.get(agent, -1)
        if batch.batch_seq <= last:
            raise Rejected(409, "replay", f"batch_seq {batch.batch_seq} not above {last}")
        try:
            verdicts = self.service.accept_batch(body, batch, now)
        except StoreError as exc:
            log.error("batch from %s not stored: %s", agent, exc)
            raise Rejected(503, "store", "not stored; retry") from None
        stats = self.stats
        stats.batches_total += 1
        stats.observations_total += len(batch.observations)
        stats.bytes_total += len(body)
        return verdicts
