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
import ipaddress
import json
import math
import threading
from typing import Annotated, Any, TypeVar

import msgspec

SCHEMA_VERSION = 1

# Bounds of every number and string on the wire. A value outside them is a schema error naming
# the field: an unbounded integer once made every snapshot fail (msgpack holds 64 bits) and an
# unbounded batch_seq made SQLite raise OverflowError mid-transaction.
MAX_SEQ = 2**63 - 1  # seq, batch_seq: what SQLite and msgpack hold as a signed 64-bit integer
MAX_COUNT = 2**31 - 1  # packets sent/received in one check
MAX_SECONDS = 86_400.0  # a duration, phase or RTT: a check never takes a day
MAX_WALL_TIME = 1e10  # Unix seconds, year 2286: "a time", not 1e300
MAX_NAME = 256  # node, check, vantage, agent and kind names
MAX_DETAIL = 1024  # human context (the agent cuts it to 200)
MAX_PHASES = 32  # phases per observation, and ...
MAX_PHASE_NAME = 64  # ... the length of a phase's name
MAX_RATE = 1e13  # per second: packets, bytes (80 Tbit/s), drops of one node

Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_SECONDS)]
Ratio = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
WallTime = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_WALL_TIME)]
Rate = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_RATE)]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME)]
Phases = Annotated[
    dict[Annotated[str, msgspec.Meta(max_length=MAX_PHASE_NAME)], Seconds],
    msgspec.Meta(max_length=MAX_PHASES),
]


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
    # the user's path through the tunnel (docs/probes/user-path.md)
    EGRESS_FAILED = "egress-failed"  # the node answers inside the tunnel, nothing beyond it does
    DNS_TIMEOUT = "dns-timeout"  # the resolver never answered through the tunnel
    DNS_UNREACHABLE = "dns-unreachable"  # an ICMP unreachable came back for the query
    DNS_SERVFAIL = "dns-servfail"
    DNS_REFUSED = "dns-refused"
    DNS_WRONG_ANSWER = "dns-wrong-answer"  # NXDOMAIN, no address, or one not expected
    THROUGHPUT_LOW = "throughput-below-bound"  # quality: the burst's rate fell short
    QUEUEING_DELAY = "queueing-delay-over-bound"  # quality: RTT under load minus idle RTT
    REFLECTOR_NO_REPLY = "reflector-no-reply"  # quality: the burst was not answered at all
    # path MTU
    MTU_BLACK_HOLE = "mtu-black-hole"  # large DF packets vanish and no ICMP frag-needed arrives
    MTU_BELOW_MINIMUM = "mtu-below-minimum"
    # crypto policy scans
    WEAK_CRYPTO = "weak-crypto"  # the node accepted a deprecated algorithm the scan offered alone
    # agent-side
    PROBE_ERROR = "probe-error"  # the probe itself failed (bug or local resource): never the node
    OVERLOADED = "overloaded"  # the agent refused to run the check: it could not time it honestly

# failure reasons that say nothing about the node: the agent refused or failed to run the check
AGENT_SIDE_REASONS = frozenset({Reason.OVERLOADED, Reason.PROBE_ERROR})


class Tier(enum.StrEnum):
    """How deep a check goes: fast L4, functional handshake, synthetic session, node telemetry,
    node load. A property of the check kind; it sets the kind's default interval and the mesh's
    cascade."""

    L4 = "l4"
    FUNCTIONAL = "functional"
    SESSION = "session"
    TELEMETRY = "telemetry"  # node telemetry: feeds metrics, never reported to the mesh
    LOAD = "load"  # node load: feeds metrics and the mesh's weights, never verdicts
    POLICY = "policy"  # crypto policy scans: hourly, feed metrics and alerts, never verdicts


# the tiers that read what a node says about itself rather than probe it
NODE_READ_TIERS = frozenset({Tier.TELEMETRY, Tier.LOAD})
# the tiers whose results stay with the agent (metrics, --json), never sent to the mesh: what a
# node says about itself, and what it is willing to accept (a policy finding is not an outage)
LOCAL_TIERS = frozenset({*NODE_READ_TIERS, Tier.POLICY})


