"""The webhook body: a versioned envelope around one :class:`probes.model.Verdict`.

Documented in docs/webhooks.md. ``schema_version`` changes only on incompatible changes; a
receiver rejects a version it does not know (400) rather than guessing. The body of a given
verdict is the same bytes on every retry, so a receiver may also de-duplicate on a body hash.
"""

from __future__ import annotations

import msgspec

from probes.model import SchemaError, Verdict

WEBHOOK_SCHEMA = "tunnelwatch.verdict"
WEBHOOK_SCHEMA_VERSION = 1

HEADER_IDEMPOTENCY_KEY = "Idempotency-Key"
HEADER_EVENT = "X-Tunnelwatch-Event"


class VerdictEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    schema: str
    schema_version: int
    idempotency_key: str  # "<node>:<seq>", the same as the Idempotency-Key header
    verdict: Verdict


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(VerdictEnvelope)


def encode_envelope(verdict: Verdict) -> bytes:
    return _encoder.encode(VerdictEnvelope(WEBHOOK_SCHEMA, WEBHOOK_SCHEMA_VERSION,
                                           verdict.idempotency_key, verdict))


def decode_envelope(body: bytes) -> VerdictEnvelope:
    """Decode and validate a webhook body; :class:`SchemaError` names the offending field."""
    try:
        env = _decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        text = str(exc)
        path = text.split(" - at `", 1)[1].rstrip("`") if " - at `" in text else "$"
        raise SchemaError(text, path) from None
    if env.schema != WEBHOOK_SCHEMA:
        raise SchemaError(f"unknown schema {env.schema!r}", "$.schema")
    if env.schema_version != WEBHOOK_SCHEMA_VERSION:
        raise SchemaError(f"unsupported schema_version {env.schema_version}", "$.schema_version")
    if env.idempotency_key != env.verdict.idempotency_key:
        raise SchemaError("idempotency_key does not match verdict node:seq", "$.idempotency_key")
    return env
