"""The mesh's read and operator API.

* ``GET /v1/verdicts`` — the current verdict of every node; ``?vantages=1`` adds each vantage's
  opinion (what ``tunnelwatch status`` draws); ``?after=ID[&limit=N][&node=X]`` returns the
  verdict log after log id ``ID`` instead (the audit trail, publishers' view).
* ``GET /v1/nodes`` — every node: state, and with weights on its weight, the evidence behind it,
  its smoothed load and sessions, and a drain's progress (docs/weights.md).
* ``GET /v1/nodes/{id}`` — one node: verdict, votes, guard and quorum flags, admin state, the last
  verdict's reasons, and the per-vantage picture down to each check; with weights on, the same
  weight, load and drain fields as ``/v1/nodes``; and ``paths``: each vantage's latest trace to it
  (hops with their networks, route changes, where a failing one loses it) and the node's path
  localisation (docs/paths.md).
* ``GET /v1/paths`` — the fleet's path faults: every failing (node, vantage) with where it is
  lost, and each vantage that loses most of its failing nodes after one network.
* ``POST /v1/nodes/{id}/drain|maintenance|ready`` — operator actions; ``Authorization: Bearer
  <token>`` from ``operator_token_file``; optional JSON body ``{"actor": "name"}``. Each action is
  journaled and its verdict change is in the log with an ``admin`` reason naming the actor.
* ``GET /v1/audit[?limit=N]`` — the latest audit notes (newest last): quorum lost or regained,
  a vantage judged impaired or cleared, a change held by the minimum dwell. None of these
  changes a published state, so none is a verdict record.
* ``GET /healthz`` — 200 while the mesh is serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from aiohttp import web

from probes.mesh.decision import OPINION_NAMES
from probes.mesh.service import AUDIT_RECENT, MeshService
from probes.mesh.store import StoreError
from probes.model import VerdictState

ACTIONS: dict[str, VerdictState | None] = {
    "drain": VerdictState.DRAINING,
    "maintenance": VerdictState.MAINTENANCE,
    "ready": None,
}
MAX_LOG_LIMIT = 10_000
MAX_LOG_ID = 2**63 - 1  # log ids are SQLite integers / etcd revisions
MAX_ACTOR = 64
MAX_ADMIN_BODY = 4096  # {"actor": "..."}: a few bytes; nothing bigger is read


class Api:
    def __init__(
        self,
        service: Callable[[], MeshService],
        operator_token: bytes | None,
        clock: Callable[[], float] = time.time,
        agents: Sequence[str] = (),
    ) -> None:
        self._service = service
        self._token = operator_token
        self._clock = clock
        self._agents = tuple(agents)  # configured vantages: shown before their first report

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/verdicts", self.verdicts),
            web.get("/v1/nodes", self.nodes),
            web.get("/v1/nodes/{node}", self.node),
            web.get("/v1/audit", self.audit),
            web.get("/v1/paths", self.paths),
            web.post("/v1/nodes/{node}/{action}", self.admin),
            web.get("/healthz", self.healthz),
        ]

    async def verdicts(self, request: web.Request) -> web.Response:
        service = self._service()
        q = request.query
        if "after" in q:
            try:
                after = int(q["after"])
                limit = int(q.get("limit", "1000"))
            except ValueError:
                raise web.HTTPBadRequest(text="after and limit are integers") from None
            if not (0 <= after <= MAX_LOG_ID and 1 <= limit <= MAX_LOG_ID):
                raise web.HTTPBadRequest(text=f"after is 0..{MAX_LOG_ID}, limit at least 1")
            limit = min(limit, MAX_LOG_LIMIT)
            try:
                entries = await service.read(service.store.verdicts, after, limit, q.get("node"))
            except StoreError:
                raise web.HTTPServiceUnavailable(text="the store cannot be read; retry") from None
            log = [{"id": e.id, "verdict": msgspec.to_builtins(e.verdict)} for e in entries]
            return _json({"log": log, "next": entries[-1].id if entries else after})
        with_vantages = q.get("vantages") in ("1", "true", "yes")
        engine = service.engine
        now = service.last_now
        stale = engine.policy.stale_after_seconds
        nodes = []
        for name, node in engine.nodes.items():
            item: dict[str, Any] = {
                "node": name,
                "pool": node.info.pool,
                "state": node.state.value,
                "probe_state": node.probe_state.value,
                "seq": node.seq,
                "quorum_lost": node.quorum_lost,
                "guard_hold": node.guard_hold,
                "admin": node.admin.value if node.admin is not None else None,
                "votes": msgspec.to_builtins(node.votes),
            }
            if service.weights is not None:
                item["weight"] = service.weights.weight_of(name)
            if with_vantages:
                item["vantages"] = {
                    v: (
                        "STALE"
                        if now - nv.seen > stale
                        else "IMPAIRED"
                        if nv.vantage.impaired
                        else OPINION_NAMES[nv.opinion]
                    )
                    for v, nv in node.nvs.items()
                }
            nodes.append(item)
        vantages = sorted(set(engine.vantages) | set(self._agents))
        return _json({"now": now, "vantages": vantages, "nodes": nodes})

    async def audit(self, request: web.Request) -> web.Response:
        try:
            limit = max(0, min(int(request.query.get("limit", "100")), AUDIT_RECENT))
        except ValueError:
            raise web.HTTPBadRequest(text="limit is an integer") from None
        notes = list(self._service().audit)[-limit:] if limit else []
        return _json({"audit": [msgspec.to_builtins(n) for n in notes]})

    async def node(self, request: web.Request) -> web.Response:
        service = self._service()
        name = request.match_info["node"]
        if name not in service.engine.nodes:
            raise web.HTTPNotFound(text=f"unknown node {name!r}")
        view = service.engine.node_view(name, service.last_now)
        view.update(weight_view(service, name))
        view["paths"] = service.paths.node_view(name, service.last_now)
        return _json(view)

    async def nodes(self, request: web.Request) -> web.Response:
        service = self._service()
        out = []
        for name, node in service.engine.nodes.items():
            item: dict[str, Any] = {"node": name, "pool": node.info.pool, "pop": node.info.pop,
                                    "state": node.state.value, "seq": node.seq}
            item.update(weight_view(service, name))
            out.append(item)
        return _json({"now": service.last_now, "weights": service.weights is not None,
                      "nodes": out})

    async def paths(self, request: web.Request) -> web.Response:
        service = self._service()
        paths = service.paths
        now = service.last_now
        faults = [
            {"node": node, "vantage": vantage, "kind": f.kind, "ttl": f.ttl or None,
             "hop": f.hop.addr if f.hop else None, "asn": f.network.asn if f.hop else None,
             "network": f.network.label if f.hop else None, "mtu": f.mtu,
             "summary": f.sentence(vantage, node)}
            for node, vantage, f in paths.faults(now)
        ]
        vantages = {}
        for vantage in sorted(paths.failing_vantages()):
            fault = paths.vantage_fault(vantage, now)
            if fault is not None:
                vantages[vantage] = {"asn": fault.network.asn, "network": fault.network.label,
                                     "hop": fault.hop.addr if fault.hop else None,
                                     "nodes": fault.nodes, "failing": fault.failing,
                                     "summary": fault.sentence()}
        return _json({"now": now, "faults": faults, "vantages": vantages})

    async def admin(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action not in ACTIONS:
            raise web.HTTPNotFound(
                text=f"unknown action {action!r}; one of drain, maintenance, ready"
            )
        body = await operator_request(request, self._token)
        actor = sanitise_text(body.get("actor"), MAX_ACTOR, "operator")
        name = request.match_info["node"]
        service = self._service()
        try:
            changes = await service.set_admin(name, ACTIONS[action], actor, self._clock())
        except KeyError:
            raise web.HTTPNotFound(text=f"unknown node {name!r}") from None
        except StoreError:
            raise web.HTTPServiceUnavailable(text="not stored; retry") from None
        node = service.engine.nodes[name]
        return _json(
            {
                "node": name,
                "state": node.state.value,
                "admin": node.admin.value if node.admin is not None else None,
                "changes": [msgspec.to_builtins(c) for c in changes],
            }
        )

    async def healthz(self, request: web.Request) -> web.Response:
        """200 while the mesh decides and stores; 503 while its store cannot commit (it then
        refuses inputs rather than decide alone), saying why."""
        service = self._service()
        health = service.health
        return _json(
            {
                "ok": health.ok,
                **health.view(),
                "nodes": len(service.engine.nodes),
                "now": service.last_now,
                # journal entries replayed at start: 0 after a clean shutdown
                "replayed_at_start": service.replayed_entries,
            },
            status=200 if health.ok else 503,
        )


def weight_view(service: MeshService, name: str) -> dict[str, Any]:
    """A node's weight, its evidence, load and drain progress (empty with weights off)."""
    weights = service.weights
    if weights is None or name not in weights.nodes:
        return {}
    now = service.last_now
    view = weights.view(name, now)
    node = service.engine.nodes.get(name)
    if node is not None and node.state == VerdictState.DRAINING:
        view["drain"] = {"done": weights.drain_done(name, now),
                         "sessions": view["sessions"],
                         "effective_sessions": view["effective_sessions"],
                         "bound": weights.policy.drain_done_sessions}
    return view


