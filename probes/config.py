"""Typed configuration: YAML in, typed structs or clear errors out.

Loading happens in three steps, each with errors that name the field:

1. YAML is parsed and every mapping key / sequence item is remembered with its line, so an error
   at ``$.targets[2].wireguard.port`` can say "line 41";
2. ``msgspec.convert`` checks types, required keys and unknown keys (a typo is an error, not a
   silently ignored setting); when it finds anything, :mod:`probes.configschema` walks the
   whole document and reports every such problem at the offending key's own path and line
   (and turns duration strings such as ``2s`` into seconds: :mod:`probes.duration`);
3. :meth:`AgentConfig.problems` checks what types cannot: files exist, node ids are unique,
   intervals are longer than timeouts, keys decode, exactly one OpenVPN wrapping is set, ...

All problems are reported together, so one run of ``tunnelwatch check-config`` shows every
mistake in a file. Relative file paths are resolved against the directory of the config file.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
import yaml

from probes.configschema import prepare
from probes.duration import Duration
from probes.model import signing
from probes.protocols import dns

# ---------------------------------------------------------------------------------------------
# errors


@dataclass(frozen=True, slots=True)
class Problem:
    path: str  # "$.targets[0].wireguard.port"
    message: str
    line: int | None = None
    # a key or token file the config names that does not exist (absolute): what
    # `tunnelwatch keygen secrets CONFIG` creates
    missing_secret: str = ""

    def __str__(self) -> str:
        where = f"{self.path} (line {self.line})" if self.line else self.path
        return f"{where}: {self.message}"


class ConfigError(ValueError):
    """The configuration is not valid. ``problems`` lists every problem found."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


# ---------------------------------------------------------------------------------------------
# building blocks

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_INTERFACE = re.compile(r"^[A-Za-z0-9._-]{1,15}$")  # Linux IFNAMSIZ - 1, no '/' or spaces


class Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base for config sections: unknown keys are errors."""


class TierPolicy(Strict, kw_only=True, frozen=True):
    """How often and how patiently one tier of checks runs.

    ``fast_interval`` is HAProxy's ``fastinter``: after an outcome differs from the last settled
    one the check is re-run at this interval until ``rise``/``fall`` settle it.
    """

    interval: Duration
    timeout: Duration
    fast_interval: Duration | None = None
    rise: int = 2
    fall: int = 3
    jitter: float = 0.1  # share of the interval; start offsets are spread over the whole interval


def _default_tiers() -> dict[str, TierPolicy]:
    return {
        "l4": TierPolicy(interval=2.0, timeout=1.0, fast_interval=0.5),
        "functional": TierPolicy(interval=15.0, timeout=5.0, fast_interval=2.0),
        "session": TierPolicy(interval=60.0, timeout=10.0, fast_interval=10.0),
        "telemetry": TierPolicy(interval=30.0, timeout=10.0),
        "load": TierPolicy(interval=1.0, timeout=0.8),
        # crypto policy scans: a node's policy changes with its config, not by the second;
        # start offsets spread over the hour, and each run jittered
        "policy": TierPolicy(interval=3600.0, timeout=60.0, jitter=0.2),
    }


class WireGuardTarget(Strict, kw_only=True, frozen=True):
    port: int = 51820
    server_public_key: str  # base64, as `wg` prints it
    private_key_file: str  # this agent's own key for this node: one key per agent per node
    preshared_key_file: str | None = None
    tunnel_address: str | None = None  # this agent's AllowedIPs address, e.g. 10.201.0.2/32
    canary: str | None = None  # in-tunnel address to ping in session checks
    echo_count: int = 5  # in-tunnel echoes per session check
    echo_interval: Duration = 0.05  # seconds between in-tunnel echoes
    loss_threshold: float = 0.5  # a session fails above this in-tunnel loss ratio
    rtt_threshold: Duration | None = None  # ... or above this median in-tunnel RTT (seconds)
    # the resolver user_path.dns queries through this tunnel (WireGuard pushes none)
    dns_resolver: str | None = None


class OpenVPNTarget(Strict, kw_only=True, frozen=True):
    port: int = 1194
    proto: Literal["udp", "tcp"] = "udp"
    ca_file: str | None = None  # the CA that signed the server; needed from level tls on
    cert_file: str | None = None
    key_file: str | None = None
    tls_crypt_file: str | None = None
    tls_auth_file: str | None = None
    key_direction: int | None = None
    auth_digest: str = "SHA1"
    tls_crypt_v2_file: str | None = None
    auth_user_pass_file: str | None = None
    level: Literal["reset", "tls", "session", "tunnel"] = "session"
    # the server's data-channel framing (--comp-lzo / --compress); a pushed value wins
    compression: Literal["none", "comp-lzo", "compress", "compress-v2"] = "none"
    echo_count: int = 5  # in-tunnel echoes at the tunnel level
    echo_interval: Duration = 0.05  # seconds between them
    # the resolver user_path.dns queries; default: the first dhcp-option DNS the node pushes
    dns_resolver: str | None = None
    # crypto policy scan (check openvpn.policy, tier policy): TLS 1.0/1.1, RSA key transport,
    # (with tls-auth) MD5/SHA1 digests and (with ca_file) the BF-CBC and none data ciphers
    # offered alone, each must be refused
    policy_scan: bool = False
    # the deprecated choices to offer (docs/crypto-policy.md); default: all of them
    policy_items: list[str] | None = None


class IKEv2Target(Strict, kw_only=True, frozen=True):
    port: int = 500
    local_id: str | None = None  # our IDi (FQDN or IPv4); default tunnelwatch-probe
    remote_id: str | None = None  # the responder must identify as this (IDr)
    # the pre-shared key as plain text, read as is (not swanctl's notation, where a secret
    # starting "0x" is hex and "0s" base64): auth and tunnel levels
    psk_file: str | None = None
    # a responder that authenticates with a certificate (the probe still uses the PSK): the
    # CA(s) its chain must lead to; its dates are reported like OpenVPN's
    ca_file: str | None = None
    # IKE proposals in strongSwan notation, e.g. aes256gcm16-prfsha256-ecp256
    proposals: list[str] = msgspec.field(default_factory=lambda: ["aes256gcm16-prfsha256-ecp256"])
    # the deepest check to run: init (alive, proposal), auth (PSK IKE SA), tunnel (ESP echoes);
    # default: as deep as psk_file and ping allow
    level: Literal["init", "auth", "tunnel"] | None = None
    ping: str | None = None  # address behind the responder for the tunnel level
    inner_address: str | None = None  # our source inside the tunnel; default: from TSi
    echo_count: int = 5  # ICMP echoes at the tunnel level
    force_nat_t: bool = False  # pretend to be behind NAT so the exchange floats to UDP 4500
    # tunnel level: ask for an inner address and resolvers in IKE_AUTH (a CP request for
    # INTERNAL_IP4_ADDRESS and INTERNAL_IP4_DNS, as remote-access clients do); the user-path
    # DNS check then asks the INTERNAL_IP4_DNS resolver unless dns_resolver is set
    request_config: bool = False
    dns_resolver: str | None = None  # the resolver the user-path DNS check asks
    # crypto policy scan (check ikev2.policy, tier policy): offer each deprecated proposal
    # (and a CHILD_SA without PFS) alone and expect refusal; accepted SAs are finished with
    # psk_file and deleted
    policy_scan: bool = False
    # the deprecated choices to offer (docs/crypto-policy.md); default: all of them
    policy_items: list[str] | None = None


class QUICTarget(Strict, kw_only=True, frozen=True):
    port: int = 443
    server_name: str | None = None  # SNI and the name to verify; default: the address
    ca_file: str | None = None  # PEM CA bundle; default: certifi's bundle
    verify: bool = True  # verify the server certificate
    alpn: str = "h3"  # the ALPN to offer
    resume: bool = False  # handshake again with the session ticket (resumption, 0-RTT facts)
    connect_udp_target: str | None = None  # host:port echoed through MASQUE CONNECT-UDP
    connect_ip: bool = False  # run CONNECT-IP (also when `checks:` names quic.connect-ip)
    ip_ping: str | None = None  # CONNECT-IP: ICMP-echo this IPv4 address inside the tunnel
    echo_count: int = 5  # echoes through the proxy
    echo_interval: Duration = 0.05  # seconds between them
    payload_size: int = 32  # echo payload bytes (0..1100)
    loss_threshold: float = 0.5  # fail above this loss ratio
    rtt_threshold: Duration | None = None  # fail above this median RTT (seconds)


class MTUTarget(Strict, kw_only=True, frozen=True):
    """Path-MTU probing: DF-set probes of shrinking size (docs/probes/mtu.md)."""

    port: int | None = None  # the node's UDP echo port (mtu.udp); none: ICMP echo (mtu.icmp)
    max_size: int | None = None  # largest IP packet to try; default: the route MTU
    min_size: int | None = None  # floor that must pass; default 576 (IPv4) / 1280 (IPv6)
    required_mtu: int | None = None  # below this the check fails (mtu-below-minimum)
    attempts: int = 2  # tries per size before silence counts as too big
    probe_wait: Duration = 0.3  # seconds to wait for each echo


class L4Target(Strict, kw_only=True, frozen=True):
    tcp_ports: list[int] = msgspec.field(default_factory=list)
    udp: list[UDPExchange] = msgspec.field(default_factory=list)
    icmp: bool = False


class UDPExchange(Strict, kw_only=True, frozen=True):
    port: int
    send_hex: str = ""
    expect_hex: str | None = None  # prefix the reply must start with; None = any reply


class NodeLogin(Strict, kw_only=True, frozen=True):
    """How the agent logs in to a node over SSH (asyncssh, key-based) to read its telemetry."""

    host: str | None = None  # default: the target's address
    port: int = 22
    username: str | None = None  # default: the agent's own user name
    key_file: str | None = None  # private key; default: the agent user's ~/.ssh keys
    known_hosts_file: str | None = None  # default: the agent user's ~/.ssh/known_hosts
    verify_host_key: bool = True  # false skips host key verification: lab use only


class LoadTarget(Strict, kw_only=True, frozen=True):
    """Node load for the mesh's weights (docs/weights.md): CPU, softnet, UDP receive errors,
    interface rates and drops, qdisc drops and backlog, and effective sessions from the
    protocols this telemetry section reads; every ``load`` tier interval (1 s by default)."""

    interfaces: list[str] = msgspec.field(default_factory=list)  # counted; empty: all but lo
    qdisc: bool = True  # read `tc -s qdisc show` (drops and backlog of the root qdiscs)
    daemon_pid_file: str | None = None  # the VPN daemon: its own CPU share counts too
    daemon_cores: float = 1.0  # cores the daemon can use (1 for single-threaded OpenVPN)
    # whose CPU counts: the busier of the host and the daemon ("both"), or one of them ("daemon"
    # where nodes share a host's CPUs, as network namespaces do)
    cpu: Literal["both", "host", "daemon"] = "both"
    netns: str | None = None  # read locally inside this network namespace (not with ssh)
    effective_window_seconds: Duration = 30.0  # "traffic in the last N seconds"
    session_unit_bytes_per_second: float = 125_000.0  # one effective session's worth


class TelemetryTarget(Strict, kw_only=True, frozen=True):
    """Node telemetry: what the node says about its own sessions (active peers, reconnects,
    bytes), read on the node every ``telemetry`` tier interval, locally when the agent runs on
    the node, else over SSH. It feeds metrics, never verdicts (docs/agent.md, "Node telemetry").
    """

    ssh: NodeLogin | None = None  # none: run the commands on the agent's own host
    wireguard_interface: str | None = None  # read with `wg show <interface> dump`
    openvpn_management_socket: str | None = None  # the server's `--management <path> unix`
    ikev2: bool = False  # read charon's SAs with `swanctl --list-sas`
    ikev2_vici_uri: str | None = None  # charon's VICI socket; default: swanctl's default
    load: LoadTarget | None = None  # node load for the mesh's weights (tier ``load``)


class EgressTarget(Strict, kw_only=True, frozen=True):
    name: str  # its label in metrics and details (from the config: a bounded label)
    address: str  # an IPv4 address beyond the node, which the node must forward and NAT to
    udp_port: int | None = None  # a `tunnelwatch reflector` there: UDP echoes beside ICMP


class EgressCheck(Strict, kw_only=True, frozen=True):
    """Echoes through the tunnel to addresses beyond the node (``<protocol>.egress``)."""

    targets: list[EgressTarget]
    echo_count: int = 3  # echoes per target and protocol (ICMP, and UDP where a port is set)
    echo_interval: Duration = 0.05  # seconds between echoes
    min_targets: int = 1  # targets that must answer; fewer fail with egress-failed


class DnsCheck(Strict, kw_only=True, frozen=True):
    """A query through the tunnel to the node's resolver (``<protocol>.dns``): the protocol
    section's ``dns_resolver``, or what the node pushes (OpenVPN dhcp-option DNS, IKEv2
    INTERNAL_IP4_DNS with ``request_config``)."""

    name: str  # the name to resolve, e.g. probe.example.com
    type: Literal["A", "AAAA"] = "A"
    expect: list[str] = msgspec.field(default_factory=list)  # allowed answers; empty: any
    attempts: int = 2  # queries (same id) before dns-timeout
    attempt_timeout: Duration = 1.0  # seconds to wait for each


class ThroughputCheck(Strict, kw_only=True, frozen=True):
    """A short rate-capped UDP burst to a `tunnelwatch reflector` beyond the node
    (``<protocol>.throughput``): achieved rate, loss and queueing delay, as quality (DEGRADED
    bounds, never DOWN on their own). Runs no more often than the budget allows."""

    reflector: str  # HOST:PORT of the reflector, an IPv4 address beyond the node
    rate: float = 2_000_000.0  # offered bits per second (inner IP bytes): never exceeded
    duration: float = 1.0  # seconds the burst lasts
    packet_size: int = 1200  # inner IP packet bytes (68..1500)
    min_rate: float | None = None  # bits/s reached below this: throughput-below-bound;
    # default: half of rate
    max_queueing_delay: float = 0.1  # seconds of RTT under load above idle RTT, at most
    idle_echoes: int = 5  # spaced requests before the burst: the idle RTT
    # bytes every throughput check of this node may send per hour, all protocols together
    # (per agent); the check runs no more often than that allows
    budget_bytes_per_hour: float = 5_000_000.0


class TransactionCheck(Strict, kw_only=True, frozen=True):
    """One TCP connection through the tunnel to a server beyond the node
    (``<protocol>.transaction``), on the agent's own user-space TCP (no kernel interface): the
    handshake, a TLS handshake (``tls``), an HTTP HEAD (``http_path``), then FIN."""

    address: str  # an IPv4 address beyond the node, which the node must forward and NAT to
    port: int = 443
    tls: bool = True  # a TLS handshake after the TCP one
    server_name: str | None = None  # TLS: SNI and the name to verify; default: the address
    ca_file: str | None = None  # TLS: PEM CA bundle; default: the system trust store
    verify: bool = True  # TLS: verify the server's certificate
    http_path: str | None = "/"  # an HTTP HEAD of this path (Host: server_name); null: none
    expect_status: list[int] = msgspec.field(default_factory=list)  # allowed; empty: any
    mss: int = 1200  # TCP maximum segment size we announce (fits the tunnel's inner MTU)
    connect_timeout: Duration = 3.0  # seconds for the SYN-ACK (the SYN resent meanwhile)


class UserPathTarget(Strict, kw_only=True, frozen=True):
    """What a user gets through the tunnel (docs/probes/user-path.md): each subsection adds one
    check per tunnel protocol in ``via`` (session tier)."""

    # the tunnels to test through; empty: every one this target configures that carries
    # traffic (wireguard with tunnel_address and canary, openvpn beyond level reset, ikev2
    # with psk_file and ping at level tunnel or unset)
    via: list[Literal["wireguard", "openvpn", "ikev2"]] = msgspec.field(default_factory=list)
    egress: EgressCheck | None = None
    dns: DnsCheck | None = None
    throughput: ThroughputCheck | None = None
    transaction: TransactionCheck | None = None


class Target(Strict, kw_only=True, frozen=True):
    id: str
    pool: str
    pop: str
    region: str
    address: str
    wireguard: WireGuardTarget | None = None
    openvpn: OpenVPNTarget | None = None
    ikev2: IKEv2Target | None = None
    quic: QUICTarget | None = None
    l4: L4Target | None = None
    mtu: MTUTarget | None = None
    telemetry: TelemetryTarget | None = None  # node telemetry reads: metrics, never verdicts
    # egress, DNS and throughput through the tunnels above
    user_path: UserPathTarget | None = None
    # check kinds to run against this node; empty = every check its protocols allow
    checks: list[str] = msgspec.field(default_factory=list)


class AgentIdentity(Strict, kw_only=True, frozen=True):
    vantage: str
    asn: int | None = None
    region: str = ""
    cloud: str = ""
    listen: str = "127.0.0.1:9470"  # /metrics, /probe, /healthz
    state_dir: str = "state"  # sequence numbers, spool, WireGuard timestamps
    max_concurrency: int = 256
    per_node_concurrency: int = 4
    max_probe_rate: float = 2500.0  # probe starts/s admitted; checks beyond it are refused
    # re-probes the mesh may ask for (another vantage saw a check fail), per second; bursts of
    # twice this; 0 honours none
    max_reprobe_rate: float = 10.0
    max_start_lag: Duration = 0.05  # seconds; a probe that cannot start this close to its slot is
    # not run (reason "overloaded") rather than timed dishonestly


class MeshEndpoints(Strict, kw_only=True, frozen=True):
    endpoints: list[str]
    key_id: str
    key_file: str
    batch_max: int = 500
    flush_interval: Duration = 1.0
    spool_max_bytes: int = 64 * 1024 * 1024
    # honour the re-probe requests the mesh sends in its replies (corroboration on demand)
    reprobe: bool = True


class TracingConfig(Strict, kw_only=True, frozen=True):
    """Path traces toward the nodes (docs/paths.md): Paris-style, with each node's own
    protocol and port, when this agent's opinion of a node changes and on a slow baseline
    schedule; sent to the mesh with the observations. Needs raw sockets (root or
    CAP_NET_RAW); without them the agent logs it once and traces nothing. IPv4 only."""

    enabled: bool = True
    baseline_interval: Duration = 1800.0  # seconds between baseline traces of each node; 0: none
    failing_interval: Duration = 300.0  # re-trace a node this often while it fails here; 0: never
    min_interval: Duration = 60.0  # seconds between the traces a node's changes ask for
    max_per_minute: float = 60.0  # all traces of this agent
    concurrency: int = 2  # traces at once
    flows: int = 4  # source ports per trace when a node changes (load-balanced branches)
    baseline_flows: int = 1  # source ports per baseline trace
    big_probe_size: int = 1500  # bytes: large DF probes on the first flow find MTU drops; 0: none
    max_ttl: int = 30
    probe_timeout: Duration = 1.0  # seconds to wait for each probe's answer
    attempts: int = 2  # probes per hop before it counts as silent (rate-limited routers)
    gap_limit: int = 3  # silent hops in a row that end a flow (a silent node ends it too)
    packets_per_second: float = 100.0  # per trace


class AgentConfig(Strict, kw_only=True, frozen=True):
    agent: AgentIdentity
    targets: list[Target]
    tiers: dict[str, TierPolicy] = msgspec.field(default_factory=_default_tiers)
    mesh: MeshEndpoints | None = None
    paths: TracingConfig = msgspec.field(default_factory=TracingConfig)

    def problems(self, base_dir: Path) -> list[Problem]:
        return list(_agent_problems(self, base_dir))

    def target(self, node_id: str) -> Target:
        for t in self.targets:
            if t.id == node_id:
                return t
        raise KeyError(node_id)


# ---------------------------------------------------------------------------------------------
# semantic checks


def _check_file(path: str | None, field: str, base_dir: Path) -> Iterator[Problem]:
    if path is None:
        return
    resolved = resolve_path(path, base_dir)
    if not resolved.is_file():
        yield Problem(field, f"file not found: {resolved}")


def check_secret_file(path: str | None, field: str, base_dir: Path) -> Iterator[Problem]:
    """An HMAC key or token file: it exists, only its owner may read it, it holds at least 32
    bytes (the mesh and the agent refuse to start otherwise, with the same one line)."""
    if path is None:
        return
    file = resolve_path(path, base_dir)
    problem = signing.key_file_problem(file)
    if problem is not None:
        yield Problem(field, problem, missing_secret="" if file.exists() else str(file))


def resolve_path(path: str, base_dir: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base_dir / p


def _check_port(port: int, field: str) -> Iterator[Problem]:
    if not 1 <= port <= 65535:
        yield Problem(field, f"port must be 1..65535, got {port}")


def _check_ip(value: str | None, field: str, *, network: bool = False) -> Iterator[Problem]:
    if value is None:
        return
    try:
        if network:
            ipaddress.ip_interface(value)
        else:
            ipaddress.ip_address(value)
    except ValueError:
        kind = "an address with prefix (A.B.C.D/32)" if network else "an IP address"
        yield Problem(field, f"expected {kind}, got {value!r}")


def _check_wg_key(value: str, field: str) -> Iterator[Problem]:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        yield Problem(field, "expected a base64 WireGuard public key (44 characters)")
        return
    if len(raw) != 32:
        yield Problem(field, f"expected a 32-byte key, got {len(raw)} bytes")


def _tier_problems(name: str, tier: TierPolicy) -> Iterator[Problem]:
    at = f"$.tiers.{name}"
    if tier.timeout <= 0:
        yield Problem(f"{at}.timeout", f"must be > 0, got {tier.timeout:g}")
    if tier.interval <= tier.timeout:
        yield Problem(f"{at}.interval",
                      f"must be longer than timeout ({tier.interval:g} <= {tier.timeout:g})")
    if tier.fast_interval is not None and not 0 < tier.fast_interval <= tier.interval:
        yield Problem(f"{at}.fast_interval", "must be > 0 and <= interval")
    if tier.rise < 1 or tier.fall < 1:
        yield Problem(f"{at}.rise" if tier.rise < 1 else f"{at}.fall", "must be >= 1")
    if not 0 <= tier.jitter <= 0.5:
        yield Problem(f"{at}.jitter", f"must be within 0..0.5, got {tier.jitter:g}")


MAX_ECHO_PAYLOAD = 1100  # bytes in one echo through a MASQUE proxy (fits a QUIC datagram)
_MTU_RANGE = (68, 65535)


def split_host_port(text: str, *, default_host: str | None = None,
                    ephemeral: bool = False) -> tuple[str, int | None]:
    """``HOST``, ``HOST:PORT``, ``[V6]`` or ``[V6]:PORT`` (a bare IPv6 address has no port) ->
    (host, port or None); ValueError naming what is wrong. The one host:port parser: nodes,
    listen addresses, endpoints. ``:PORT`` means ``default_host`` where there is one; port 0
    (the OS picks one) only for a listen address that says ``ephemeral``."""
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise ValueError(f"expected [IPV6]:PORT, got {text!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, None  # a name, an IPv4 address or a bare IPv6 address
    if not host.strip():
        if default_host is None:
            raise ValueError(f"no host in {text!r}")
        host = default_host
    if port_text is None:
        return host, None
    lowest = 0 if ephemeral else 1
    if not port_text.isdigit() or not lowest <= int(port_text) <= 65535:
        raise ValueError(f"port must be {lowest}..65535, got {port_text!r} in {text!r}")
    return host, int(port_text)


def parse_host_port(text: str, default_port: int | None = None, *,
                    default_host: str | None = None, ephemeral: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` (``HOST`` alone when there is a ``default_port``)."""
    host, port = split_host_port(text, default_host=default_host, ephemeral=ephemeral)
    if port is None:
        if default_port is None or (":" in host and not text.startswith("[")):
            raise ValueError(f"expected HOST:PORT (an IPv6 address as [ADDRESS]:PORT), "
                             f"got {text!r}")
        port = default_port
    return host, port