# Structs that hold only scalars (and a dict of floats) are never part of a reference cycle:
# ``gc=False`` keeps them out of the garbage collector, which otherwise tracks every observation
# of every batch the mesh decodes (and counts each towards its next collection).


class Quality(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True,
              gc=False):
    """Measured quality of an in-tunnel (or L4) exchange. Times in seconds, loss as a ratio 0..1."""

    sent: Count = 0
    received: Count = 0
    loss_ratio: Ratio = 0.0
    rtt_p50_seconds: Seconds | None = None
    rtt_p99_seconds: Seconds | None = None
    rtt_max_seconds: Seconds | None = None
    # a throughput burst's (docs/probes/user-path.md): the rate of inner IP bytes that reached
    # the far end, and the RTT under load minus the idle RTT. Meshes must be upgraded before
    # agents that send them: an older mesh refuses the unknown fields
    throughput_bytes_per_second: Rate | None = None
    queueing_delay_seconds: Seconds | None = None


class NodeLoad(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True,
               gc=False):
    """A node's load as read on the node (``telemetry.load``): the input of the mesh's weights.

    Rates are over ``interval_seconds``, the time between this read and the previous one of the
    same agent (counters in, rates out, on the agent). ``cpu_busy_ratio`` is the busier of the
    whole host and the VPN daemon's own share of the cores it may use (a single-threaded OpenVPN
    saturates one core while the host idles). ``effective_sessions`` counts sessions weighted by
    their traffic over the agent's window (docs/weights.md). None = not measured.
    """

    interval_seconds: Seconds
    cpu_busy_ratio: Ratio | None = None
    softnet_drops_per_second: Rate = 0.0
    softnet_squeezes_per_second: Rate = 0.0
    udp_receive_errors_per_second: Rate = 0.0
    packets_per_second: Rate = 0.0
    bytes_per_second: Rate = 0.0
    interface_drops_per_second: Rate = 0.0
    qdisc_backlog_packets: Rate = 0.0
    qdisc_drops_per_second: Rate = 0.0
    active_sessions: Count | None = None
    effective_sessions: Rate | None = None

    @property
    def drops_per_second(self) -> float:
        """Every drop the node counted: softnet backlog, UDP receive buffers, NIC, qdisc."""
        return (self.softnet_drops_per_second + self.udp_receive_errors_per_second
                + self.interface_drops_per_second + self.qdisc_drops_per_second)


class Observation(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True,
                  gc=False):
    """One check's result at one instant from one vantage point."""

    node: Name
    check: Name  # check name from the config, e.g. "wg-handshake"; kind and tier come from there
    vantage: Name
    # per-agent sequence number, strictly increasing within the batch's epoch, persisted across
    # restarts with the agent's state (an agent that lost its state starts again at 0 in a new
    # epoch: the mesh orders observations by (epoch, seq))
    seq: Seq
    wall_time: WallTime  # agent wall clock at check start, Unix seconds
    ok: bool
    reason: Reason
    duration_seconds: Seconds
    kind: Name = ""  # check kind, e.g. "wireguard.handshake", "tcp"
    # the tier the kind declares; absent from agents that predate it (the mesh then looks the
    # kind up in its tables). Meshes must be upgraded before agents: an older mesh refuses the
    # unknown field.
    tier: Tier | None = None
    phases: Phases = msgspec.field(default_factory=dict)  # seconds by phase
    quality: Quality | None = None
    detail: Annotated[str, msgspec.Meta(max_length=MAX_DETAIL)] = ""  # human context; never a label
    load: NodeLoad | None = None  # a node load read (telemetry.load): weights, never verdicts


# ---- path traces (agent -> mesh, optional in a batch) ------------------------------------------


class TraceProtocol(enum.StrEnum):
    """What the probes of a trace are: the node's own protocol and port where it matters."""

    UDP = "udp"
    TCP = "tcp"  # SYN to the port
    ICMP = "icmp"  # echo request


