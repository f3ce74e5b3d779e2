"""The webhook bodies: a versioned envelope around one :class:`probes.model.Verdict`, or around
the latest weight changes of some nodes (:class:`probes.model.WeightChange`, weights on).

Documented in docs/webhooks.md. ``schema_version`` changes only on incompatible changes; a
receiver rejects a version it does not know (400) rather than guessing. The body of a given
verdict is the same bytes on every retry, so a receiver may also de-duplicate on a body hash.

Verdict schema version 2: the verdict carries ``epoch`` and the idempotency key is
``node:epoch:seq``; order by ``(epoch, seq)``. Version 1 bodies (an older mesh) are still read:
their epoch is 0. Bodies are decoded like every wire message: bounds checked, duplicate keys
refused.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from probes.model import SchemaError, Verdict, WeightChange, strict_decode

WEBHOOK_SCHEMA = "tunnelwatch.verdict"
WEBHOOK_SCHEMA_VERSION = 2
WEBHOOK_READABLE_VERSIONS = (1, 2)
WEIGHTS_SCHEMA = "tunnelwatch.weights"
WEIGHTS_SCHEMA_VERSION = 1

HEADER_IDEMPOTENCY_KEY = "Idempotency-Key"
HEADER_EVENT = "X-Tunnelwatch-Event"


class VerdictEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    schema: str
    schema_version: int
    idempotency_key: str  # "<node>:<epoch>:<seq>", the same as the Idempotency-Key header
    verdict: Verdict


class WeightsEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    schema: str
    schema_version: int
    # "weights:" + a digest of the changes' own keys (node:w<seq>): the same changes, the same key
    idempotency_key: str
    weights: list[WeightChange]


class _Schema(msgspec.Struct):
    schema: str = ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(VerdictEnvelope)
_weights_decoder = msgspec.json.Decoder(WeightsEnvelope)
_schema_decoder = msgspec.json.Decoder(_Schema)


def encode_envelope(verdict: Verdict) -> bytes:
    return _encoder.encode(VerdictEnvelope(WEBHOOK_SCHEMA, WEBHOOK_SCHEMA_VERSION,
                                           verdict.idempotency_key, verdict))


def weights_key(changes: list[WeightChange]) -> str:
    keys = ",".join(c.idempotency_key for c in changes)
    return "weights:" + hashlib.sha256(keys.encode()).hexdigest()[:32]


def encode_weights(changes: list[WeightChange]) -> tuple[str, bytes]:
    """(idempotency key, body) of a weights webhook."""
    key = weights_key(changes)
    return key, _encoder.encode(WeightsEnvelope(WEIGHTS_SCHEMA, WEIGHTS_SCHEMA_VERSION, key,
                                                changes))


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    return strict_decode(decoder, body)


def decode_any(body: bytes) -> VerdictEnvelope | WeightsEnvelope:
    """A verdict or a weights webhook, by its ``schema``; :class:`SchemaError` names the
    offending field."""
    if _decode(_schema_decoder, body).schema == WEIGHTS_SCHEMA:
        return decode_weights(body)
    return decode_envelope(body)


def _known(schema: str, version: int, expected: str, versions: tuple[int, ...]) -> None:
    if schema != expected:
        raise SchemaError(f"unknown schema {schema!r}", "$.schema")
    if version not in versions:
        raise SchemaError(f"unsupported schema_version {version}", "$.schema_version")


def decode_weights(body: bytes) -> WeightsEnvelope:
    env: WeightsEnvelope = _decode(_weights_decoder, body)
    _known(env.schema, env.schema_version, WEIGHTS_SCHEMA, (WEIGHTS_SCHEMA_VERSION,))
    if env.idempotency_key != weights_key(env.weights):
        raise SchemaError("idempotency_key does not match the weights' node:w<seq> keys",
                          "$.idempotency_key")
    return env


def decode_envelope(body: bytes) -> VerdictEnvelope:
    """Decode and validate a webhook body; :class:`SchemaError` names the offending field."""
    env: VerdictEnvelope = _decode(_decoder, body)
    _known(env.schema, env.schema_version, WEBHOOK_SCHEMA, WEBHOOK_READABLE_VERSIONS)
    if env.idempotency_key != env.verdict.idempotency_key:
        raise SchemaError("idempotency_key does not match the verdict's node, epoch and seq",
                          "$.idempotency_key")
    return env