def host_port_problems(text: str, at: str, *, listen: bool = False,
                       ephemeral: bool = False) -> Iterator[Problem]:
    """What ``HOST:PORT`` would refuse, found at load time; a ``listen`` address may be
    ``:PORT`` (127.0.0.1): an agent with ``listen: 127.0.0.1`` (no port) passed check-config and
    then died starting."""
    try:
        parse_host_port(text, default_host="127.0.0.1" if listen else None, ephemeral=ephemeral)
    except ValueError as exc:
        yield Problem(at, str(exc))


def _echo_problems(at: str, count: int, interval: float, loss: float | None = None,
                   rtt: float | None = None) -> Iterator[Problem]:
    if count < 1:
        yield Problem(f"{at}.echo_count", f"must be >= 1, got {count}")
    if not interval >= 0:
        yield Problem(f"{at}.echo_interval", f"must be >= 0, got {interval:g}")
    if loss is not None and not 0 <= loss <= 1:
        yield Problem(f"{at}.loss_threshold", f"must be within 0..1, got {loss:g}")
    if rtt is not None and not rtt > 0:
        yield Problem(f"{at}.rtt_threshold", f"must be > 0, got {rtt:g}")


def wireguard_problems(w: WireGuardTarget, at: str, base_dir: Path) -> Iterator[Problem]:
    yield from _check_port(w.port, f"{at}.port")
    yield from _check_wg_key(w.server_public_key, f"{at}.server_public_key")
    yield from _check_file(w.private_key_file, f"{at}.private_key_file", base_dir)
    yield from _check_file(w.preshared_key_file, f"{at}.preshared_key_file", base_dir)
    yield from _check_ip(w.tunnel_address, f"{at}.tunnel_address", network=True)
    yield from _check_ip(w.canary, f"{at}.canary")
    if (w.canary is None) != (w.tunnel_address is None):
        yield Problem(at, "tunnel_address and canary go together (session checks need both)")
    yield from _echo_problems(at, w.echo_count, w.echo_interval, w.loss_threshold,
                              w.rtt_threshold)
    if w.dns_resolver is not None:
        yield from _ipv4_problems(w.dns_resolver, f"{at}.dns_resolver")


