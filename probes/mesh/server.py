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

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from probes.mesh import signing
from probes.mesh.api import Api
from probes.mesh.bgp import runtime as anycast
from probes.mesh.config import MeshConfig
from probes.mesh.ingest import AgentKey, Ingest
from probes.mesh.metrics import MeshCollector
from probes.mesh.publish.runner import publishing_context
from probes.mesh.service import MeshService
from probes.mesh.store import StoreError
from probes.mesh.store_sqlite import SQLiteStore

log = logging.getLogger(__name__)

SERVICE_KEY = web.AppKey("service", MeshService)
INGEST_KEY = web.AppKey("ingest", Ingest)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)


def load_keys(cfg: MeshConfig) -> dict[str, AgentKey]:
    return {a.effective_key_id: AgentKey(a.name, signing.load_key(a.key_file)) for a in cfg.agents}


def open_service(cfg: MeshConfig) -> MeshService:
    store = SQLiteStore(cfg.database, durability="full" if cfg.durability == "full" else "normal")
    return MeshService(
        store,
        cfg.decision,
        cfg.node_infos(),
        snapshot_every=cfg.snapshot_every,
        snapshot_bytes=cfg.snapshot_bytes,
        background_snapshots=cfg.background_snapshots,
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
    ingest = Ingest(svc, load_keys(cfg), cfg.max_body_bytes, cfg.timestamp_window_seconds, clock)
    token = Path(cfg.operator_token_file).read_bytes().strip() if cfg.operator_token_file else None
    api = Api(lambda: ingest.service, token, clock, [a.name for a in cfg.agents])
    registry.register(MeshCollector(lambda: ingest.service, ingest.stats))

    app = web.Application(client_max_size=cfg.max_body_bytes)
    app[SERVICE_KEY] = svc
    app[INGEST_KEY] = ingest
    app[REGISTRY_KEY] = registry

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_post("/v1/batches", ingest.handle)
    app.router.add_get("/metrics", metrics)
    app.router.add_routes(api.routes())

    async def ticker(app_: web.Application) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(cfg.tick_seconds)
                try:
                    svc.tick(clock())
                    svc.housekeeping()
                except StoreError:
                    log.exception("tick not stored")

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        svc.close()

    app.cleanup_ctx.append(ticker)
    # after the ticker, so it stops first: nothing is delivered from a closed store
    app.cleanup_ctx.append(publishing_context(cfg.publishers, svc.store, registry, svc.listeners))
    if cfg.anycast is not None:
        anycast.install(
            app, cfg.anycast, [(n.id, n.pop, n.role) for n in cfg.nodes],
            operator_token=token, registry=registry, listeners=svc.listeners,
            pin_store=anycast.PinStore(Path(cfg.database)),
            current_states=lambda: anycast.member_states(ingest.service.engine.nodes))
    return app


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
    log.info("mesh listening on %s:%d, database %s", host, port, cfg.database)
    web.run_app(app, host=host, port=port, print=None, access_log=None)
