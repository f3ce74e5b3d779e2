"""The anycast controller inside the mesh process: fed by committed verdicts, with an operator API.

``install(app, ...)`` adds to the mesh's aiohttp app:

* a feed from the mesh service: what the probes say of every member node (DOWN when the
  node's pool guard holds it UP: a balancer pool fails open, a PoP must still be withdrawn when
  all its nodes fail) goes to the controller whenever verdicts are committed, and every
  ``POLL_SECONDS``; only changes are fed;
* a background task: on start the controller adopts what the speakers announce, is fed the
  current verdict of every member, then runs its timers and periodic reconcile;
* ``GET /v1/anycast`` (PoP states, what each speaker announces, pins, the audit trail) and
  ``POST /v1/anycast/{pop}/pin`` (operator bearer token; body ``{"pin": "announced" |
  "withdrawn" | null, "note": "...", "force": false, "actor": "..."}``); pins are saved
  next to the database and restored at start, and every pin change is appended to an audit file;
* the anycast metrics collector on the mesh registry.

Stopping the mesh stops the controller without touching the speakers: routes stay announced as
they are (docs/anycast.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry

from probes.aio import wait_at_most
from probes.mesh.api import operator_request, sanitise_text
from probes.mesh.bgp.controller import AnycastConfig, AnycastController
from probes.mesh.bgp.pop import Pin
from probes.mesh.bgp.speaker import GoBgpSpeaker, Speaker
from probes.mesh.state import NodeState
from probes.model import Verdict, VerdictState

log = logging.getLogger(__name__)

CONTROLLER_KEY = web.AppKey("anycast", AnycastController)
POLL_SECONDS = 0.5


def member_states(nodes: Mapping[str, NodeState]) -> dict[str, VerdictState]:
    """What each node's probes say, for PoP decisions: a node its pool's guard holds is DOWN."""
    return {name: VerdictState.DOWN if node.guard_hold else node.state
            for name, node in nodes.items()}


class PinStore:
    """Operator pins survive restarts: ``<database>.anycast-pins.json`` (replaced atomically) and
    an append-only audit trail ``<database>.anycast-audit.jsonl``."""

    def __init__(self, database: Path) -> None:
        self.pins_file = database.with_name(database.name + ".anycast-pins.json")
        self.audit_file = database.with_name(database.name + ".anycast-audit.jsonl")

    def load(self) -> dict[str, tuple[Pin, bool]]:
        try:
            raw = json.loads(self.pins_file.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            log.error("anycast: %s is corrupt; starting without pins", self.pins_file)
            return {}
        return {pop: (Pin(v["pin"]), bool(v.get("force"))) for pop, v in raw.items()
                if isinstance(v, dict) and v.get("pin") in ("announced", "withdrawn")}

    def save(self, pins: dict[str, tuple[Pin, bool]], audit: dict[str, object]) -> None:
        with self.audit_file.open("a") as f:
            f.write(json.dumps(audit) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp = self.pins_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({p: {"pin": pin.value, "force": force}
                                   for p, (pin, force) in pins.items()}))
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.replace(self.pins_file)


def install(app: web.Application, cfg: AnycastConfig, members: Sequence[tuple[str, str, str]],
            *, operator_token: bytes | None, registry: CollectorRegistry,
            current_states: Callable[[], dict[str, VerdictState]],
            listeners: list[Callable[[list[Verdict]], None]], pin_store: PinStore,
            speakers: dict[str, Speaker] | None = None) -> AnycastController:
    speakers = speakers or {p.pop: GoBgpSpeaker(p.api_host, p.api_port, local_asn=p.asn)
                            for p in cfg.pops}
    controller = AnycastController(cfg, members, speakers)
    controller.engine.restore_pins(pin_store.load())
    registry.register(controller.collector())
    app[CONTROLLER_KEY] = controller
    member_ids = {m[0] for m in members}
    dirty = asyncio.Event()
    fed: dict[str, VerdictState] = {}

    def on_committed(verdicts: list[Verdict]) -> None:
        if any(v.node in member_ids for v in verdicts):
            dirty.set()

    listeners.append(on_committed)

    async def feed_changes() -> None:
        for node, state in current_states().items():
            if node in member_ids and fed.get(node) is not state:
                fed[node] = state
                await controller.on_verdict(node, state)

    async def feed() -> None:
        # woken by committed verdicts, and polled too: a node held UP by its pool's guard
        # changes what the PoP should do without any verdict being published
        while True:
            await wait_at_most(dirty, POLL_SECONDS)
            dirty.clear()
            try:
                await feed_changes()
            except Exception:  # one bad step must not stop the feed
                log.exception("anycast: feeding verdicts")

    async def context(app_: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()

        async def main() -> None:
            await controller.start()
            await feed_changes()
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
        body = await operator_request(request, operator_token)
        raw = body.get("pin")
        if raw not in (None, "announced", "withdrawn"):
            raise web.HTTPBadRequest(text="$.pin: expected announced, withdrawn or null")
        actor = sanitise_text(body.get("actor"), 64, "operator")
        note = sanitise_text(body.get("note"), 200)
        try:
            changes = await controller.pin(request.match_info["pop"],
                                           Pin(raw) if raw else None, who=actor,
                                           note=note, force=body.get("force") is True)
        except KeyError:
            raise web.HTTPNotFound(text=f"unknown pop {request.match_info['pop']!r}") from None
        pin_store.save(controller.engine.pins(), controller.engine.audit[-1])
        return web.json_response({"changes": [msgspec.to_builtins(c) for c in changes]})

    app.router.add_get("/v1/anycast", view)
    app.router.add_post("/v1/anycast/{pop}/pin", pin)
    return controller