def ikev2_problems(i: IKEv2Target, at: str, base_dir: Path) -> Iterator[Problem]:
    yield from _check_port(i.port, f"{at}.port")
    yield from _check_file(i.psk_file, f"{at}.psk_file", base_dir)
    yield from _check_file(i.ca_file, f"{at}.ca_file", base_dir)
    yield from _check_ip(i.ping, f"{at}.ping")
    yield from _check_ip(i.inner_address, f"{at}.inner_address")
    if i.dns_resolver is not None:
        yield from _ipv4_problems(i.dns_resolver, f"{at}.dns_resolver")
    # the IKEv2 core and its cryptography are loaded only for a config with an ikev2 section
    from probes.protocols.ikev2 import IKEv2Error  # noqa: PLC0415
    from probes.protocols.ikev2.proposals import parse_ike_proposals  # noqa: PLC0415

    try:
        parse_ike_proposals(i.proposals)
    except IKEv2Error as exc:
        yield Problem(f"{at}.proposals", str(exc))
    from probes.protocols.ikev2.policy import (  # noqa: PLC0415
        DEFAULT_ITEMS as IKEV2_POLICY_ITEMS,
    )

    for n, item in enumerate(i.policy_items or ()):
        if item not in IKEV2_POLICY_ITEMS:
            yield Problem(f"{at}.policy_items[{n}]", f"unknown item {item!r}; known: "
                          f"{', '.join(IKEV2_POLICY_ITEMS)}")
    if i.policy_scan and i.psk_file is None:
        yield Problem(f"{at}.policy_scan", "the policy scan needs psk_file (each accepted offer "
                      "is finished and deleted, never left half-open)")
    if i.level in ("auth", "tunnel") and i.psk_file is None:
        yield Problem(f"{at}.level", f"level {i.level} needs psk_file")
    yield from _echo_problems(at, i.echo_count, 0.0)


