"""``POST /v1/batches``: authenticated, validated, all-or-nothing ingest of agent batches.

Checks, in order (the first that fails answers, and nothing is applied). Everything up to the
key id is judged from the headers, before the body is read (:mod:`probes.mesh.gate`):

======================  ======  =======================================================
reason                  status  when
======================  ======  =======================================================
``encoding``            415     a Content-Encoding other than identity (never decoded)
``missing-header``      401     one of the four X-Tunnelwatch-* headers is absent
``length-required``     411     no Content-Length
``too-large``           413     declared length over ``max_body_bytes``
``stale-timestamp``     401     timestamp malformed or outside the window
``unknown-key``         401     the key id is not configured (answered ``bad-signature``)
``failing-key``         503     a body over 64 KiB from a key id whose bodies failed their
                                signature lately, beyond its budget (answered ``busy``)
``busy``                503     too many unverified bodies being read at once; retry
``body-timeout``        408     the body did not arrive within ``body_timeout_seconds``
``bad-signature``       401     HMAC does not match (see :mod:`probes.model.signing`)
``identity``            403     the key belongs to another agent than X-Tunnelwatch-Agent,
                                or batch.agent or an observation's vantage is not the agent
``schema``              400     not JSON / not a batch; the answer names the field
``replay``              409     (epoch, batch_seq) not above the agent's last accepted one
``store``               503     the store failed; nothing was kept, the agent retries
======================  ======  =======================================================

An unknown key id and a wrong signature get the same answer (401 ``bad-signature``), and the
key's owner is compared with X-Tunnelwatch-Agent only after the signature verified, so key ids
cannot be told apart from outside; ``tunnelwatch_mesh_ingest_rejects_total`` keeps the reasons
apart for the operator.

A 409 ``replay`` answer carries the agent's position at the mesh (``"epoch"``, ``"batch_seq"``),
so the agent tells the two cases apart: a batch of its own epoch at or below that position was
committed earlier (the answer to the first attempt was lost) and leaves the spool; a batch of an
older epoch than the mesh's is refused, kept, and sent again in a newer epoch
(probes/agent/reporter.py).
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from probes.logutil import RateLimitedLog
from probes.mesh.connections import ConnectionGuard
from probes.mesh.gate import BodyGate, Rejected, answer
from probes.mesh.reprobe import ReprobePlanner
from probes.mesh.service import MeshService, Replay
from probes.mesh.store import StoreError
from probes.model import ObservationBatch, SchemaError, Verdict, signing
from probes.model.columnar import ColumnarBatch, columnar_count, decode_received, is_columnar

log = logging.getLogger(__name__)
trouble = RateLimitedLog(log)  # a full disk fails every batch: one line per 10 s about it

# optional batch fields this mesh takes, and "columnar": it takes columnar batches (see the
# reply of handle)
ACCEPTS = ("traces", "epoch", "columnar")
# an agent's observation is 150-250 bytes of JSON: a JSON body's size in observations,
# estimated before it is decoded (decoding waits for the input's turn, whose deadline needs the
# size); a columnar body declares its count up front
BODY_BYTES_PER_OBSERVATION = 160
REJECT_REASONS = (
    "encoding",
    "missing-header",
    "length-required",
    "too-large",
    "stale-timestamp",
    "unknown-key",
    "failing-key",
    "busy",
    "body-timeout",
    "bad-signature",
    "identity",
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
    traces_total: int = 0
    bytes_total: int = 0
    rejects: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))


@dataclass(frozen=True, slots=True)
class IngestLimits:
    """How much an unauthenticated client may cost (the mesh config's keys of the same names)."""

    max_body_bytes: int
    timestamp_window_seconds: float
    body_timeout_seconds: float = 15.0
    unverified_body_bytes: int = 32 * 1024 * 1024


class Ingest:
    """The batch handler. ``clock`` is wall time (injected for tests)."""

    def __init__(
        self,
        service: MeshService,
        keys: dict[str, AgentKey],
        limits: IngestLimits,
        clock: Callable[[], float] = time.time,
        *,
        reprobe: ReprobePlanner | None = None,
        guard: ConnectionGuard | None = None,
    ) -> None:
        self.service = service
        self.keys = keys
        self.clock = clock
        self.guard = guard
        self.gate = BodyGate(
            {key_id: known.key for key_id, known in keys.items()},
            max_body_bytes=limits.max_body_bytes, window_seconds=limits.timestamp_window_seconds,
            timeout=limits.body_timeout_seconds, budget_bytes=limits.unverified_body_bytes,
            clock=clock)
        self.stats = IngestStats()
        self.reprobe = reprobe

    async def handle(self, request: web.Request) -> web.Response:
        try:
            agent = request.headers.get(signing.HEADER_AGENT)
            if not agent:
                raise Rejected(401, "missing-header", f"missing {signing.HEADER_AGENT}")
            signed = await self.gate.read(request)
            if self.guard is not None:
                self.guard.trust(request.protocol)  # a signed request: keep this connection
            verdicts = await self._accept(agent, signed.key_id, signed.body)
        except Rejected as exc:
            self.stats.rejects[exc.reason] += 1
            return await answer(request, exc)
        # "accepts" tells an agent which optional batch fields this mesh takes: an agent sends
        # path traces only to a mesh that lists "traces" (an older one would refuse the batch)
        reply: dict[str, object] = {"accepted": True, "verdicts": len(verdicts),
                                    "accepts": list(ACCEPTS)}
        if self.reprobe is not None:
            # corroboration on demand: the failures this batch began go to the other vantages,
            # and this vantage gets what others' failures asked of it (probes/mesh/reprobe.py)
            now = self.service.last_now
            self.reprobe.plan(self.service.engine, now)
            asks = self.reprobe.take(request.headers[signing.HEADER_AGENT], now)
            if asks:
                reply["reprobe"] = asks
        return web.json_response(reply)

    async def _accept(self, agent: str, key_id: str, body: bytes) -> list[Verdict]:
        if self.keys[key_id].agent != agent:
            raise Rejected(403, "identity", "key id belongs to another agent")
        decoded: list[ObservationBatch | ColumnarBatch] = []

        def validated(data: bytes) -> ObservationBatch | ColumnarBatch:
            # run in the batch's input turn (see MeshService.accept_body)
            decoded.append(validated_batch(agent, data))
            return decoded[0]

        try:
            verdicts = await self.service.accept_body(
                body, validated, agent, observations_in(body), self.clock())
        except Replay as exc:
            batch = decoded[0]
            raise Rejected(409, "replay", f"(epoch, batch_seq) ({batch.epoch}, {batch.batch_seq})"
                           f" not above ({exc.epoch}, {exc.last})",
                           extra={"epoch": exc.epoch, "batch_seq": exc.last}) from None
        except StoreError as exc:
            trouble("store", "batch from %s not stored: %s", agent, exc)
            raise Rejected(503, "store", "not stored; retry") from None
        batch = decoded[0]
        stats = self.stats
        stats.batches_total += 1
        stats.observations_total += (len(batch.observations)
                                     if isinstance(batch, ObservationBatch) else batch.count)
        stats.traces_total += len(batch.traces)
        stats.bytes_total += len(body)
        return verdicts


_vantage_of = operator.attrgetter("vantage")


def observations_in(body: bytes) -> int:
    """How many observations ``body`` holds, before it is decoded: a columnar body's declared
    count, a JSON body's estimate from its length."""
    count = columnar_count(body) if is_columnar(body) else None
    return count if count is not None else len(body) // BODY_BYTES_PER_OBSERVATION


def validated_batch(agent: str, body: bytes) -> ObservationBatch | ColumnarBatch:
    """``body`` (JSON or columnar) decoded, and every part of it from ``agent`` (else
    :class:`Rejected`)."""
    try:
        batch = decode_received(body)
    except SchemaError as exc:
        raise Rejected(400, "schema", str(exc), exc.path) from None
    if batch.agent != agent:
        raise Rejected(403, "identity", "batch from another agent", "$.agent")
    # a columnar batch's observations have no vantage of their own: the agent is theirs
    observations = batch.observations if isinstance(batch, ObservationBatch) else ()
    # at C speed for the usual batch (every vantage the agent's); the loop names the first other
    if any(map(agent.__ne__, map(_vantage_of, observations))):
        i = next(i for i, obs in enumerate(observations) if obs.vantage != agent)
        raise Rejected(
            403,
            "identity",
            "an agent reports only as its own vantage",
            f"$.observations[{i}].vantage",
        )
    for i, trace in enumerate(batch.traces):
        if trace.vantage != agent:
            raise Rejected(
                403, "identity", "an agent traces only as its own vantage",
                f"$.traces[{i}].vantage",
            )
    return batch
