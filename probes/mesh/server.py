"""``tunnelwatch mesh --config F``: the aiohttp application around the mesh service.

Routes: ``POST /v1/batches`` (:mod:`.ingest`), the API (:mod:`.api`), ``/metrics``
(:mod:`.metrics`, on an injected ``CollectorRegistry``). A background task ticks the engine every
``tick_seconds`` so stale vantages and damped checks are handled without new reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from probes.logutil import RateLimitedLog
from probes.mesh import connections
from probes.mesh.api import Api
from probes.mesh.bgp import runtime as anycast
from probes.mesh.config import AgentCheckConfig, MeshConfig
from probes.mesh.exposition import MeshExposition
from probes.mesh.ingest import AgentKey, Ingest, IngestLimits
from probes.mesh.leader import LeaderCollector, LeaderElector
from probes.mesh.metrics import MeshCollector, WeightCollector
from probes.mesh.publish.agentcheck import AgentCheckServer
from probes.mesh.publish.runner import Publishing, publishing_context
from probes.mesh.reprobe import ReprobePlanner
from probes.mesh.service import MeshService
from probes.mesh.store import MeshStore, StoreError
from probes.mesh.store_etcd import EtcdClient, EtcdStore
from probes.mesh.store_sqlite import SQLiteStore
from probes.model import VerdictState, signing
from probes.paths.asn import EMPTY, AsnTable, load_table
from probes.selfmetrics import ConfigReloads, self_registry

log = logging.getLogger(__name__)
trouble = RateLimitedLog(log)

SERVICE_KEY = web.AppKey("service", MeshService)
INGEST_KEY = web.AppKey("ingest", Ingest)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
ELECTOR_KEY = web.AppKey("elector", LeaderElector)
GUARD_KEY = web.AppKey("guard", connections.ConnectionGuard)
LEADER_HEADER = "X-Tunnelwatch-Leader"


def load_keys(cfg: MeshConfig) -> dict[str, AgentKey]:
    return {a.effective_key_id: AgentKey(a.name, signing.load_key(a.key_file)) for a in cfg.agents}


def open_store(cfg: MeshConfig) -> MeshStore:
    durability: Literal["normal", "full"] = "full" if cfg.durability == "full" else "normal"
    if cfg.store.type == "etcd":  # HA (docs/ha.md): engine inputs stay local in cfg.database
        client = EtcdClient(cfg.store.endpoints, cfg.store.request_timeout_seconds,
                            fail_fast_seconds=1.0)
        return EtcdStore(client, cfg.store.prefix, cfg.database, durability)
    return SQLiteStore(cfg.database, durability=durability)


def open_table(cfg: MeshConfig) -> AsnTable:
    """The operator's ASN table (raises AsnTableError naming the file and line)."""
    paths = cfg.paths
    if paths.asn_table is None:
        return EMPTY
    table = load_table(paths.asn_table, paths.asn_names, paths.local_asn)
    log.info("ASN table %s: %d prefixes, %d AS names", paths.asn_table, len(table),
             len(table.names))
    return table


def open_service(cfg: MeshConfig) -> MeshService:
    table = open_table(cfg)
    store = open_store(cfg)
    return MeshService(
        store,
        cfg.decision,
        cfg.node_infos(),
        snapshot_every=cfg.snapshot_every,
        snapshot_bytes=cfg.snapshot_bytes,
        background_snapshots=cfg.background_snapshots,
        weight_policy=cfg.weights,
        weight_nodes=cfg.weight_nodes(),
        path_policy=cfg.paths,
        asn_table=table,
    )


def build_app(
    cfg: MeshConfig,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], float] = time.time,
    service: MeshService | None = None,
) -> web.Application:
    """The mesh app. Opens the store (and recovers) now; closes it on app cleanup."""
    svc = service or open_service(cfg)
    registry = registry or CollectorRegistry()
    planner = ReprobePlanner(cfg.reprobe) if cfg.reprobe.enabled else None
    guard = connections.ConnectionGuard(connections.connection_limit(cfg.max_connections),
                                        cfg.idle_timeout_seconds)
    limits = IngestLimits(cfg.max_body_bytes, cfg.timestamp_window_seconds,
                          cfg.body_timeout_seconds, cfg.unverified_body_bytes)
    ingest = Ingest(svc, load_keys(cfg), limits, clock, reprobe=planner, guard=guard)
    token = signing.load_key(cfg.operator_token_file) if cfg.operator_token_file else None
    api = Api(lambda: ingest.service, token, clock, [a.name for a in cfg.agents])
    # the mesh's own families are written apart, in slices (the registry holds the rest)
    exposition = MeshExposition(
        MeshCollector(lambda: ingest.service, ingest.stats, planner, guard),
        WeightCollector(lambda: ingest.service), registry)
    reloads = ConfigReloads()
    reloads.succeeded()  # the mesh reads its config at start only
    self_registry("mesh", reloads, registry)

    app = web.Application(client_max_size=cfg.max_body_bytes,
                          handler_args=connections.handler_args(cfg.idle_timeout_seconds))
    app[SERVICE_KEY] = svc
    app[INGEST_KEY] = ingest
    app[REGISTRY_KEY] = registry
    app[GUARD_KEY] = guard

    async def metrics(request: web.Request) -> web.Response:
        body = await exposition.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_post("/v1/batches", ingest.handle)
    app.router.add_get("/metrics", metrics)
    app.router.add_routes(api.routes())

    async def ticker(app_: web.Application) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(cfg.tick_seconds)
                try:
                    await svc.tick(clock())
                except StoreError as exc:  # said once per 10 s; housekeeping probes the store
                    trouble("tick", "tick not stored: %s", exc)
                await svc.housekeeping()

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await svc.close()

    app.cleanup_ctx.append(ticker)
    elector = _elector(cfg, svc.store)
    started: list[Publishing] = []
    # after the ticker, so it stops first: nothing is delivered from a closed store
    app.cleanup_ctx.append(publishing_context(
        cfg.publishers, svc.outbox, registry, svc.listeners,
        gate=elector.may_publish if elector else None, on_ready=started.append,
        weights=lambda: ingest.service.weights, weight_listeners=svc.weight_listeners))
    if cfg.agent_check is not None:
        app.cleanup_ctx.append(_agent_check(cfg.agent_check, lambda: ingest.service))
    if elector is not None:
        _install_leadership(app, elector, svc, started, clock)
    if cfg.anycast is not None:
        anycast.install(
            app, cfg.anycast, [(n.id, n.pop, n.role) for n in cfg.nodes],
            operator_token=token, registry=registry, listeners=svc.listeners,
            pin_store=anycast.PinStore(Path(cfg.database)),
            current_states=lambda: anycast.member_states(ingest.service.engine.nodes))
    return app