def quic_problems(q: QUICTarget, at: str, base_dir: Path) -> Iterator[Problem]:
    yield from _check_port(q.port, f"{at}.port")
    yield from _check_file(q.ca_file, f"{at}.ca_file", base_dir)
    if q.connect_udp_target is not None:
        yield from host_port_problems(q.connect_udp_target, f"{at}.connect_udp_target")
    if q.ip_ping is not None:
        yield from _check_ip(q.ip_ping, f"{at}.ip_ping")
        if not q.connect_ip:
            yield Problem(f"{at}.ip_ping", "only applies with connect_ip")
    if not 0 <= q.payload_size <= MAX_ECHO_PAYLOAD:
        yield Problem(f"{at}.payload_size", f"must be 0..{MAX_ECHO_PAYLOAD}, got {q.payload_size}")
    yield from _echo_problems(at, q.echo_count, q.echo_interval, q.loss_threshold,
                              q.rtt_threshold)


def mtu_problems(m: MTUTarget, at: str, base_dir: Path) -> Iterator[Problem]:
    if m.port is not None:
        yield from _check_port(m.port, f"{at}.port")
    low, high = _MTU_RANGE
    for name, value in (("max_size", m.max_size), ("min_size", m.min_size),
                        ("required_mtu", m.required_mtu)):
        if value is not None and not low <= value <= high:
            yield Problem(f"{at}.{name}", f"must be {low}..{high} bytes, got {value}")
    if m.min_size and m.max_size and m.min_size > m.max_size:
        yield Problem(f"{at}.min_size", "must not exceed max_size")
    if m.attempts < 1:
        yield Problem(f"{at}.attempts", f"must be >= 1, got {m.attempts}")
    if not m.probe_wait > 0:
        yield Problem(f"{at}.probe_wait", f"must be > 0, got {m.probe_wait:g}")


def openvpn_problems(o: OpenVPNTarget, at: str, base_dir: Path) -> Iterator[Problem]:
    yield from _check_port(o.port, f"{at}.port")
    from probes.protocols.openvpn.policy import (  # noqa: PLC0415
        DEFAULT_ITEMS as OPENVPN_POLICY_ITEMS,
    )

    for n, item in enumerate(o.policy_items or ()):
        if item not in OPENVPN_POLICY_ITEMS:
            yield Problem(f"{at}.policy_items[{n}]", f"unknown item {item!r}; known: "
                          f"{', '.join(OPENVPN_POLICY_ITEMS)}")
    wraps = [n for n in ("tls_crypt_file", "tls_auth_file", "tls_crypt_v2_file")
             if getattr(o, n) is not None]
    if len(wraps) > 1:
        yield Problem(at, f"set at most one control-channel wrapping, got {', '.join(wraps)}")
    if o.key_direction is not None and o.key_direction not in (0, 1):
        yield Problem(f"{at}.key_direction", f"must be 0 or 1, got {o.key_direction}")
    if o.key_direction is not None and o.tls_auth_file is None:
        yield Problem(f"{at}.key_direction", "only applies with tls_auth_file")
    if (o.cert_file is None) != (o.key_file is None):
        yield Problem(at, "cert_file and key_file go together")
    for name in ("ca_file", "cert_file", "key_file", "tls_crypt_file", "tls_auth_file",
                 "tls_crypt_v2_file", "auth_user_pass_file"):
        yield from _check_file(getattr(o, name), f"{at}.{name}", base_dir)
    if o.ca_file is None and o.level != "reset":
        yield Problem(f"{at}.ca_file", f"required from level tls on (level is {o.level})")
    yield from _echo_problems(at, o.echo_count, o.echo_interval)
    if o.dns_resolver is not None:
        yield from _ipv4_problems(o.dns_resolver, f"{at}.dns_resolver")


def carrying_tunnels(t: Target) -> list[str]:
    """The tunnel sections of ``t`` that carry traffic, in ``user_path.via`` order or (``via``
    empty) every one that can: wireguard with tunnel_address and canary, openvpn beyond level
    reset, ikev2 with psk_file and ping (the node's own inner address: the egress check tells
    "the node answers" from "nothing answers" by it) at level tunnel or unset."""
    able = {
        "wireguard": t.wireguard is not None and t.wireguard.tunnel_address is not None
        and t.wireguard.canary is not None,
        "openvpn": t.openvpn is not None and t.openvpn.level != "reset",
        "ikev2": t.ikev2 is not None and t.ikev2.psk_file is not None
        and t.ikev2.ping is not None and t.ikev2.level in (None, "tunnel"),
    }
    via = t.user_path.via if t.user_path is not None and t.user_path.via else list(able)
    return [name for name in via if able[name]]


