"""The agent's HTTP endpoints: /metrics, /probe, /healthz, POST /-/reload (served by
:mod:`probes.agent.httpserve`, a lean keep-alive server; heads parsed by
:mod:`probes.agent.httphead`).

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
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST

from probes.agent.httphead import Head, query_params
from probes.agent.httpserve import JSON, TEXT, Answer, Connection, HttpServer
from probes.agent.probe_target import ProbeChoice, ProbeRequestError
from probes.aio import take_in_slices
from probes.checks.base import CheckResult, execute, start_run
from probes.config import parse_host_port
from probes.promtext import escape_label_value, go_float
from probes.startup import bind_error

TIMEOUT_OFFSET = 0.5  # blackbox_exporter's --timeout-offset default
RENDER_SLICE = 0.0005  # seconds of /metrics rendering between two looks at due probes
RENDER_CHECK_EVERY = 2  # pieces (each up to 32 lines) joined between two looks at the clock


@dataclass
class HttpHooks:
    # the /metrics body (text format 0.0.4) in pieces, made as they are taken
    render_metrics: Callable[[], Iterable[str]]
    choose_probe: Callable[[str, str], ProbeChoice]  # (target, module); ProbeRequestError
    tier_timeout: Callable[[ProbeChoice], float]
    reload: Callable[..., Awaitable[str]]  # reload(force=bool)
    health: Callable[[], dict[str, Any]]


def _family(name: str, help_text: str) -> str:
    return f"# HELP {name} {help_text}\n# TYPE {name} gauge\n"


# the families' HELP and TYPE lines, and the lines that take no value of the result, written
# once: a /probe answer only formats its numbers
_SUCCESS = {ok: _family("probe_success", "Whether the probe succeeded.")
            + f"probe_success {1.0 if ok else 0.0}\n" for ok in (True, False)}
_DURATION = _family("probe_duration_seconds", "How long the probe took.")
_TIMEOUT = _family("probe_timeout_seconds", "The probe's time budget.")
_PHASES = _family("probe_phase_duration_seconds", "Duration of each probe phase.")
_REASON = _family("probe_failure_reason", "1 for the closed-enum reason of a failed probe.")
_RTT = _family("probe_rtt_seconds", "Median RTT of the probe's exchanges.")
_LOSS = _family("probe_loss_ratio", "Share of exchanges without a reply.")


@functools.lru_cache(maxsize=256)
def _labelled(family: str, label: str, value: str) -> str:
    return f'{family}{{{label}="{escape_label_value(value)}"}} '


def _number(value: float) -> str:
    """:func:`go_float`, which is ``repr`` for every value in [0, 1e6) (the durations)."""
    return repr(value) if 0.0 <= value < 1e6 else go_float(value)


def probe_exposition(result: CheckResult, timeout: float) -> bytes:
    """The body of one /probe answer: blackbox_exporter's families for one result, written
    directly (a fresh prometheus_client registry per request cost more CPU than the probe),
    byte for byte what such a registry exposes (tests/agent/test_probe_exposition.py)."""
    parts = [_SUCCESS[result.ok], _DURATION, "probe_duration_seconds ",
             _number(result.duration_seconds), "\n", _TIMEOUT, "probe_timeout_seconds ",
             _number(timeout), "\n", _PHASES]
    for phase, seconds in result.phases.items():
        parts += (_labelled("probe_phase_duration_seconds", "phase", phase), _number(seconds),
                  "\n")
    parts.append(_REASON)
    if not result.ok:
        parts += (_labelled("probe_failure_reason", "reason", result.reason.value), "1.0\n")
    q = result.quality
    if q is not None:
        if q.rtt_p50_seconds is not None:
            parts += (_RTT, "probe_rtt_seconds ", _number(q.rtt_p50_seconds), "\n")
        if q.sent:
            parts += (_LOSS, "probe_loss_ratio ", _number(q.loss_ratio), "\n")
    return "".join(parts).encode()


async def render_between_probes(parts: Iterable[str]) -> bytes:
    """Join the exposition's pieces on the event loop, giving the loop back every
    ``RENDER_SLICE`` seconds so that due probes start on time: a 4,000-target agent's
    exposition is ~50 ms of CPU, and rendered at once (or on a worker thread, which on the
    agent's one core takes the CPU and the GIL from the loop all the same) it made the starts
    due meanwhile tens of ms late, the whole p99 of the start error."""
    out = await take_in_slices(parts, RENDER_SLICE, RENDER_CHECK_EVERY)
    body = "".join(out).encode("utf-8")
    del out
    # hand the exposition's transient megabytes back to the OS now, not at exit (off the loop:
    # the C call releases the GIL)
    await asyncio.to_thread(_trim)
    return body


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


ROUTES = {"/metrics": ("GET", "HEAD"), "/probe": ("GET", "HEAD"), "/healthz": ("GET", "HEAD"),
          "/-/reload": ("POST",)}
EXPOSITION = CONTENT_TYPE_LATEST.encode()
QUERY_MEMO_MAX = 256  # distinct query strings whose parameters are remembered


class Endpoints:
    """/metrics, /probe, /healthz and POST /-/reload, answered through :mod:`httpserve`."""

    def __init__(self, hooks: HttpHooks) -> None:
        self.hooks = hooks
        self._queries: dict[str, dict[str, str]] = {}

    def handle(self, conn: Connection, head: Head) -> Answer | None:
        allowed = ROUTES.get(head.path)
        if allowed is None:
            return Answer.text(404, "404: Not Found")
        if head.method not in allowed:
            return Answer(405, b"405: Method Not Allowed", TEXT,
                          b"Allow: %s\r\n" % ", ".join(allowed).encode())
        if head.path == "/probe":
            return self.probe(conn, head)
        if head.path == "/metrics":
            conn.spawn(self.metrics())
        elif head.path == "/healthz":
            return Answer(200, json.dumps(self.hooks.health()).encode(), JSON)
        else:
            conn.spawn(self.reload(self.query(head.query).get("force", "")))
        return None

    def query(self, raw: str) -> dict[str, str]:
        """The query's parameters, remembered per query string (a scraper repeats its own)."""
        params = self._queries.get(raw)
        if params is None:
            if len(self._queries) >= QUERY_MEMO_MAX:
                self._queries.clear()
            params = self._queries[raw] = query_params(raw)
        return params

    def probe(self, conn: Connection, head: Head) -> Answer | None:
        query = self.query(head.query)
        target, module = query.get("target", ""), query.get("module", "")
        try:
            choice = self.hooks.choose_probe(target, module)
        except ProbeRequestError as exc:
            return Answer.text(400, f"{exc}\n")
        timeout = self.hooks.tier_timeout(choice)
        header = head.headers.get("x-prometheus-scrape-timeout-seconds")
        if header:
            with contextlib.suppress(ValueError):
                timeout = max(min(timeout, float(header) - TIMEOUT_OFFSET), 0.1)
        if query.get("debug", "").lower() == "true":
            conn.spawn(self.debug(choice, target, module, timeout))
        elif not self.start_probe(conn, choice, timeout):
            conn.spawn(self.run_probe(choice, timeout))
        return None

    @staticmethod
    def start_probe(conn: Connection, choice: ProbeChoice, timeout: float) -> bool:
        """Start the check without a coroutine where its kind can (``CheckKind.start``, as the
        scheduler does: no task, deadline context or future per probe); False when it cannot."""
        def done(result: CheckResult) -> None:
            conn.answer(Answer(200, probe_exposition(result, timeout), EXPOSITION))

        conn.running = start_run(choice.kind, choice.params, timeout, done)
        return conn.running is not None

    @staticmethod
    async def run_probe(choice: ProbeChoice, timeout: float) -> Answer:
        result = await execute(choice.kind, choice.params, timeout)
        return Answer(200, probe_exposition(result, timeout), EXPOSITION)

    @staticmethod
    async def debug(choice: ProbeChoice, target: str, module: str, timeout: float) -> Answer:
        return Answer.text(200, await debug_probe(choice, target, module, timeout))

    async def metrics(self) -> Answer:
        return Answer(200, await render_between_probes(self.hooks.render_metrics()),
                      EXPOSITION)

    async def reload(self, force: str) -> Answer:
        try:
            message = await self.hooks.reload(force=force in ("1", "true", "yes"))
        except ValueError as exc:  # a bad config or a refused one: the running one stays
            return Answer.text(400, f"reload refused: {exc}\n")
        except Exception as exc:  # whatever else, it must not take the agent down
            return Answer.text(500, f"reload failed: {exc}\n")
        return Answer.text(200, message + "\n")


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


async def start_http(hooks: HttpHooks, listen: str) -> HttpServer:
    server = HttpServer(Endpoints(hooks).handle)
    host, port = parse_listen(listen)
    try:
        await server.listen(host, port)
    except OSError as exc:
        await server.cleanup()
        raise bind_error(exc, host, port) from None
    return server
