"""The wire schema shared by agents and the mesh.

Everything that crosses a process boundary is one of the msgspec structs below, encoded as JSON.
The schema is versioned by ``SCHEMA_VERSION`` carried in every :class:`ObservationBatch`; a
receiver rejects versions it does not know instead of guessing.

Two clocks appear here, on purpose:

* durations (``duration_seconds``, ``phases``, RTTs) are measured by the agent with a monotonic
  clock, so a wall-clock step never produces a negative or inflated figure;
* ``wall_time`` is the agent's wall clock (Unix seconds) at the start of the check. It is only used
  to order and age observations across machines, never to measure anything.

Reasons are a closed enum. Labels on metrics come from it, so an unknown string from the wire is a
schema error, not a new time series.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

SCHEMA_VERSION = 1


class Reason(enum.StrEnum):
    """Why a check came out the way it did. ``OK`` is the only reason of a passing check."""

    OK = "ok"
    # transport-level outcomes, shared by every check kind
    TIMEOUT = "timeout"  # no answer at all: host down, filtered, or (WireGuard) key unknown
    REFUSED = "refused"  # TCP RST
    ICMP_UNREACHABLE = "icmp-unreachable"  # ICMP destination/port unreachable came back
    NETWORK_UNREACHABLE = "network-unreachable"  # local routing said no (ENETUNREACH, EHOSTUNREACH)
    RESOLVE_FAILED = "resolve-failed"
    BAD_RESPONSE = "bad-response"  # an answer came, but it was not the protocol we speak
    BAD_PACKET = "bad-packet"  # a packet failed to parse or authenticate
    UNEXPECTED_REPLY = "unexpected-reply"  # UDP request/response: reply did not match the pattern
    TLS_FAILED = "tls-failed"  # TLS handshake failed for a reason other than verification
    CERT_VERIFY_FAILED = "cert-verify-failed"  # chain, EKU or name did not verify
    CERT_EXPIRED = "cert-expired"
    # WireGuard
    COOKIE_THEN_TIMEOUT = "cookie-then-timeout"  # server under load sent a cookie, retry unanswered
    # in-tunnel synthetic sessions (all protocols)
    TUNNEL_NO_REPLY = "tunnel-no-reply"  # handshake fine, no echo came back through the tunnel
    TUNNEL_LOSS = "tunnel-loss-over-threshold"
    TUNNEL_RTT = "tunnel-rtt-over-threshold"
    # OpenVPN
    RESET_IGNORED = "reset-ignored"  # no answer to a hard reset: likely a wrong wrapping key
    AUTH_FAILED = "auth-failed"  # AUTH_FAILED from the server, or IKE AUTHENTICATION_FAILED
    NO_PUSH_REPLY = "no-push-reply"
    # IKEv2
    NO_PROPOSAL_CHOSEN = "no-proposal-chosen"  # the responder is alive but shares no proposal
    CHILD_SA_FAILED = "child-sa-failed"  # IKE SA established, CHILD_SA refused
    INVALID_KE = "invalid-ke"  # retry with the requested group failed too
    # QUIC / MASQUE
    NO_ALPN = "no-alpn"
    CONNECT_REFUSED = "connect-refused"  # extended CONNECT answered with a non-2xx status
    # path MTU
    MTU_BLACK_HOLE = "mtu-black-hole"  # large DF packets vanish and no ICMP frag-needed arrives
    MTU_BELOW_MINIMUM = "mtu-below-minimum"
    # agent-side
    PROBE_ERROR = "probe-error"  # the probe itself failed (bug or local resource): never the node
    OVERLOADED = "overloaded"  # the agent refused to run the check: it could not time it honestly


class Quality(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """Measured quality of an in-tunnel (or L4) exchange. Times in seconds, loss as a ratio 0..1."""

    sent: int = 0
    received: int = 0
    loss_ratio: float = 0.0
    rtt_p50_seconds: float | None = None
    rtt_p99_seconds: float | None = None
    rtt_max_seconds: float | None = None


class Observation(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """One check's result at one instant from one vantage point."""

    node: str
    check: str  # check name from the config, e.g. "wg-handshake"; its kind and tier come from there
    vantage: str
    seq: int  # per-agent sequence number, strictly increasing, persisted across restarts
    wall_time: float  # agent wall clock at check start, Unix seconds
    ok: bool
    reason: Reason
    duration_seconds: float
    kind: str = ""  # check kind, e.g. "wireguard.handshake", "tcp"; lets the mesh tier it
    phases: dict[str, float] = msgspec.field(default_factory=dict)  # seconds by phase
    quality: Quality | None = None
    detail: str = ""  # human context for logs and the audit trail; never a metric label


class ObservationBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What an agent POSTs to the mesh. ``batch_seq`` lets the mesh reject replays."""

    version: int
    agent: str
    batch_seq: int
    sent_at: float
    observations: list[Observation]


class VerdictState(enum.StrEnum):
    UP = "UP"
    DEGRADED = "DEGRADED"
    DOWN = "DOWN"
    DRAINING = "DRAINING"
    MAINTENANCE = "MAINTENANCE"
    UNKNOWN = "UNKNOWN"


class VerdictReason(msgspec.Struct, frozen=True, omit_defaults=True):
    """One piece of evidence behind a verdict, for the audit log.

    ``what`` says which rule fired (e.g. "vote", "tier-cascade", "quality-bound", "pool-guard",
    "admin", "quorum-lost"); the other fields say where and by how much.
    """

    what: str
    vantage: str = ""
    check: str = ""
    reason: str = ""
    value: float | None = None
    bound: float | None = None
    note: str = ""


class Votes(msgspec.Struct, frozen=True, omit_defaults=True):
    up: int = 0
    degraded: int = 0
    down: int = 0
    excluded_stale: int = 0
    excluded_impaired: int = 0


class Verdict(msgspec.Struct, frozen=True, omit_defaults=True):
    """A node's state as decided by the mesh. ``seq`` increases by one per change per node."""

    node: str
    state: VerdictState
    previous: VerdictState
    seq: int
    decided_at: float
    reasons: list[VerdictReason] = msgspec.field(default_factory=list)
    votes: Votes = msgspec.field(default_factory=Votes)
    pool: str = ""
    quorum_lost: bool = False  # state kept from before because too few vantages could vote
    version: int = SCHEMA_VERSION

    @property
    def idempotency_key(self) -> str:
        return f"{self.node}:{self.seq}"


class SchemaError(ValueError):
    """A message did not match the schema. ``path`` names the offending field (``$.a[0].b``)."""

    def __init__(self, message: str, path: str = "$") -> None:
        super().__init__(message)
        self.path = path


_batch_decoder = msgspec.json.Decoder(ObservationBatch)
_verdict_decoder = msgspec.json.Decoder(Verdict)
_encoder = msgspec.json.Encoder()


def _schema_error(exc: Exception) -> SchemaError:
    if isinstance(exc, UnicodeDecodeError):  # invalid UTF-8 inside a JSON string
        return SchemaError(f"not valid UTF-8 at byte {exc.start}", "$")
    text = str(exc)
    path = "$"
    marker = " - at `"
    if marker in text:
        path = text.split(marker, 1)[1].rstrip("`")
    return SchemaError(text, path)


def encode(obj: Any) -> bytes:
    """Encode any schema struct (or list of them) to JSON bytes."""
    return _encoder.encode(obj)


def decode_batch(data: bytes) -> ObservationBatch:
    """Decode and validate an agent batch; raise :class:`SchemaError` naming the bad field."""
    try:
        batch = _batch_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise _schema_error(exc) from None
    if batch.version != SCHEMA_VERSION:
        raise SchemaError(f"unsupported schema version {batch.version}", "$.version")
    return batch


def decode_verdict(data: bytes) -> Verdict:
    try:
        return _verdict_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise _schema_error(exc) from None