def _ipv4_problems(value: str, at: str) -> Iterator[Problem]:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        yield Problem(at, f"expected an IPv4 address (inner traffic is IPv4), got {value!r}")


def _ipv4_endpoint_problems(value: str, at: str) -> Iterator[Problem]:
    try:
        host, _ = parse_host_port(value)
    except ValueError as exc:
        yield Problem(at, str(exc))
        return
    yield from _ipv4_problems(host, at)


def _egress_problems(e: EgressCheck, at: str) -> Iterator[Problem]:
    if not e.targets:
        yield Problem(f"{at}.targets", "at least one target")
    names: set[str] = set()
    for i, target in enumerate(e.targets):
        where = f"{at}.targets[{i}]"
        if not _NAME.match(target.name):
            yield Problem(f"{where}.name", f"expected a short name, got {target.name!r}")
        elif target.name in names:
            yield Problem(f"{where}.name", f"duplicate target name {target.name!r}")
        names.add(target.name)
        yield from _ipv4_problems(target.address, f"{where}.address")
        if target.udp_port is not None:
            yield from _check_port(target.udp_port, f"{where}.udp_port")
    yield from _echo_problems(at, e.echo_count, e.echo_interval)
    if e.targets and not 1 <= e.min_targets <= len(e.targets):
        yield Problem(f"{at}.min_targets", f"must be 1..{len(e.targets)}, got {e.min_targets}")


def _dns_problems(d: DnsCheck, t: Target, via: list[str], at: str) -> Iterator[Problem]:
    try:
        dns.encode_name(d.name)
    except dns.DnsError as exc:
        yield Problem(f"{at}.name", str(exc))
    version = 4 if d.type == "A" else 6
    for i, value in enumerate(d.expect):
        try:
            if ipaddress.ip_address(value).version != version:
                yield Problem(f"{at}.expect[{i}]", f"an {d.type} answer is an IPv{version} "
                                                   f"address, got {value!r}")
        except ValueError:
            yield Problem(f"{at}.expect[{i}]", f"expected an IP address, got {value!r}")
    if d.attempts < 1:
        yield Problem(f"{at}.attempts", f"must be >= 1, got {d.attempts}")
    if not d.attempt_timeout > 0:
        yield Problem(f"{at}.attempt_timeout", f"must be > 0, got {d.attempt_timeout:g}")
    if "wireguard" in via and t.wireguard is not None and t.wireguard.dns_resolver is None:
        yield Problem(at, "WireGuard pushes no resolver: set wireguard.dns_resolver")
    if ("ikev2" in via and t.ikev2 is not None and t.ikev2.dns_resolver is None
            and not t.ikev2.request_config):
        yield Problem(at, "IKEv2 gives a resolver only when asked: set ikev2.request_config "
                          "(INTERNAL_IP4_DNS) or ikev2.dns_resolver")


def _throughput_problems(r: ThroughputCheck, bursts: int, at: str) -> Iterator[Problem]:
    yield from _ipv4_endpoint_problems(r.reflector, f"{at}.reflector")
    for name in ("rate", "duration", "max_queueing_delay", "budget_bytes_per_hour"):
        if not getattr(r, name) > 0:
            yield Problem(f"{at}.{name}", f"must be > 0, got {getattr(r, name):g}")
    if r.min_rate is not None and not 0 < r.min_rate <= r.rate:
        yield Problem(f"{at}.min_rate", f"must be > 0 and at most rate ({r.rate:g})")
    if not 68 <= r.packet_size <= 1500:
        yield Problem(f"{at}.packet_size", f"must be 68..1500 bytes, got {r.packet_size}")
    if r.idle_echoes < 1:
        yield Problem(f"{at}.idle_echoes", f"must be >= 1, got {r.idle_echoes}")
    burst = r.rate / 8 * r.duration * max(bursts, 1)
    if r.budget_bytes_per_hour > 0 and burst > r.budget_bytes_per_hour:
        yield Problem(f"{at}.budget_bytes_per_hour", f"one round of bursts ({burst:.0f} bytes "
                                                     f"over {bursts} tunnel(s)) exceeds it")


def user_path_problems(t: Target, at: str, base_dir: Path) -> Iterator[Problem]:
    u = t.user_path
    if u is None:
        return
    via = carrying_tunnels(t)
    for i, name in enumerate(u.via):
        if name not in via:
            yield Problem(f"{at}.via[{i}]", f"{name} is not configured to carry traffic here "
                                            "(wireguard needs tunnel_address and canary, "
                                            "openvpn a level beyond reset, ikev2 psk_file and "
                                            "ping below no level other than tunnel)")
    if not via:
        yield Problem(at, "no tunnel to test through: configure wireguard (with "
                          "tunnel_address and canary), openvpn or ikev2 (with psk_file and "
                          "ping)")
    if not any((u.egress, u.dns, u.throughput, u.transaction)):
        yield Problem(at, "nothing to check: add egress, dns, throughput or transaction")
    if u.egress is not None:
        yield from _egress_problems(u.egress, f"{at}.egress")
    if u.dns is not None:
        yield from _dns_problems(u.dns, t, via, f"{at}.dns")
    if u.throughput is not None:
        yield from _throughput_problems(u.throughput, len(via), f"{at}.throughput")
    if u.transaction is not None:
        yield from _transaction_problems(u.transaction, f"{at}.transaction", base_dir)


def _transaction_problems(t: TransactionCheck, at: str, base_dir: Path) -> Iterator[Problem]:
    yield from _ipv4_problems(t.address, f"{at}.address")
    yield from _check_port(t.port, f"{at}.port")
    yield from _check_file(t.ca_file, f"{at}.ca_file", base_dir)
    if t.http_path is not None and not (t.http_path.startswith("/") and t.http_path.isprintable()
                                        and " " not in t.http_path):
        yield Problem(f"{at}.http_path", f"expected a path like /health, got {t.http_path!r}")
    for i, status in enumerate(t.expect_status):
        if not 100 <= status <= 599:
            yield Problem(f"{at}.expect_status[{i}]", f"not an HTTP status: {status}")
    if t.expect_status and t.http_path is None:
        yield Problem(f"{at}.expect_status", "only with http_path (an HTTP request)")
    if not t.connect_timeout > 0:
        yield Problem(f"{at}.connect_timeout", f"must be > 0, got {t.connect_timeout:g}")
    if not 536 <= t.mss <= 1460:
        yield Problem(f"{at}.mss", f"must be in 536..1460, got {t.mss}")
    if t.server_name is not None and not t.tls and t.http_path is None:
        yield Problem(f"{at}.server_name", "only with tls or http_path")


