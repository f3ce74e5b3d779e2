"""The agent's HTTP endpoints (aiohttp): /metrics, /probe, /healthz, POST /-/reload.

``/probe?target=NODE&module=CHECK`` follows blackbox_exporter's multi-target pattern, so a
standard blackbox relabeling config works unchanged (``__param_target`` <- the node id,
``__address__`` -> the agent). Like blackbox_exporter it builds a fresh registry per request
and honours ``X-Prometheus-Scrape-Timeout-Seconds`` minus a 0.5 s offset, capped by the
check's tier timeout. ``module`` is a check name of that node (``tcp:443``,
``wireguard.handshake``) or a kind (``tcp``: the node's first TCP check).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from probes.agent.plan import PlannedCheck
from probes.checks.base import CheckResult, execute
from probes.config import parse_host_port
from probes.startup import bind_error

TIMEOUT_OFFSET = 0.5  # blackbox_exporter's --timeout-offset default


@dataclass
class HttpHooks:
    render_metrics: Callable[[], bytes]  # the /metrics body (text format 0.0.4)
    find_check: Callable[[str, str], PlannedCheck | None]
    tier_timeout: Callable[[PlannedCheck], float]
    reload: Callable[..., Awaitable[str]]  # reload(force=bool)
    health: Callable[[], dict[str, Any]]


def probe_registry(result: CheckResult, timeout: float) -> CollectorRegistry:
    """The per-request registry of one /probe answer."""
    registry = CollectorRegistry(auto_describe=True)
    Gauge("probe_success", "Whether the probe succeeded.", registry=registry).set(
        1 if result.ok else 0)
    Gauge("probe_duration_seconds", "How long the probe took.", registry=registry).set(
        result.duration_seconds)
    Gauge("probe_timeout_seconds", "The probe's time budget.", registry=registry).set(timeout)
    phases = Gauge("probe_phase_duration_seconds", "Duration of each probe phase.", ["phase"],
                   registry=registry)
    for phase, seconds in result.phases.items():
        phases.labels(phase).set(seconds)
    reason = Gauge("probe_failure_reason", "1 for the closed-enum reason of a failed probe.",
                   ["reason"], registry=registry)
    if not result.ok:
        reason.labels(result.reason.value).set(1)
    q = result.quality
    if q is not None:
        if q.rtt_p50_seconds is not None:
            Gauge("probe_rtt_seconds", "Median RTT of the probe's exchanges.",
                  registry=registry).set(q.rtt_p50_seconds)
        if q.sent:
            Gauge("probe_loss_ratio", "Share of exchanges without a reply.",
                  registry=registry).set(q.loss_ratio)
    return registry


def _render_and_trim(render: Callable[[], bytes]) -> bytes:
    body = render()
    _trim()  # hand the exposition's transient megabytes back to the OS now, not at exit
    return body


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _exposition(registry: CollectorRegistry) -> web.Response:
    return web.Response(body=generate_latest(registry), headers={"Content-Type":
                                                                 CONTENT_TYPE_LATEST})


def build_app(hooks: HttpHooks) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        # off the loop: a 10,000-target agent's exposition takes hundreds of ms of CPU, which
        # on the loop thread would delay every probe due meanwhile (and get them refused)
        body = await asyncio.to_thread(_render_and_trim, hooks.render_metrics)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def probe(request: web.Request) -> web.Response:
        target = request.query.get("target", "")
        module = request.query.get("module", "")
        if not target:
            return web.Response(status=400, text="Target parameter is missing\n")
        check = hooks.find_check(target, module)
        if check is None:
            return web.Response(status=400,
                                text=f"Unknown target {target!r} or module {module!r}\n")
        timeout = hooks.tier_timeout(check)
        header = request.headers.get("X-Prometheus-Scrape-Timeout-Seconds")
        if header:
            with contextlib.suppress(ValueError):
                timeout = max(min(timeout, float(header) - TIMEOUT_OFFSET), 0.1)
        result = await execute(check.kind, check.params, timeout)
        return _exposition(probe_registry(result, timeout))

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response(hooks.health())

    async def reload(request: web.Request) -> web.Response:
        force = request.query.get("force", "") in ("1", "true", "yes")
        try:
            message = await hooks.reload(force=force)
        except ValueError as exc:  # a bad config or a refused one: the running one stays
            return web.Response(status=400, text=f"reload refused: {exc}\n")
        except Exception as exc:  # whatever else, it must not take the agent down
            return web.Response(status=500, text=f"reload failed: {exc}\n")
        return web.Response(text=message + "\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/probe", probe)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/-/reload", reload)
    return app


def parse_listen(listen: str) -> tuple[str, int]:
    return parse_host_port(listen, default_host="127.0.0.1")


async def start_http(app: web.Application, listen: str) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = parse_listen(listen)
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise bind_error(exc, host, port) from None
    return runner


def find_check(checks: list[PlannedCheck], node: str, module: str) -> PlannedCheck | None:
    by_kind: PlannedCheck | None = None
    for c in checks:
        if c.node != node:
            continue
        if c.check == module:
            return c
        if by_kind is None and c.kind.name == module:
            by_kind = c
    return by_kind