class HopReply(enum.StrEnum):
    """What answered a trace probe. The first two are routers on the way, the rest end a flow."""

    TIME_EXCEEDED = "time-exceeded"  # a router on the way: the probe's TTL ran out there
    FRAG_NEEDED = "frag-needed"  # a router could not forward a DF probe this big (``mtu``)
    UNREACHABLE = "unreachable"  # ICMP unreachable other than port/frag: no route, prohibited
    PORT_UNREACHABLE = "port-unreachable"  # the node itself: the UDP port is closed
    ECHO_REPLY = "echo-reply"  # the node itself, ICMP
    TCP_SYN_ACK = "tcp-syn-ack"  # the node itself, TCP port open
    TCP_RESET = "tcp-reset"  # the node itself, TCP port closed


class TraceStop(enum.StrEnum):
    """Why a flow stopped being probed."""

    REACHED = "reached"  # the node answered
    UNREACHABLE = "unreachable"  # a router answered unreachable (or frag-needed for big probes)
    GAP = "gap"  # ``gap_limit`` hops in a row answered nothing (also: a silent node, e.g. UDP VPN)
    LOOP = "loop"  # an address came back after a different one: a forwarding loop
    MAX_TTL = "max-ttl"
    LOCAL_ERROR = "local-error"  # our own stack refused to send (e.g. bigger than the link MTU)


class TraceTrigger(enum.StrEnum):
    CHANGE = "change"  # the agent's opinion of the node changed
    FAILING = "failing"  # re-traced while the agent sees the node failing
    BASELINE = "baseline"  # the slow schedule