def sanitise_text(text: object, limit: int, default: str = "") -> str:
    """Operator-given text (an actor's name, a note) fit for logs, the audit trail and a
    terminal: line breaks become spaces, control and format characters (escape codes, bidi
    overrides) are dropped, runs of spaces collapse, at most ``limit`` characters; ``default``
    when nothing is left (or it was not a string)."""
    if not isinstance(text, str):
        return default
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if char in "\t\n\r" or category in ("Zl", "Zp"):
            kept.append(" ")
        elif not category.startswith("C"):
            kept.append(char)
    cleaned = " ".join("".join(kept).split())[:limit].strip()
    return cleaned or default


async def operator_request(request: web.Request, token: bytes | None) -> dict[str, Any]:
    """The JSON object body of an operator's request (``{}`` when empty), after the bearer
    token was checked and before more than ``MAX_ADMIN_BODY`` bytes are read."""
    require_operator(request, token)
    if not request.can_read_body:
        return {}
    length = request.content_length
    if length is None or length > MAX_ADMIN_BODY:
        raise web.HTTPRequestEntityTooLarge(MAX_ADMIN_BODY, length or 0)
    try:
        body = json.loads(await request.content.readexactly(length) or b"{}")
    except (ValueError, asyncio.IncompleteReadError):
        raise web.HTTPBadRequest(text="body must be JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


def require_operator(request: web.Request, token: bytes | None) -> None:
    """Raise unless the request carries the operator bearer token (403 when none is set up)."""
    if token is None:
        raise web.HTTPForbidden(text="no operator_token_file configured: admin API disabled")
    auth = request.headers.get("Authorization", "")
    # header bytes that are not UTF-8 arrive as surrogate escapes: compare them as sent
    given = auth[7:].strip().encode("utf-8", "surrogateescape") if auth.startswith("Bearer ") \
        else b""
    if not given or not hmac.compare_digest(given, token):
        raise web.HTTPUnauthorized(
            text="bearer token required", headers={"WWW-Authenticate": "Bearer"}
        )


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), content_type="application/json",
                        status=status)
