"""The anycast controller inside the mesh process: fed by committed verdicts, with an operator API.

``install(app, ...)`` adds to the mesh's aiohttp app:

* a listener on the mesh service: every committed verdict of a node or anycast check goes, in
  order, to the controller (a queue keeps the service's commit path synchronous and fast);
* a background task: on start the controller adopts what the speakers announce, is fed the
  current verdict of every member, then runs its timers and periodic reconcile;
* ``GET /v1/anycast`` (PoP states, what each speaker announces, pins, the audit trail) and
  ``POST /v1/anycast/{pop}/pin`` (operator bearer token; body ``{"pin": "announced" |
  "withdrawn" | null, "note": "...", "force": false, "actor": "..."}``);
* the anycast metrics collector on the mesh registry.

Stopping the mesh stops the controller without touching the speakers: routes stay announced as
they are (docs/anycast.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry

from probes.mesh.api import require_operator
from probes.mesh.bgp.controller import AnycastConfig, AnycastController
from probes.mesh.bgp.pop import Pin
from probes.mesh.bgp.speaker import GoBgpSpeaker, Speaker
from probes.model import Verdict, VerdictState

log = logging.getLogger(__name__)

CONTROLLER_KEY = web.AppKey("anycast", AnycastController)


def install(app: web.Application, cfg: AnycastConfig, members: Sequence[tuple[str, str, str]],
            *, operator_token: bytes | None, registry: CollectorRegistry,
            current_states: Callable[[], dict[str, VerdictState]],
            listeners: list[Callable[[list[Verdict]], None]],
            speakers: dict[str, Speaker] | None = None) -> AnycastController:
    speakers = speakers or {p.pop: GoBgpSpeaker(p.api_host, p.api_port, local_asn=p.asn)
                            for p in cfg.pops}
    controller = AnycastController(cfg, members, speakers)
    registry.register(controller.collector())
    app[CONTROLLER_KEY] = controller
    queue: asyncio.Queue[Verdict] = asyncio.Queue()
    member_ids = {m[0] for m in members}

    def on_committed(verdicts: list[Verdict]) -> None:
        for v in verdicts:
            if v.node in member_ids:
                queue.put_nowait(v)

    listeners.append(on_committed)

    async def feed() -> None:
        while True:
            verdict = await queue.get()
            try:
                await controller.on_verdict(verdict.node, verdict.state)
            except Exception:  # one bad step must not stop the feed
                log.exception("anycast: applying verdict %s", verdict.idempotency_key)

    async def context(app_: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()

        async def main() -> None:
            await controller.start()
            for node, state in current_states().items():
                if node in member_ids:
                    await controller.on_verdict(node, state)
            feeder = asyncio.create_task(feed())
            try:
                await controller.run(stop)
            finally:
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feeder

        task = asyncio.create_task(main(), name="anycast")
        yield
        stop.set()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(task, 5.0)

    app.cleanup_ctx.append(context)

    async def view(request: web.Request) -> web.Response:
        body = {"pops": controller.view(), "audit": controller.engine.audit[-100:],
                "changes": [msgspec.to_builtins(c) for c in controller.changes[-100:]]}
        return web.json_response(body)

    async def pin(request: web.Request) -> web.Response:
        require_operator(request, operator_token)
        try:
            body: Any = json.loads(await request.read() or b"{}")
        except ValueError:
            raise web.HTTPBadRequest(text="body must be JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        raw = body.get("pin")
        if raw not in (None, "announced", "withdrawn"):
            raise web.HTTPBadRequest(text="$.pin: expected announced, withdrawn or null")
        actor = body.get("actor") if isinstance(body.get("actor"), str) else "operator"
        note = body.get("note") if isinstance(body.get("note"), str) else ""
        try:
            changes = await controller.pin(request.match_info["pop"],
                                           Pin(raw) if raw else None, who=str(actor)[:64],
                                           note=str(note)[:200], force=body.get("force") is True)
        except KeyError:
            raise web.HTTPNotFound(text=f"unknown pop {request.match_info['pop']!r}") from None
        return web.json_response({"changes": [msgspec.to_builtins(c) for c in changes]})

    app.router.add_get("/v1/anycast", view)
    app.router.add_post("/v1/anycast/{pop}/pin", pin)
    return controller