MAX_HOPS = 64  # answers per flow
MAX_FLOWS = 16  # flows per trace
MAX_TRACES_PER_BATCH = 64
Ttl = Annotated[int, msgspec.Meta(ge=1, le=255)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Address = Annotated[str, msgspec.Meta(max_length=45)]  # an IP address: see check_traces


class TraceHop(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """One TTL of one flow. ``addr`` empty: nothing answered after every attempt."""

    ttl: Ttl
    addr: Address = ""
    reply: HopReply | None = None
    rtt_seconds: Seconds | None = None
    mtu: Port | None = None  # the next-hop MTU a frag-needed named


class PathFlow(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """One Paris flow: every probe has the same addresses, ports (``sport``; the ICMP identifier
    for ICMP) and size, so per-flow load balancing keeps all of them on one path."""

    sport: Port
    size: Annotated[int, msgspec.Meta(ge=28, le=65535)]  # IP packet size of its probes, bytes
    stop: TraceStop
    hops: Annotated[list[TraceHop], msgspec.Meta(max_length=MAX_HOPS)] = msgspec.field(
        default_factory=list)


class PathTrace(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """A trace of the path from a vantage to a node, taken when the agent's opinion of the node
    changed (or on its slow schedule). ``failing``: the agent saw the node failing then."""

    node: Name
    vantage: Name
    wall_time: WallTime  # agent wall clock at the start of the trace
    trigger: TraceTrigger
    failing: bool
    target: Address
    protocol: TraceProtocol
    port: Port = 0  # destination port; 0 for ICMP
    flows: Annotated[list[PathFlow], msgspec.Meta(max_length=MAX_FLOWS)] = msgspec.field(
        default_factory=list)
    duration_seconds: Seconds = 0.0


class ObservationBatch(msgspec.Struct, frozen=True, omit_defaults=True,
                       forbid_unknown_fields=True):
    """What an agent POSTs to the mesh. ``(epoch, batch_seq)`` lets the mesh reject replays.

    ``epoch`` is the agent instance's epoch: the agent's wall clock in milliseconds when its
    state directory was created (or when a mesh told it that epoch was behind, one above what
    the mesh had). It is kept in the state directory, so an ordinary restart keeps it; an agent
    that lost its state starts a newer one. ``batch_seq`` increases within the epoch. The
    mesh takes a batch whose position is above the agent's last accepted one (a newer epoch, or
    the same epoch and a higher batch_seq) and refuses the rest as replays; the signature and
    the timestamp window (:mod:`probes.model.signing`) make the position trustworthy and fresh.
    0 = no epoch (omitted on the wire): an agent from before epochs, or one talking to a mesh
    from before them (it refuses the unknown field; an agent sends the field to a mesh that
    lists ``"epoch"`` in its answers' ``accepts``, or that it has not heard from yet).

    ``traces`` is optional: agents from before path tracing never send it, and an agent sends it
    only to a mesh whose batch answers list ``"traces"`` in ``accepts`` (docs/paths.md)."""

    version: int
    agent: Name
    batch_seq: Seq
    sent_at: WallTime
    observations: list[Observation]
    epoch: Seq = 0
    traces: Annotated[list[PathTrace], msgspec.Meta(max_length=MAX_TRACES_PER_BATCH)] = (
        msgspec.field(default_factory=list))


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
    "admin", "quorum-lost", and from path traces "path", "vantage-path", "route-change"); the
    other fields say where and by how much. ``asn`` and ``hop`` locate path evidence: the network
    and the router address after which a vantage loses the node.
    """

    what: str
    vantage: str = ""
    check: str = ""
    reason: str = ""
    value: float | None = None
    bound: float | None = None
    note: str = ""
    asn: int | None = None
    hop: str = ""


class Votes(msgspec.Struct, frozen=True, omit_defaults=True):
    up: int = 0
    degraded: int = 0
    down: int = 0
    excluded_stale: int = 0
    excluded_impaired: int = 0


class Verdict(msgspec.Struct, frozen=True, omit_defaults=True):
    """A node's state as decided by the mesh. ``seq`` increases by one per change per node.

    ``epoch`` names the history the verdict belongs to: the store that logged it stamps it (a
    new, higher one whenever the history may have restarted: a reset or restored database).
    Verdicts order by ``(epoch, seq)``; within an epoch ``seq`` has no gaps. 0: logged before
    verdicts carried an epoch."""

    node: str
    state: VerdictState
    previous: VerdictState
    seq: Seq
    decided_at: float
    reasons: list[VerdictReason] = msgspec.field(default_factory=list)
    votes: Votes = msgspec.field(default_factory=Votes)
    pool: str = ""
    quorum_lost: bool = False  # state kept from before because too few vantages could vote
    # the node's published weight (percent of nominal) after this verdict; weights on only
    weight: int | None = None
    version: int = SCHEMA_VERSION
    epoch: Seq = 0  # milliseconds since 1970 when its store's history began (see above)

    @property
    def idempotency_key(self) -> str:
        """``node:epoch:seq`` (``node:seq`` for a verdict logged before epochs): unique across a
        reset store, whose seqs start at 1 again."""
        if self.epoch:
            return f"{self.node}:{self.epoch}:{self.seq}"
        return f"{self.node}:{self.seq}"

    @property
    def order(self) -> tuple[int, int]:
        """What receivers compare: a verdict is newer when this is greater."""
        return (self.epoch, self.seq)


class WeightReason(msgspec.Struct, frozen=True, omit_defaults=True):
    """One piece of evidence behind a weight.

    ``what``: a load signal that cut the weight (``cpu``, ``drops``, ``effective_sessions``,
    ...; ``value`` the smoothed figure, ``bound`` the step it reached, ``cut`` the share taken),
    or a rule that shaped it (``state``, ``degraded-cap``, ``slow-start``, ``max-step``,
    ``floor``, ``pool-guard``, ``load-stale``).
    """

    what: str
    value: float | None = None
    bound: float | None = None
    cut: float | None = None
    note: str = ""


class WeightChange(msgspec.Struct, frozen=True, omit_defaults=True):
    """A node's published weight changed. ``weight`` is percent of the node's nominal weight
    (0 = no new flows); ``seq`` increases by one per published change per node."""

    node: str
    weight: int
    previous: int | None
    seq: int
    decided_at: float
    state: VerdictState = VerdictState.UNKNOWN
    pool: str = ""
    reasons: list[WeightReason] = msgspec.field(default_factory=list)
    version: int = SCHEMA_VERSION

    @property
    def idempotency_key(self) -> str:
        return f"{self.node}:w{self.seq}"


class SchemaError(ValueError):
    """A message did not match the schema. ``path`` names the offending field (``$.a[0].b``)."""

    def __init__(self, message: str, path: str = "$") -> None:
        super().__init__(message)
        self.path = path


_batch_decoder = msgspec.json.Decoder(ObservationBatch)
traces_decoder = msgspec.json.Decoder(
    Annotated[list[PathTrace], msgspec.Meta(max_length=MAX_TRACES_PER_BATCH)])
_observation_decoder = msgspec.json.Decoder(Observation)
_verdict_decoder = msgspec.json.Decoder(Verdict)
_encoder = msgspec.json.Encoder()

T = TypeVar("T")


def _decode(decoder: msgspec.json.Decoder[T], data: bytes) -> T:
    """``decoder.decode(data)``, every failure a :class:`SchemaError` naming the field."""
    try:
        return decoder.decode(data)
    except UnicodeDecodeError as exc:  # invalid UTF-8 inside a JSON string
        raise SchemaError(f"not valid UTF-8 at byte {exc.start}", "$") from None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        text = str(exc)
        marker = " - at `"
        path = text.split(marker, 1)[1].rstrip("`") if marker in text else "$"
        raise SchemaError(text, path) from None


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as the list of its (key, value) pairs, duplicates kept."""


def _duplicate_path(value: Any, path: str) -> str | None:
    if isinstance(value, _Pairs):
        seen: set[str] = set()
        for key, item in value:
            here = f"{path}.{key}"
            if key in seen:
                return here
            seen.add(key)
            found = _duplicate_path(item, here)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _duplicate_path(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def reject_duplicate_keys(data: bytes, decoded: Any) -> None:
    """Raise :class:`SchemaError` naming the first key that appears twice in one object.

    The decoders keep the last of duplicate keys; another parser may keep the first, so a body
    with duplicates means different things to different readers and is refused. ``decoded`` is
    what the decoder made of ``data``: when encoding it gives ``data`` back byte for byte (the
    agents' bodies do), the body is canonical and has no duplicates, and the slower exact scan
    is skipped."""
    if _canonical(decoded, data):
        return
    try:
        parsed = json.loads(data, object_pairs_hook=_Pairs, parse_constant=_no_constant)
    except ValueError as exc:  # not JSON to the stdlib parser although the decoder took it
        raise SchemaError(f"not JSON: {exc}", "$") from None
    path = _duplicate_path(parsed, "$")
    if path is not None:
        raise SchemaError(f"duplicate key {path.rsplit('.', 1)[1]!r}", path)


class _Scratch(threading.local):
    """A thread's buffer for re-encoding a decoded body (the store thread decodes its journal
    at a restart while the loop may decode a request)."""

    def __init__(self) -> None:
        self.buffer = bytearray()


_scratch = _Scratch()
SCRATCH_KEPT = 4 * 1024 * 1024  # a buffer grown beyond this by a rare huge body is let go


def _canonical(decoded: Any, data: bytes) -> bool:
    """Whether encoding ``decoded`` gives ``data`` back, encoded into a buffer kept for the
    next body: a new bytes object per body (330 KB for 2,000 observations) cost a large
    allocation and its copy on every growth step."""
    buffer = _scratch.buffer
    _encoder.encode_into(decoded, buffer)
    same = buffer == data
    if len(buffer) > SCRATCH_KEPT:
        _scratch.buffer = bytearray()
    return same


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def strict_decode(decoder: msgspec.json.Decoder[Any], data: bytes) -> Any:
    """Decode and validate ``data`` (bounds included) and refuse duplicate keys; raise
    :class:`SchemaError` naming the bad field."""
    decoded = _decode(decoder, data)
    reject_duplicate_keys(data, decoded)
    return decoded


def encode(obj: Any) -> bytes:
    """Encode any schema struct (or list of them) to JSON bytes."""
    return _encoder.encode(obj)


def batch_body(agent: str, batch_seq: int, sent_at: float, bodies: list[bytes],
               traces: list[bytes] | None = None, *, epoch: int = 0) -> bytes:
    """An :class:`ObservationBatch` in JSON, from already encoded observations (the agent's
    spool keeps them encoded, so a batch is put together without decoding them again) and path
    traces (fields at their defaults are left out, as the struct's encoder does)."""
    enc = _encoder.encode
    extra = b',"traces":[' + b",".join(traces) + b"]" if traces else b""
    if epoch:
        extra += b',"epoch":' + enc(epoch)
    return (b'{"version":' + enc(SCHEMA_VERSION) + b',"agent":' + enc(agent)
            + b',"batch_seq":' + enc(batch_seq) + b',"sent_at":' + enc(sent_at)
            + b',"observations":[' + b",".join(bodies) + b"]" + extra + b"}")


def decode_batch(data: bytes) -> ObservationBatch:
    """Decode and validate an agent batch; raise :class:`SchemaError` naming the bad field."""
    batch: ObservationBatch = strict_decode(_batch_decoder, data)
    if batch.version != SCHEMA_VERSION:
        raise SchemaError(f"unsupported schema version {batch.version}", "$.version")
    if batch.traces:
        check_traces(batch.traces)
    return batch


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_traces(traces: list[PathTrace]) -> None:
    """What types cannot say: addresses are IP addresses, the TTLs of a flow increase."""
    for i, trace in enumerate(traces):
        at = f"$.traces[{i}]"
        if not _is_ip(trace.target):
            raise SchemaError(f"not an IP address: {trace.target!r}", f"{at}.target")
        for j, flow in enumerate(trace.flows):
            last = 0
            for k, hop in enumerate(flow.hops):
                where = f"{at}.flows[{j}].hops[{k}]"
                if hop.ttl <= last:
                    raise SchemaError("hop TTLs must increase", f"{where}.ttl")
                last = hop.ttl
                if hop.addr and not _is_ip(hop.addr):
                    raise SchemaError(f"not an IP address: {hop.addr!r}", f"{where}.addr")


def decode_recorded(data: bytes) -> list[Observation]:
    """One record of a recorded stream: an :class:`Observation`, or a whole
    :class:`ObservationBatch` (its observations, in order)."""
    if b'"observations"' in data:
        batch: ObservationBatch = strict_decode(_batch_decoder, data)
        return batch.observations
    return [strict_decode(_observation_decoder, data)]


def decode_verdict(data: bytes) -> Verdict:
    verdict: Verdict = strict_decode(_verdict_decoder, data)
    return verdict


def within_bounds(obs: Observation) -> Observation:
    """``obs`` with every number clamped into the wire bounds and strings cut to their limits.

    The agent passes each observation through this before spooling it: the mesh refuses a batch
    holding any out-of-range value (and the agent then drops the whole batch), so a probe that
    measured, say, a slightly negative RTT from two clocks must not cost the batch."""
    # The test of whether :func:`clamped` would change anything: no load (clamped field by
    # field), every number inside its bounds (NaN is not), every string within its length.
    # Written out test by test, in this function (no generators, no second call): it runs for
    # every observation, and when it passes (the common case, thousands a second) there is
    # nothing to clamp and nothing to copy.
    quality = obs.quality
    if quality is not None and not _quality_in_bounds(quality):
        return clamped(obs)
    phases = obs.phases
    if len(phases) > MAX_PHASES:
        return clamped(obs)
    for name, seconds in phases.items():
        if not (0.0 <= seconds <= MAX_SECONDS and len(name) <= MAX_PHASE_NAME):
            return clamped(obs)
    if (obs.load is None
            and 0 <= obs.seq <= MAX_SEQ
            and 0.0 <= obs.wall_time <= MAX_WALL_TIME
            and 0.0 <= obs.duration_seconds <= MAX_SECONDS
            and len(obs.node) <= MAX_NAME and len(obs.check) <= MAX_NAME
            and len(obs.vantage) <= MAX_NAME and len(obs.kind) <= MAX_NAME
            and len(obs.detail) <= MAX_DETAIL):
        return obs
    return clamped(obs)


def _quality_in_bounds(q: Quality) -> bool:
    p50, p99, top, queueing = (q.rtt_p50_seconds, q.rtt_p99_seconds, q.rtt_max_seconds,
                               q.queueing_delay_seconds)
    rate = q.throughput_bytes_per_second
    return (0 <= q.sent <= MAX_COUNT and 0 <= q.received <= MAX_COUNT
            and 0.0 <= q.loss_ratio <= 1.0
            and (p50 is None or 0.0 <= p50 <= MAX_SECONDS)
            and (p99 is None or 0.0 <= p99 <= MAX_SECONDS)
            and (top is None or 0.0 <= top <= MAX_SECONDS)
            and (queueing is None or 0.0 <= queueing <= MAX_SECONDS)
            and (rate is None or 0.0 <= rate <= MAX_RATE))


def clamped(obs: Observation) -> Observation:
    """``obs`` copied with every number clamped and every string cut (:func:`within_bounds`)."""
    quality = obs.quality
    if quality is not None:
        quality = Quality(
            sent=_clamp_int(quality.sent, MAX_COUNT),
            received=_clamp_int(quality.received, MAX_COUNT),
            loss_ratio=_clamp(quality.loss_ratio, 1.0),
            rtt_p50_seconds=_clamp_opt(quality.rtt_p50_seconds),
            rtt_p99_seconds=_clamp_opt(quality.rtt_p99_seconds),
            rtt_max_seconds=_clamp_opt(quality.rtt_max_seconds),
            throughput_bytes_per_second=(None if quality.throughput_bytes_per_second is None
                                        else _clamp(quality.throughput_bytes_per_second,
                                                    MAX_RATE)),
            queueing_delay_seconds=_clamp_opt(quality.queueing_delay_seconds),
        )
    phases = {k[:MAX_PHASE_NAME]: _clamp(v, MAX_SECONDS)
              for k, v in list(obs.phases.items())[:MAX_PHASES]}
    load = obs.load
    if load is not None:
        load = NodeLoad(
            interval_seconds=_clamp(load.interval_seconds, MAX_SECONDS),
            cpu_busy_ratio=(None if load.cpu_busy_ratio is None
                            else _clamp(load.cpu_busy_ratio, 1.0)),
            **{name: _clamp(getattr(load, name), MAX_RATE) for name in _LOAD_RATES},
            active_sessions=(None if load.active_sessions is None
                             else _clamp_int(load.active_sessions, MAX_COUNT)),
            effective_sessions=(None if load.effective_sessions is None
                                else _clamp(load.effective_sessions, MAX_RATE)))
    return msgspec.structs.replace(
        obs,
        node=obs.node[:MAX_NAME], check=obs.check[:MAX_NAME], vantage=obs.vantage[:MAX_NAME],
        kind=obs.kind[:MAX_NAME], seq=_clamp_int(obs.seq, MAX_SEQ),
        wall_time=_clamp(obs.wall_time, MAX_WALL_TIME),
        duration_seconds=_clamp(obs.duration_seconds, MAX_SECONDS),
        phases=phases, quality=quality, detail=obs.detail[:MAX_DETAIL], load=load)


_LOAD_RATES = ("softnet_drops_per_second", "softnet_squeezes_per_second",
               "udp_receive_errors_per_second", "packets_per_second", "bytes_per_second",
               "interface_drops_per_second", "qdisc_backlog_packets", "qdisc_drops_per_second")


def _clamp(value: float, high: float) -> float:
    return min(max(value, 0.0), high) if math.isfinite(value) else (high if value > 0 else 0.0)


def _clamp_opt(value: float | None) -> float | None:
    return None if value is None else _clamp(value, MAX_SECONDS)


def _clamp_int(value: int, high: int) -> int:
    return min(max(value, 0), high)
