"""The agent's HTTP endpoints (aiohttp): /metrics, /probe, /healthz, POST /-/reload.

``/probe?target=TARGET&module=MODULE`` follows blackbox_exporter's multi-target pattern, so a
standard blackbox relabeling config works unchanged (``__param_target`` <- a node id or an
address, ``__address__`` -> the agent); what target and module may be is
:mod:`probes.agent.probe_target`. Like blackbox_exporter it builds a fresh registry per request,
honours ``X-Prometheus-Scrape-Timeout-Seconds`` minus a 0.5 s offset (capped by the check's tier
timeout), answers 400 naming an unknown module or a bad target, and with ``debug=true`` answers
the probe's log, the metrics it would have returned and the check it ran, as text.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from probes.agent.metrics import escape_label_value, go_float
from probes.agent.probe_target import ProbeChoice, ProbeRequestError
from probes.checks.base import CheckResult, execute
from probes.config import parse_host_port
from probes.startup import bind_error

TIMEOUT_OFFSET = 0.5  # blackbox_exporter's --timeout-offset default
RENDER_SLICE = 0.0005  # seconds of /metrics rendering between two looks at due probes
RENDER_CHECK_EVERY = 64  # pieces joined between two looks at the clock


@dataclass
class HttpHooks:
    # the /metrics body (text format 0.0.4) in pieces, made as they are taken
    render_metrics: Callable[[], Iterable[str]]
    choose_probe: Callable[[str, str], ProbeChoice]  # (target, module); ProbeRequestError
    tier_timeout: Callable[[ProbeChoice], float]
    reload: Callable[..., Awaitable[str]]  # reload(force=bool)
    health: Callable[[], dict[str, Any]]


def _gauge(name: str, help_text: str, samples: list[tuple[str, float]]) -> str:
    """One gauge family in the text format 0.0.4, as prometheus_client writes it."""
    lines = [f"# HELP {name} {help_text}\n# TYPE {name} gauge\n"]
    lines.extend(f"{name}{labels} {go_float(value)}\n" for labels, value in samples)
    return "".join(lines)


def _label(name: str, value: str) -> str:
    return f'{{{name}="{escape_label_value(value)}"}}'


def probe_exposition(result: CheckResult, timeout: float) -> bytes:
    """The body of one /probe answer: blackbox_exporter's families for one result, written
    directly (a fresh prometheus_client registry per request cost more CPU than the probe)."""
    parts = [
        _gauge("probe_success", "Whether the probe succeeded.", [("", 1 if result.ok else 0)]),
        _gauge("probe_duration_seconds", "How long the probe took.",
               [("", result.duration_seconds)]),
        _gauge("probe_timeout_seconds", "The probe's time budget.", [("", timeout)]),
        _gauge("probe_phase_duration_seconds", "Duration of each probe phase.",
               [(_label("phase", phase), seconds) for phase, seconds in result.phases.items()]),
        _gauge("probe_failure_reason", "1 for the closed-enum reason of a failed probe.",
               [] if result.ok else [(_label("reason", result.reason.value), 1)]),
    ]
    q = result.quality
    if q is not None:
        if q.rtt_p50_seconds is not None:
            parts.append(_gauge("probe_rtt_seconds", "Median RTT of the probe's exchanges.",
                                [("", q.rtt_p50_seconds)]))
        if q.sent:
            parts.append(_gauge("probe_loss_ratio", "Share of exchanges without a reply.",
                                [("", q.loss_ratio)]))
    return "".join(parts).encode()


async def render_between_probes(parts: Iterable[str]) -> bytes:
    """Join the exposition's pieces on the event loop, giving the loop back every
    ``RENDER_SLICE`` seconds so that due probes start on time: a 4,000-target agent's
    exposition is ~50 ms of CPU, and rendered at once (or on a worker thread, which on the
    agent's one core takes the CPU and the GIL from the loop all the same) it made the starts
    due meanwhile tens of ms late, the whole p99 of the start error."""
    out: list[str] = []
    deadline = time.perf_counter() + RENDER_SLICE
    for part in parts:
        out.append(part)
        if len(out) % RENDER_CHECK_EVERY == 0 and time.perf_counter() >= deadline:
            await asyncio.sleep(0)
            deadline = time.perf_counter() + RENDER_SLICE
    body = "".join(out).encode("utf-8")
    del out
    # hand the exposition's transient megabytes back to the OS now, not at exit (off the loop:
    # the C call releases the GIL)
    await asyncio.to_thread(_trim)
    return body


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def build_app(hooks: HttpHooks) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = await render_between_probes(hooks.render_metrics())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def probe(request: web.Request) -> web.Response:
        target = request.query.get("target", "")
        module = request.query.get("module", "")
        try:
            choice = hooks.choose_probe(target, module)
        except ProbeRequestError as exc:
            return web.Response(status=400, text=f"{exc}\n")
        timeout = hooks.tier_timeout(choice)
        header = request.headers.get("X-Prometheus-Scrape-Timeout-Seconds")
        if header:
            with contextlib.suppress(ValueError):
                timeout = max(min(timeout, float(header) - TIMEOUT_OFFSET), 0.1)
        if request.query.get("debug", "").lower() == "true":
            return web.Response(text=await debug_probe(choice, target, module, timeout))
        result = await execute(choice.kind, choice.params, timeout)
        return web.Response(body=probe_exposition(result, timeout),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

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


async def debug_probe(choice: ProbeChoice, target: str, module: str, timeout: float) -> str:
    """``debug=true``: the probe's log, the metrics it would have returned and the check it
    ran, as text (blackbox_exporter's three sections)."""
    lines = [f"Beginning probe: target={target} module={module} check={choice.name} "
             f"kind={choice.kind.name} ({choice.source}) timeout={timeout:g}s"]
    with captured_logs() as records:
        result = await execute(choice.kind, choice.params, timeout)
    lines.extend(f"{r.levelname} {r.name}: {r.getMessage()}" for r in records)
    for phase, seconds in result.phases.items():
        lines.append(f"phase {phase}: {seconds * 1000:.1f} ms")
    outcome = "succeeded" if result.ok else f"failed: reason={result.reason.value}"
    lines.append(f"Probe {outcome} after {result.duration_seconds * 1000:.1f} ms"
                 + (f"; {result.detail}" if result.detail else ""))
    metrics = probe_exposition(result, timeout).decode()
    params = json.dumps(msgspec.to_builtins(choice.params), default=str, indent=2)
    return ("Logs for the probe:\n" + "\n".join(lines) + "\n\n"
            "Metrics that would have been returned:\n" + metrics + "\n"
            f"Module configuration:\n{choice.kind.name} ({choice.source}):\n{params}\n")


@contextlib.contextmanager
def captured_logs() -> Iterator[list[logging.LogRecord]]:
    """The ``probes`` log records of the current task while the block runs."""
    records: list[logging.LogRecord] = []
    token = _CAPTURE.set(records)
    try:
        yield records
    finally:
        _CAPTURE.reset(token)


_CAPTURE: contextvars.ContextVar[list[logging.LogRecord] | None] = contextvars.ContextVar(
    "probe_log_capture", default=None)


class _CaptureHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        records = _CAPTURE.get()
        if records is not None and len(records) < 1000:
            records.append(record)


logging.getLogger("probes").addHandler(_CaptureHandler())


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