def _agent_check(cfg: AgentCheckConfig, service: Callable[[], MeshService],
                 ) -> Callable[[web.Application], AsyncIterator[None]]:
    """HAProxy's agent checks answered from the live state (docs/weights.md)."""

    def status(node_id: str) -> tuple[VerdictState, int | None] | None:
        svc = service()
        node = svc.engine.nodes.get(node_id)
        if node is None:
            return None
        weight = svc.weights.weight_of(node_id) if svc.weights is not None else None
        return node.state, weight

    responder = AgentCheckServer(status, servers=cfg.servers,
                                 degraded_weight_percent=cfg.degraded_weight_percent)

    async def context(app: web.Application) -> AsyncIterator[None]:
        await responder.start(*cfg.listen_host_port())
        yield
        await responder.stop()

    return context


def _elector(cfg: MeshConfig, store: MeshStore) -> LeaderElector | None:
    if not isinstance(store, EtcdStore):
        return None
    # a client of its own: the election never fails fast, it retries at its own pace
    client = EtcdClient(cfg.store.endpoints, cfg.store.request_timeout_seconds)
    return LeaderElector(client, store.key("leader"), cfg.store.replica_name,
                         ttl=cfg.store.lease_ttl_seconds, margin=cfg.store.clock_margin_seconds)


def _install_leadership(app: web.Application, elector: LeaderElector, svc: MeshService,
                        started: list[Publishing], clock: Callable[[], float]) -> None:
    """HA: only the leader publishes; every replica says who leads and adopts shared admin
    states (set through any replica)."""
    store = svc.store
    assert isinstance(store, EtcdStore)
    app[ELECTOR_KEY] = elector

    @web.middleware
    async def leader_header(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.headers[LEADER_HEADER] = elector.leader
        return response

    async def leader(request: web.Request) -> web.Response:
        return web.json_response({"replica": elector.name, "leader": elector.leader,
                                  "leading": elector.may_publish(), "terms": elector.terms,
                                  "unsynced_verdicts": store.unsynced})

    app.middlewares.append(leader_header)
    app.router.add_get("/v1/leader", leader)
    app[REGISTRY_KEY].register(LeaderCollector(elector, lambda: store.unsynced))

    def on_change(allowed: bool) -> None:
        store.fence = elector.fence_token() if allowed else None
        for publishing in started:
            publishing.set_active(allowed)

    async def election(app_: web.Application) -> AsyncIterator[None]:
        async def admin_sync() -> None:
            while True:
                await asyncio.sleep(1.0)
                before = {name: node.admin for name, node in svc.engine.nodes.items()}
                try:
                    shared = await asyncio.to_thread(store.admin_states)
                    await adopt_admin_states(svc, shared, before, clock())
                except StoreError as exc:
                    log.warning("admin states not read from etcd: %s", exc)

        tasks = [asyncio.create_task(elector.run(on_change)), asyncio.create_task(admin_sync())]
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(elector.resign)  # followers take over without waiting the TTL

    app.cleanup_ctx.append(election)


async def adopt_admin_states(svc: MeshService, shared: dict[str, Any],
                             before: dict[str, Any], now: float) -> None:
    """Apply admin states set through another replica to this replica's engine. ``before`` is
    the engine's admin states when ``shared`` was requested: a node changed here meanwhile is
    left alone (``shared`` may predate that change)."""
    for name, node in list(svc.engine.nodes.items()):
        record = shared.get(name)
        wanted = record.state if record is not None else None
        if node.admin != wanted and before.get(name, node.admin) == node.admin:
            await svc.set_admin(name, wanted, record.actor if record is not None else "", now)


def tune_gc() -> None:
    """Make the collector cheap for a process holding ~10^6 long-lived engine objects.

    With the default thresholds every few thousand allocations (one decoded batch) trigger a
    young collection and the full collections rescan the whole engine. Objects alive after start-up
    move to the permanent generation, and young collections run 100x less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def serve(cfg: MeshConfig) -> None:
    """Run the mesh until SIGINT/SIGTERM."""
    host, port = cfg.listen_host_port()
    app = build_app(cfg)
    tune_gc()
    guard = app[GUARD_KEY]
    svc = app[SERVICE_KEY]
    log.info("mesh loaded: %d agents, %d nodes, database %s (%d journal entries replayed), "
             "%d publisher(s)", len(cfg.agents), len(cfg.nodes), cfg.database,
             svc.replayed_entries, len(cfg.publishers))
    connections.serve(app, host, port, guard)
