"""Publisher configuration: the ``publishers:`` section of the mesh config, and the receiver's.

```yaml
publishers:
  - type: webhook
    name: hook                      # the metrics label; unique
    url: https://lb-team.example/tunnelwatch
    key_id: mesh-1
    key_file: keys/webhook.key
  - type: haproxy
    name: lb1
    socket: /run/haproxy/admin.sock # or address: "10.0.0.5:9999", or ssh: {host, socket, ...}
    backend: vpn                    # default backend; node id = server name unless mapped
    servers: {vpn-fra-1: "vpn/fra1"}
    down_action: maint              # or drain
    degraded_weight_percent: 50
    retry: {dead_letter_after: 900}
  - type: nftlb                     # a UDP pool: WireGuard / IKEv2 behind nftlb (docs/weights.md)
    name: lb-udp
    url: http://10.0.0.5:5555       # nftlb's REST API
    key_file: keys/nftlb.key        # its -k / NFTLB_SERVER_KEY
    farms: [wg-pool, ike-pool]      # node id = backend name in each farm that has it
    backends: {vpn-fra-1: ["wg-pool/fra1"]}
    nominal_weights: {vpn-fra-1: 200}  # a node's weight at 100 %; default 100
```

Problems are reported with their field path (``$.publishers[1].socket``), like every config here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgspec

from probes.config import (
    Problem,
    Strict,
    check_secret_file,
    host_port_problems,
    parse_host_port,
    resolve_path,
)
from probes.mesh.publish.base import Publisher
from probes.mesh.publish.delivery import RetryPolicy
from probes.mesh.publish.haproxy import HAProxyPublisher, ServerMap, StateMapping
from probes.mesh.publish.nftlb import BackendMap, NftlbAPI, NftlbPublisher
from probes.mesh.publish.runtime_api import RuntimeAPI, SSHTarget
from probes.mesh.publish.webhook import WebhookPublisher
from probes.model import signing

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class RetryConfig(Strict, kw_only=True, frozen=True):
    initial_backoff: float = 0.25
    max_backoff: float = 30.0
    dead_letter_after: float = 900.0
    poll_interval: float = 0.1
    reconcile_interval: float = 60.0

    def policy(self) -> RetryPolicy:
        return RetryPolicy(initial_backoff=self.initial_backoff, max_backoff=self.max_backoff,
                           dead_letter_after=self.dead_letter_after,
                           poll_interval=self.poll_interval,
                           reconcile_interval=self.reconcile_interval)


class SSHConfig(Strict, kw_only=True, frozen=True):
    host: str
    socket: str
    port: int = 22
    username: str | None = None
    key_file: str | None = None
    known_hosts: str | None = None


class WebhookConfig(Strict, tag="webhook", tag_field="type", kw_only=True, frozen=True):
    name: str
    url: str
    key_id: str
    key_file: str
    timeout: float = 5.0
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    dead_letter_file: str | None = None


class HAProxyConfig(Strict, tag="haproxy", tag_field="type", kw_only=True, frozen=True):
    name: str
    socket: str | None = None
    address: str | None = None  # host:port of a TCP runtime API listener
    ssh: SSHConfig | None = None
    backend: str = "vpn"
    servers: dict[str, str] = msgspec.field(default_factory=dict)  # node id -> "backend/server"
    only_listed: bool = False
    down_action: str = "maint"
    degraded_weight_percent: int = 50
    timeout: float = 3.0
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    dead_letter_file: str | None = None

    def runtime_api(self, base_dir: Path | None = None) -> RuntimeAPI:
        base = base_dir or Path.cwd()
        if self.socket is not None:
            return RuntimeAPI(socket_path=str(resolve_path(self.socket, base)),
                              timeout=self.timeout)
        if self.address is not None:
            return RuntimeAPI(address=parse_host_port(self.address), timeout=self.timeout)
        assert self.ssh is not None
        keys = (str(resolve_path(self.ssh.key_file, base)),) if self.ssh.key_file else ()
        return RuntimeAPI(ssh=SSHTarget(self.ssh.host, self.ssh.socket, self.ssh.port,
                                        self.ssh.username, keys, self.ssh.known_hosts),
                          timeout=self.timeout)

    def publisher(self, base_dir: Path | None = None) -> HAProxyPublisher:
        servers = {node: ServerMap.parse_ref(ref, self.backend)
                   for node, ref in self.servers.items()}
        return HAProxyPublisher(
            self.name, self.runtime_api(base_dir),
            ServerMap(self.backend, servers, self.only_listed),
            StateMapping(self.down_action, self.degraded_weight_percent))


class NftlbConfig(Strict, tag="nftlb", tag_field="type", kw_only=True, frozen=True):
    name: str
    url: str  # nftlb's REST API, http://host:port
    key_file: str  # the key nftlb was started with (-k, or NFTLB_SERVER_KEY)
    farms: list[str] = msgspec.field(default_factory=list)  # node id = backend name in these
    backends: dict[str, list[str]] = msgspec.field(default_factory=dict)  # node -> farm/backend
    only_listed: bool = False  # True: ignore nodes not in ``backends``
    nominal_weights: dict[str, int] = msgspec.field(default_factory=dict)  # weight at 100 %
    degraded_weight_percent: int = 50  # with weights off
    down_state: str = "down"  # or "off": a DOWN node's conntrack flows keep their backend
    timeout: float = 3.0
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    dead_letter_file: str | None = None

    def publisher(self, base_dir: Path | None = None) -> NftlbPublisher:
        key = signing.load_key(resolve_path(self.key_file, base_dir or Path.cwd())).decode()
        refs = {node: tuple((farm, backend) for farm, _, backend in
                            (ref.partition("/") for ref in refs))
                for node, refs in self.backends.items()}
        return NftlbPublisher(
            self.name, NftlbAPI(self.url, key, self.timeout),
            BackendMap(tuple(self.farms), refs, self.only_listed),
            nominal_weights=self.nominal_weights,
            degraded_weight_percent=self.degraded_weight_percent, down_state=self.down_state)


PublisherConfig = WebhookConfig | HAProxyConfig | NftlbConfig


def build_publisher(cfg: PublisherConfig, base_dir: Path | None = None) -> Publisher:
    if isinstance(cfg, WebhookConfig):
        key = signing.load_key(resolve_path(cfg.key_file, base_dir or Path.cwd()))
        return WebhookPublisher(cfg.name, cfg.url, key, cfg.key_id, timeout=cfg.timeout)
    return cfg.publisher(base_dir)


def _retry_problems(r: RetryConfig, at: str) -> Iterator[Problem]:
    for name in ("initial_backoff", "max_backoff", "dead_letter_after", "poll_interval"):
        if not getattr(r, name) > 0:
            yield Problem(f"{at}.retry.{name}", "must be > 0")
    if r.max_backoff < r.initial_backoff:
        yield Problem(f"{at}.retry.max_backoff", "must be >= initial_backoff")
    if r.reconcile_interval < 0:
        yield Problem(f"{at}.retry.reconcile_interval", "must be >= 0 (0 = off)")


def haproxy_problems(h: HAProxyConfig, at: str, base_dir: Path) -> Iterator[Problem]:
    transports = [t for t in ("socket", "address", "ssh") if getattr(h, t) is not None]
    if len(transports) != 1:
        yield Problem(at, "set exactly one of socket, address, ssh"
                      + (f" (got {', '.join(transports)})" if transports else ""))
    if h.address is not None:
        yield from host_port_problems(h.address, f"{at}.address")
    if h.ssh is not None and h.ssh.key_file is not None and not resolve_path(
            h.ssh.key_file, base_dir).is_file():
        yield Problem(f"{at}.ssh.key_file", f"no such file: {h.ssh.key_file}")
    if h.down_action not in ("maint", "drain"):
        yield Problem(f"{at}.down_action", f"expected maint or drain, got {h.down_action!r}")
    if not 0 <= h.degraded_weight_percent <= 100:
        yield Problem(f"{at}.degraded_weight_percent", "must be 0..100")
    for node, ref in h.servers.items():
        if not ref or ref.endswith("/") or ref.count("/") > 1:
            yield Problem(f"{at}.servers.{node}", f"expected backend/server, got {ref!r}")
    if not h.timeout > 0:
        yield Problem(f"{at}.timeout", "must be > 0")


def nftlb_problems(n: NftlbConfig, at: str) -> Iterator[Problem]:
    if not n.farms and not n.backends:
        yield Problem(at, "name the farms (node id = backend name) or map backends")
    for i, farm in enumerate(n.farms):
        if not _NAME.match(farm):
            yield Problem(f"{at}.farms[{i}]", f"not a farm name: {farm!r}")
    for node, refs in n.backends.items():
        for i, ref in enumerate(refs):
            farm, sep, backend = ref.partition("/")
            if not sep or not _NAME.match(farm) or not _NAME.match(backend):
                yield Problem(f"{at}.backends.{node}[{i}]", f"expected farm/backend, got {ref!r}")
    for node, weight in n.nominal_weights.items():
        if not 1 <= weight <= 10_000:
            yield Problem(f"{at}.nominal_weights.{node}", "must be 1..10000")
    if not 0 <= n.degraded_weight_percent <= 100:
        yield Problem(f"{at}.degraded_weight_percent", "must be 0..100")
    if n.down_state not in ("down", "off"):
        yield Problem(f"{at}.down_state", f"expected down or off, got {n.down_state!r}")


def publisher_problems(publishers: Sequence[PublisherConfig], base_dir: Path,
                       at: str = "$.publishers") -> Iterator[Problem]:
    names: dict[str, int] = {}
    for i, p in enumerate(publishers):
        here = f"{at}[{i}]"
        if not _NAME.match(p.name):
            yield Problem(f"{here}.name", f"not a valid name: {p.name!r}")
        if p.name in names:
            yield Problem(f"{here}.name", f"duplicate of {at}[{names[p.name]}]")
        names.setdefault(p.name, i)
        yield from _retry_problems(p.retry, here)
        if isinstance(p, WebhookConfig | NftlbConfig):
            if not re.match(r"^https?://[^/\s]+", p.url):
                yield Problem(f"{here}.url", f"expected an http(s) URL, got {p.url!r}")
            yield from check_secret_file(p.key_file, f"{here}.key_file", base_dir)
            if not p.timeout > 0:
                yield Problem(f"{here}.timeout", "must be > 0")
        if isinstance(p, NftlbConfig):
            yield from nftlb_problems(p, here)
        elif isinstance(p, HAProxyConfig):
            yield from haproxy_problems(p, here, base_dir)


def with_base_dir(cfg: PublisherConfig, base: Path) -> PublisherConfig:
    """The publisher config with its file paths made absolute against ``base``."""
    if isinstance(cfg, WebhookConfig | NftlbConfig):
        return msgspec.structs.replace(cfg, key_file=str(resolve_path(cfg.key_file, base)))
    if cfg.socket is not None:
        return msgspec.structs.replace(cfg, socket=str(resolve_path(cfg.socket, base)))
    return cfg