def _load_problems(load: LoadTarget, over_ssh: bool, at: str) -> Iterator[Problem]:
    for i, name in enumerate(load.interfaces):
        if not _INTERFACE.match(name):
            yield Problem(f"{at}.interfaces[{i}]", f"expected an interface name, got {name!r}")
    if load.netns is not None and over_ssh:
        yield Problem(f"{at}.netns", "a local namespace read: not with ssh")
    if load.netns is not None and not _NAME.match(load.netns):
        yield Problem(f"{at}.netns", f"expected a namespace name, got {load.netns!r}")
    for name in ("daemon_cores", "effective_window_seconds", "session_unit_bytes_per_second"):
        if not getattr(load, name) > 0:
            yield Problem(f"{at}.{name}", "must be > 0")


def _telemetry_problems(t: TelemetryTarget, at: str, base_dir: Path) -> Iterator[Problem]:
    if (t.wireguard_interface is None and t.openvpn_management_socket is None and not t.ikev2
            and t.load is None):
        yield Problem(at, "nothing to read: set wireguard_interface, openvpn_management_socket, "
                          "ikev2 or load")
    if t.load is not None:
        yield from _load_problems(t.load, t.ssh is not None, f"{at}.load")
    name = t.wireguard_interface
    if name is not None and not _INTERFACE.match(name):
        yield Problem(f"{at}.wireguard_interface",
                      f"expected an interface name (1-15 of A-Z a-z 0-9 . _ -), got {name!r}")
    if t.ikev2_vici_uri is not None and not t.ikev2:
        yield Problem(f"{at}.ikev2_vici_uri", "only applies with ikev2: true")
    if t.ssh is not None:
        yield from _check_port(t.ssh.port, f"{at}.ssh.port")
        yield from _check_file(t.ssh.key_file, f"{at}.ssh.key_file", base_dir)
        yield from _check_file(t.ssh.known_hosts_file, f"{at}.ssh.known_hosts_file", base_dir)
        if t.ssh.known_hosts_file is not None and not t.ssh.verify_host_key:
            yield Problem(f"{at}.ssh.known_hosts_file", "unused with verify_host_key: false")


def _target_problems(t: Target, at: str, base_dir: Path) -> Iterator[Problem]:
    if not _NAME.match(t.id):
        yield Problem(f"{at}.id", f"expected letters, digits, '.', '_' or '-', got {t.id!r}")
    try:
        ipaddress.ip_address(t.address)
    except ValueError:
        if not HOSTNAME.match(t.address):
            yield Problem(f"{at}.address", f"expected an IP address or hostname, got {t.address!r}")
    if t.wireguard is not None:
        yield from wireguard_problems(t.wireguard, f"{at}.wireguard", base_dir)
    if t.openvpn is not None:
        yield from openvpn_problems(t.openvpn, f"{at}.openvpn", base_dir)
    if t.ikev2 is not None:
        yield from ikev2_problems(t.ikev2, f"{at}.ikev2", base_dir)
    if t.quic is not None:
        yield from quic_problems(t.quic, f"{at}.quic", base_dir)
    if t.l4 is not None:
        for j, port in enumerate(t.l4.tcp_ports):
            yield from _check_port(port, f"{at}.l4.tcp_ports[{j}]")
        for j, ex in enumerate(t.l4.udp):
            yield from _check_port(ex.port, f"{at}.l4.udp[{j}].port")
            for name in ("send_hex", "expect_hex"):
                value = getattr(ex, name)
                try:
                    bytes.fromhex(value or "")
                except ValueError:
                    yield Problem(f"{at}.l4.udp[{j}].{name}", "expected hex digits")
    if t.mtu is not None:
        yield from mtu_problems(t.mtu, f"{at}.mtu", base_dir)
    if t.telemetry is not None:
        yield from _telemetry_problems(t.telemetry, f"{at}.telemetry", base_dir)
    yield from user_path_problems(t, f"{at}.user_path", base_dir)
    yield from _checks_problems(t, at)
    if not any((t.wireguard, t.openvpn, t.ikev2, t.quic, t.l4, t.mtu)):
        yield Problem(at, "no protocol configured: add wireguard, openvpn, ikev2, quic, l4 or mtu")


