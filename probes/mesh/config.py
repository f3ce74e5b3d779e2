"""The mesh config file: where it listens, where it stores, which agents and nodes, the policy.

Loaded with :func:`load_mesh_config`, which raises :class:`probes.config.ConfigError` listing every
problem with its field path (``$.agents[1].key_file``) and line, like the agent config.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import msgspec

from probes.config import (
    Problem,
    Strict,
    check_secret_file,
    host_port_problems,
    load_config_file,
    parse_host_port,
    resolve_path,
)
from probes.duration import Duration
from probes.mesh.bgp.controller import AnycastConfig, anycast_problems
from probes.mesh.decision import NodeInfo
from probes.mesh.paths import PathPolicy
from probes.mesh.policy import DecisionPolicy, PolicyError, validate_policy
from probes.mesh.publish import config as publish_config
from probes.mesh.reprobe import ReprobePolicy, policy_problems
from probes.mesh.weight_policy import WeightPolicy, validate_weight_policy
from probes.mesh.weights import WeightNode


class MeshAgent(Strict, kw_only=True, frozen=True):
    """An agent allowed to report: its name (= its vantage) and its HMAC key."""

    name: str
    key_file: str
    key_id: str = ""  # what the agent sends in X-Tunnelwatch-Key-Id; defaults to the name

    @property
    def effective_key_id(self) -> str:
        return self.key_id or self.name


class MeshNode(Strict, kw_only=True, frozen=True):
    id: str
    pool: str = "default"
    pop: str = ""
    region: str = ""
    # "anycast": not a VPN node but a check of a PoP's anycast address from outside; its
    # verdict feeds the PoP's announcement decision (docs/anycast.md), not a balancer pool
    role: Literal["node", "anycast"] = "node"
    # how much this node can take compared with a typical one (1.0): weights compare load per
    # unit of capacity, and the weight guard counts it (docs/weights.md)
    capacity: float = 1.0


class StoreConfig(Strict, kw_only=True, frozen=True):
    """Where the shared state lives: ``sqlite`` (one process) or ``etcd`` (HA, docs/ha.md)."""

    type: str = "sqlite"  # "sqlite" or "etcd"
    endpoints: list[str] = msgspec.field(default_factory=list)  # etcd client URLs
    prefix: str = "/tunnelwatch/mesh"  # every key of this mesh lives under it
    replica: str = ""  # this replica's name (the leader key's value); default: the host name
    lease_ttl_seconds: int = 10  # the leader's lease
    clock_margin_seconds: Duration = 2.0  # the leader stops this long before its lease can expire
    request_timeout_seconds: Duration = 1.0  # per etcd request and endpoint

    @property
    def replica_name(self) -> str:
        return self.replica or socket.gethostname()


def _store_problems(store: StoreConfig) -> Iterator[Problem]:
    if store.type not in ("sqlite", "etcd"):
        yield Problem("$.store.type", f"expected sqlite or etcd, got {store.type!r}")
    if store.type != "etcd":
        return
    if not store.endpoints:
        yield Problem("$.store.endpoints", "at least one etcd endpoint is required")
    for i, endpoint in enumerate(store.endpoints):
        if not endpoint.startswith(("http://", "https://")):
            yield Problem(f"$.store.endpoints[{i}]", f"expected an http(s) URL, got {endpoint!r}")
    if not store.prefix.startswith("/") or store.prefix.rstrip("/") == "":
        yield Problem("$.store.prefix", "must start with / and name something")
    if store.lease_ttl_seconds < 2:
        yield Problem("$.store.lease_ttl_seconds", "must be >= 2")
    if not 0 < store.clock_margin_seconds < store.lease_ttl_seconds:
        yield Problem("$.store.clock_margin_seconds", "must be > 0 and < lease_ttl_seconds")
    if not store.request_timeout_seconds > 0:
        yield Problem("$.store.request_timeout_seconds", "must be > 0")


class AgentCheckConfig(Strict, kw_only=True, frozen=True):
    """HAProxy's agent-check, answered by the mesh (docs/weights.md, "HAProxy agent-check"):
    HAProxy sends ``agent-send "<name>\n"`` and gets ``up ready <weight>%`` / ``drain`` /
    ``maint`` / ``down`` back."""

    listen: str = "127.0.0.1:9481"
    servers: dict[str, str] = msgspec.field(default_factory=dict)  # sent name -> node id
    degraded_weight_percent: int = 50  # with weights off

    def listen_host_port(self) -> tuple[str, int]:
        return parse_host_port(self.listen, default_host="127.0.0.1", ephemeral=True)


class PathsConfig(PathPolicy, kw_only=True, frozen=True):
    """Path evidence from the agents' traces (docs/paths.md): where on the way a vantage loses
    a node, by hop and by network. Hops are mapped to networks with a table you provide; the
    mesh never looks anything up on the network. Without a table, hops are shown by address
    and marked private or unknown."""

    # prefix-to-AS table: pyasn's IPASN file, an MRT RIB dump or `bgpdump -m` lines (.gz/.bz2
    # too)
    asn_table: str | None = None
    asn_names: str | None = None  # AS names: pyasn's asnames.json or "asn name" lines
    # the AS of the router that wrote an MRT dump of its own RIB: its own routes have an
    # empty AS path
    local_asn: int | None = None


class MeshConfig(Strict, kw_only=True, frozen=True):
    listen: str = "127.0.0.1:9480"
    database: str = "mesh.db"
    agents: list[MeshAgent]
    nodes: list[MeshNode]
    operator_token_file: str | None = None  # bearer token for POST /v1/nodes/{id}/...
    decision: DecisionPolicy = msgspec.field(default_factory=DecisionPolicy)
    weights: WeightPolicy = msgspec.field(default_factory=WeightPolicy)  # docs/weights.md
    max_body_bytes: int = 8 * 1024 * 1024
    timestamp_window_seconds: Duration = 300.0
    # what an unauthenticated client may cost (docs/mesh.md, "Ingest under attack")
    max_connections: int = 512  # open at once; lowered to fit the open-file limit
    idle_timeout_seconds: Duration = 30.0  # no complete request on a connection for this long
    body_timeout_seconds: Duration = 15.0  # a request body must have arrived by then
    unverified_body_bytes: int = 32 * 1024 * 1024  # bodies read before their signature checks
    tick_seconds: Duration = 1.0
    snapshot_every: int = 10_000  # journal entries between engine snapshots ...
    snapshot_bytes: int = 256 * 1024 * 1024  # ... or journaled bytes, whichever comes first
    background_snapshots: bool = True  # snapshot in a forked child: ingest does not pause
    durability: str = "normal"  # "normal" (survives a crash) or "full" (survives a power cut)
    publishers: list[publish_config.PublisherConfig] = msgspec.field(default_factory=list)
    anycast: AnycastConfig | None = None  # PoP announcements through BGP speakers
    agent_check: AgentCheckConfig | None = None  # HAProxy pulls states and weights
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)  # HA: docs/ha.md
    # corroboration on demand: ask other vantages to re-probe a failing check (docs/mesh.md)
    reprobe: ReprobePolicy = msgspec.field(default_factory=ReprobePolicy)
    paths: PathsConfig = msgspec.field(default_factory=PathsConfig)  # docs/paths.md

    def node_infos(self) -> list[NodeInfo]:
        return [NodeInfo(n.id, n.pool, n.pop, n.region) for n in self.nodes]

    def weight_nodes(self) -> list[WeightNode]:
        """The balancer nodes the weight engine weighs (anycast checks are not in a pool)."""
        return [WeightNode(n.id, n.pool, n.capacity) for n in self.nodes if n.role == "node"]

    def listen_host_port(self) -> tuple[str, int]:
        return parse_host_port(self.listen, default_host="127.0.0.1")


def _problems(cfg: MeshConfig, base_dir: Path) -> Iterator[Problem]:
    yield from host_port_problems(cfg.listen, "$.listen", listen=True)
    if not cfg.agents:
        yield Problem("$.agents", "at least one agent is required")
    if not cfg.nodes:
        yield Problem("$.nodes", "at least one node is required")
    seen: dict[str, int] = {}
    key_ids: dict[str, int] = {}
    for i, agent in enumerate(cfg.agents):
        if not agent.name:
            yield Problem(f"$.agents[{i}].name", "must not be empty")
        if agent.name in seen:
            yield Problem(f"$.agents[{i}].name", f"duplicate of $.agents[{seen[agent.name]}]")
        seen.setdefault(agent.name, i)
        if agent.effective_key_id in key_ids:
            yield Problem(f"$.agents[{i}].key_id", "key id used twice")
        key_ids.setdefault(agent.effective_key_id, i)
        yield from check_secret_file(agent.key_file, f"$.agents[{i}].key_file", base_dir)
    nodes: dict[str, int] = {}
    for i, node in enumerate(cfg.nodes):
        if not node.id:
            yield Problem(f"$.nodes[{i}].id", "must not be empty")
        if node.id in nodes:
            yield Problem(f"$.nodes[{i}].id", f"duplicate of $.nodes[{nodes[node.id]}]")
        nodes.setdefault(node.id, i)
        if not node.capacity > 0 or node.capacity != node.capacity:
            yield Problem(f"$.nodes[{i}].capacity", f"must be > 0, got {node.capacity}")
    yield from check_secret_file(cfg.operator_token_file, "$.operator_token_file", base_dir)
    if cfg.max_body_bytes < 1024:
        yield Problem("$.max_body_bytes", "must be >= 1024")
    if cfg.max_connections < 16:
        yield Problem("$.max_connections", "must be >= 16")
    for name in ("idle_timeout_seconds", "body_timeout_seconds"):
        if not getattr(cfg, name) > 0:
            yield Problem(f"$.{name}", "must be > 0")
    if cfg.unverified_body_bytes < cfg.max_body_bytes:
        yield Problem("$.unverified_body_bytes", "must be >= max_body_bytes (one body fits)")
    if not cfg.timestamp_window_seconds > 0:
        yield Problem("$.timestamp_window_seconds", "must be > 0")
    if not cfg.tick_seconds > 0:
        yield Problem("$.tick_seconds", "must be > 0")
    if cfg.snapshot_every < 1:
        yield Problem("$.snapshot_every", "must be >= 1")
    if cfg.snapshot_bytes < 1:
        yield Problem("$.snapshot_bytes", "must be >= 1")
    if cfg.durability not in ("normal", "full"):
        yield Problem("$.durability", f"expected normal or full, got {cfg.durability!r}")
    yield from publish_config.publisher_problems(cfg.publishers, base_dir)
    if cfg.agent_check is not None:
        yield from host_port_problems(cfg.agent_check.listen, "$.agent_check.listen", listen=True,
                                      ephemeral=True)
        if not 0 <= cfg.agent_check.degraded_weight_percent <= 100:
            yield Problem("$.agent_check.degraded_weight_percent", "must be 0..100")
        for name, node_id in cfg.agent_check.servers.items():
            if node_id not in {n.id for n in cfg.nodes}:
                yield Problem(f"$.agent_check.servers.{name}", f"no node {node_id!r}")
    yield from _store_problems(cfg.store)
    for path, message in policy_problems(cfg.reprobe):
        yield Problem(path, message)
    pools_with_nodes = {n.pool for n in cfg.nodes if n.role == "node"}
    for i, node in enumerate(cfg.nodes):
        if node.role == "anycast" and node.pool in pools_with_nodes:
            yield Problem(f"$.nodes[{i}].pool", "an anycast check needs a pool of its own "
                          "(it must not count in a balancer pool's guard)")
    if cfg.anycast is not None:
        for path, message in anycast_problems(cfg.anycast, {n.id: n.pop for n in cfg.nodes}):
            yield Problem(path, message)
    yield from _policy_problems(lambda: validate_policy(cfg.decision, "$.decision"))
    yield from _policy_problems(lambda: validate_weight_policy(cfg.weights, "$.weights"))
    yield from _paths_problems(cfg.paths, base_dir)


def _policy_problems(validate: Callable[[], object]) -> Iterator[Problem]:
    try:
        validate()
    except PolicyError as exc:
        yield Problem(exc.path, str(exc).split(": ", 1)[1])


def _paths_problems(paths: PathsConfig, base_dir: Path) -> Iterator[Problem]:
    for name in ("asn_table", "asn_names"):
        value = getattr(paths, name)
        if value is not None and not resolve_path(value, base_dir).is_file():
            yield Problem(f"$.paths.{name}", f"no such file: {value}")
    if paths.asn_names is not None and paths.asn_table is None:
        yield Problem("$.paths.asn_names", "names need a table (asn_table)")
    for name in ("failing_max_age_seconds", "reference_max_age_seconds",
                 "route_change_window_seconds"):
        if not getattr(paths, name) > 0:
            yield Problem(f"$.paths.{name}", "must be > 0")
    if paths.vantage_min_nodes < 1:
        yield Problem("$.paths.vantage_min_nodes", "must be >= 1")
    if paths.max_reasons < 1:
        yield Problem("$.paths.max_reasons", "must be >= 1")
    if paths.local_asn is not None and not 0 < paths.local_asn < 2**32:
        yield Problem("$.paths.local_asn", "must be an AS number (1..4294967295)")


def load_mesh_config(path: str | Path) -> MeshConfig:
    """Load and fully validate a mesh config; relative file paths resolve against its folder."""
    cfg, base = load_config_file(path, MeshConfig, _problems)
    return with_base_dir(cfg, base)


def with_base_dir(cfg: MeshConfig, base: Path) -> MeshConfig:
    """The config with every file path made absolute against ``base``."""
    return msgspec.structs.replace(
        cfg,
        database=str(resolve_path(cfg.database, base)),
        agents=[
            msgspec.structs.replace(a, key_file=str(resolve_path(a.key_file, base)))
            for a in cfg.agents
        ],
        operator_token_file=(
            str(resolve_path(cfg.operator_token_file, base)) if cfg.operator_token_file else None
        ),
        publishers=[publish_config.with_base_dir(p, base) for p in cfg.publishers],
        paths=msgspec.structs.replace(
            cfg.paths,
            asn_table=str(resolve_path(cfg.paths.asn_table, base)) if cfg.paths.asn_table
            else None,
            asn_names=str(resolve_path(cfg.paths.asn_names, base)) if cfg.paths.asn_names
            else None,
        ),
    )