def _checks_problems(t: Target, at: str) -> Iterator[Problem]:
    """Every entry of ``checks:`` must name something that can be planned: a typo (``smtp``)
    used to pass, and then the filter silently left the target without a single check."""
    if not t.checks:
        return
    # every family loaded, only for a target whose `checks:` needs the names
    from probes.checks.registry import all_kinds  # noqa: PLC0415 - the checks import this module

    kinds = all_kinds()
    protocols = sorted({name.split(".", 1)[0] for name in kinds})
    ports = {"tcp": set(t.l4.tcp_ports) if t.l4 else set(),
             "udp": {ex.port for ex in t.l4.udp} if t.l4 else set()}
    for j, wanted in enumerate(t.checks):
        kind, colon, port = wanted.partition(":")
        if colon and kind in ports:
            if not (port.isdigit() and int(port) in ports[kind]):
                yield Problem(f"{at}.checks[{j}]", f"{wanted!r}: port {port} is not in this "
                              f"target's l4 {kind} ports {sorted(ports[kind])}")
        elif wanted not in kinds and wanted not in protocols:
            near = difflib.get_close_matches(wanted, [*protocols, *kinds], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            yield Problem(f"{at}.checks[{j}]", f"unknown check kind or protocol {wanted!r}"
                          f"{hint}; expected a protocol ({', '.join(protocols)}), a kind such as "
                          "wireguard.handshake, or tcp:PORT / udp:PORT")


def _agent_problems(cfg: AgentConfig, base_dir: Path) -> Iterator[Problem]:
    if not _NAME.match(cfg.agent.vantage):
        yield Problem("$.agent.vantage", f"expected a short name, got {cfg.agent.vantage!r}")
    yield from host_port_problems(cfg.agent.listen, "$.agent.listen", listen=True)
    if cfg.agent.max_concurrency < 1:
        yield Problem("$.agent.max_concurrency", "must be >= 1")
    if cfg.agent.per_node_concurrency < 1:
        yield Problem("$.agent.per_node_concurrency", "must be >= 1")
    if cfg.agent.max_probe_rate <= 0:
        yield Problem("$.agent.max_probe_rate", "must be > 0")
    if cfg.agent.max_start_lag <= 0:
        yield Problem("$.agent.max_start_lag", "must be > 0")
    if not cfg.agent.max_reprobe_rate >= 0:
        yield Problem("$.agent.max_reprobe_rate", "must be >= 0")
    for name, tier in cfg.tiers.items():
        if name not in _default_tiers():
            yield Problem(f"$.tiers.{name}", "unknown tier; expected "
                          + ", ".join(_default_tiers()))
        yield from _tier_problems(name, tier)
    seen: dict[str, int] = {}
    for i, t in enumerate(cfg.targets):
        at = f"$.targets[{i}]"
        if t.id in seen:
            first = f"$.targets[{seen[t.id]}]"
            yield Problem(f"{at}.id", f"duplicate node id {t.id!r} (first at {first})")
        else:
            seen[t.id] = i
        yield from _target_problems(t, at, base_dir)
    if cfg.mesh is not None:
        if not cfg.mesh.endpoints:
            yield Problem("$.mesh.endpoints", "at least one mesh endpoint is required")
        for j, url in enumerate(cfg.mesh.endpoints):
            if not re.match(r"^https?://[^/\s]+", url):
                yield Problem(f"$.mesh.endpoints[{j}]", f"expected an http(s) URL, got {url!r}")
        yield from check_secret_file(cfg.mesh.key_file, "$.mesh.key_file", base_dir)
    yield from _tracing_problems(cfg.paths)


def _tracing_problems(t: TracingConfig) -> Iterator[Problem]:
    for name in ("baseline_interval", "failing_interval", "min_interval"):
        if getattr(t, name) < 0:
            yield Problem(f"$.paths.{name}", "must be >= 0")
    for name in ("max_per_minute", "probe_timeout", "packets_per_second"):
        if not getattr(t, name) > 0:
            yield Problem(f"$.paths.{name}", "must be > 0")
    for name, low, high in (("concurrency", 1, 64), ("flows", 1, 16), ("baseline_flows", 1, 16),
                            ("max_ttl", 1, 64), ("attempts", 1, 5), ("gap_limit", 1, 16)):
        if not low <= getattr(t, name) <= high:
            yield Problem(f"$.paths.{name}", f"must be {low}..{high}")
    if t.big_probe_size and not 68 <= t.big_probe_size <= 65535:
        yield Problem("$.paths.big_probe_size", "must be 0 (off) or 68..65535 bytes")


# ---------------------------------------------------------------------------------------------
# YAML with line numbers

# libyaml's safe loader when present: an agent config with 10,000 targets parses several times
# faster and peaks ~40 MB lower than with the pure-Python one
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def yaml_lines(text: str) -> dict[str, int]:
    """Map every field path in a YAML document to its 1-based line (only when a problem needs
    one: the node tree costs as much memory as the document's objects)."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text, Loader=_YAML_LOADER)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, path: str) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = f"{path}.{key.value}"
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{path}[{i}]")

    if root is not None:
        walk(root, "$")
    return lines


def _line_for(path: str, lines: Mapping[str, int]) -> int | None:
    # an error about a missing key points at its parent; walk up until something is known
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        if cut <= 0:
            break
        path = path[:cut]
    return lines.get("$")


S = TypeVar("S")


def _yaml_data(text: str, source: str) -> Any:
    try:
        data: Any = yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(source, [Problem("$", f"not valid YAML: {exc}", line)]) from None
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem("$", "expected a mapping at the top level")])
    return data


def _as_bytes(data: Any, source: str) -> bytes:
    try:
        return msgspec.msgpack.encode(data)
    except (TypeError, OverflowError) as exc:  # a YAML value msgpack has no type for
        raise ConfigError(source, [Problem("$", f"unsupported YAML value: {exc}")]) from None


class YamlLines(Mapping[str, int]):
    """Field path -> 1-based line of a YAML document, worked out when first asked (only a
    problem needs a line; the node tree costs as much memory as the document's objects)."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._lines: dict[str, int] | None = None

    def _map(self) -> dict[str, int]:
        if self._lines is None:
            self._lines = yaml_lines(self._text)
        return self._lines

    def __getitem__(self, path: str) -> int:
        return self._map()[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map())

    def __len__(self) -> int:
        return len(self._map())


def parse_yaml(text: str, struct: type[S],
               source: str = "<config>") -> tuple[S, Mapping[str, int]]:
    """Parse YAML text into ``struct`` (and the lines of its field paths, for later problems);
    raise :class:`ConfigError` naming the field and line.

    The document reaches the structs through msgpack bytes, so the parsed objects are gone
    before the structs are made: a 10,000-target agent config parses into ~75 MB of
    short-lived dicts and strings, and structs made while those were alive sat scattered among
    them and kept ~60 MB of the interpreter's memory arenas from ever being returned (~10 MB
    this way)."""
    lines = YamlLines(text)
    plain = _as_bytes(_yaml_data(text, source), source)
    try:
        return msgspec.msgpack.decode(plain, type=struct, strict=False), lines
    except msgspec.ValidationError:
        pass  # a mistake, or duration strings: walk the whole document
    prepared, found = prepare(msgspec.msgpack.decode(plain), struct)
    if found:
        raise ConfigError(source, [Problem(path, message, _line_for(path, lines))
                                   for path, message in found])
    plain = _as_bytes(prepared, source)
    del prepared
    try:
        return msgspec.msgpack.decode(plain, type=struct, strict=False), lines
    except msgspec.ValidationError as exc:  # what the walk does not know: one problem
        message = str(exc)
        path = "$"
        if " - at `" in message:
            message, path = message.split(" - at `", 1)
            path = path.rstrip("`")
        raise ConfigError(source, [Problem(path, message, _line_for(path, lines))]) from None


def load_config_file(path: str | Path, struct: type[S],
                     problems: Callable[[S, Path], Iterable[Problem]]) -> tuple[S, Path]:
    """Read, parse and validate a config file of any kind: the agent's, the mesh's, the
    receiver's. ``problems(config, folder)`` checks what types cannot; every problem found is
    raised together in one :class:`ConfigError`, each with its line. Returns the config and the
    folder its relative file paths resolve against."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(str(p), [Problem("$", f"cannot read file: {exc.strerror}")]) from None
    cfg, lines = parse_yaml(text, struct, str(p))
    base = p.parent.resolve()
    found = list(problems(cfg, base))
    if found:
        raise ConfigError(str(p), [dataclasses.replace(q, line=_line_for(q.path, lines))
                                   for q in found])
    return cfg, base


def load_agent_config(path: str | Path) -> AgentConfig:
    """Load and fully validate an agent config file."""
    cfg, _base = load_config_file(path, AgentConfig, AgentConfig.problems)
    return cfg
