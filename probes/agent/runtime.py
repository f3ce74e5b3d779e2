"""The agent process: config -> plan -> scheduler -> metrics, reporter, HTTP; reload; shutdown.

Lifecycle:

* start: load and validate the config, plan the checks, open the spool (the reporter resumes
  where the last run stopped, also after a SIGKILL), start the scheduler and the HTTP server;
* SIGHUP or ``POST /-/reload``: re-read the config; a bad one is refused with its problems and
  the running one kept. Checks that still exist keep their slot, due time and rise/fall state;
* SIGTERM / SIGINT: start nothing new, give in-flight probes ``PROBE_GRACE`` seconds and cancel
  the rest (a cancelled probe reports nothing: it is no failure of the node), commit what came in
  to the spool and give the senders ``DRAIN_SECONDS`` to deliver; what is left is sent next
  start. The whole stop stays under 2 s (a session probe's 10 s timeout once made it 13 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from probes.agent.http import HttpHooks, start_http
from probes.agent.httpserve import HttpServer
from probes.agent.metrics import (
    AgentCollector,
    ProbeStats,
    ReporterStats,
    TracerStats,
    new_registry,
)
from probes.agent.plan import PlannedCheck, check_key, plan, reload_removal_problem
from probes.agent.probe_target import Chooser
from probes.agent.reporter import Reporter
from probes.agent.scheduler import AgentScheduler, ProbeRun, ScheduleCore
from probes.agent.tracer import Tracer
from probes.config import AgentConfig, load_agent_config, resolve_path
from probes.model import (
    AGENT_SIDE_REASONS,
    LOCAL_TIERS,
    Observation,
    signing,
    within_bounds,
)
from probes.selfmetrics import ConfigReloads, self_registry

log = logging.getLogger(__name__)
# APScheduler logs every job run at INFO: two lines per tier round are noise, not context
logging.getLogger("apscheduler").setLevel(logging.WARNING)

SPOOL_FILE = "spool.sqlite"
PROBE_GRACE = 0.5  # seconds in-flight probes get on SIGTERM before they are cancelled
DRAIN_SECONDS = 1.0  # seconds the senders get on SIGTERM; the spool keeps the rest


class ReloadRefused(ValueError):
    """A reload that would remove more than half of the running checks, without force."""
DETAIL_MAX = 200


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (which carries key=value context)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def release_parse_memory() -> None:
    """Hand the memory a big config parse used back to the OS (glibc keeps freed heap pages),
    and move the long-lived plan out of the collector's sight: with 10,000 targets a full
    collection walking it stalls the loop for tens of ms, which shows up as probe start lag."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    gc.freeze()
    # the spool commits on a worker thread; a short GIL switch interval (default 5 ms) lets the
    # event loop thread take the GIL back quickly when a probe is due meanwhile
    sys.setswitchinterval(0.0005)


def observation(run: ProbeRun, vantage: str, seq: int) -> Observation:
    """What the mesh is told of one probe run: its kind and the tier the kind declares, the
    result, clamped into the wire bounds (one odd figure must not cost the mesh the batch)."""
    check, result = run.check, run.result
    # every field given, in the struct's order, by position: the keywords' matching cost ~600
    # instructions an observation (callgrind), one is made for every probe
    return within_bounds(Observation(
        check.node, check.check, vantage, seq, run.wall_time,  # node, check, vantage, seq, wall
        result.ok, result.reason, result.duration_seconds,  # ok, reason, duration_seconds
        check.kind.name, check.tier, result.phases, result.quality,  # kind, tier, phases, quality
        result.detail[:DETAIL_MAX], result.load))  # detail, load

class Agent:
    def __init__(self, config_path: str | Path, *, use_apscheduler: bool = True,
                 listen: str | None = None) -> None:
        self.config_path = Path(config_path)
        self.base_dir = self.config_path.parent.resolve()
        self.config: AgentConfig = load_agent_config(self.config_path)
        self.listen = listen or self.config.agent.listen
        self.vantage = self.config.agent.vantage
        self.started_at = time.time()
        self.probe_stats = ProbeStats()
        self.reporter_stats = ReporterStats()
        self.tracer_stats = TracerStats()
        self.tracer: Tracer | None = None
        self.core = ScheduleCore(self.config.tiers, max_rate=self.config.agent.max_probe_rate,
                                 max_reprobe_rate=self.config.agent.max_reprobe_rate)
        self.scheduler = AgentScheduler(
            self.core, self._on_run, max_concurrency=self.config.agent.max_concurrency,
            per_node_concurrency=self.config.agent.per_node_concurrency,
            max_start_lag=self.config.agent.max_start_lag, use_apscheduler=use_apscheduler)
        self.checks: list[PlannedCheck] = []
        self._apply_plan(self.config)
        self.collector = AgentCollector(self.vantage, self.probe_stats,
                                        lambda: self.scheduler.stats, self.reporter_stats,
                                        self._scheduler_info, tracer=self.tracer_stats)
        self.registry = new_registry(self.collector)
        self.reloads = ConfigReloads()
        self.reloads.succeeded()  # the config it runs on was just loaded
        self.self_registry = self_registry("agent", self.reloads)
        self.reporter: Reporter | None = None
        self._http: HttpServer | None = None
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        release_parse_memory()

    # ---------------------------------------------------------------- plan

    @property
    def state_dir(self) -> Path:
        return resolve_path(self.config.agent.state_dir, self.base_dir)

    def _apply_plan(self, config: AgentConfig, checks: list[PlannedCheck] | None = None) -> str:
        if checks is None:
            checks = plan(config, self.base_dir)
        report = self.scheduler.reload(checks, config.tiers)
        refused = set(report.refused)
        self.checks = [c for c in checks if c.key not in refused]
        self.probe_stats.plan(self.checks)
        if refused:
            log.warning("admission: refused %d of %d checks: planned rate would exceed "
                        "max_probe_rate=%.0f/s (admitted %.0f/s); first refused: %s",
                        len(refused), len(checks), config.agent.max_probe_rate,
                        report.planned_rate, next(iter(report.refused)))
        summary = (f"{len(self.checks)} checks on {len(config.targets)} targets "
                   f"({report.added} added, {report.kept} kept, {report.removed} removed, "
                   f"{len(refused)} refused), {report.planned_rate:.1f} probes/s")
        log.info("plan: %s", summary)
        return summary

    def _scheduler_info(self) -> dict[str, float]:
        return {"in_flight": float(self.scheduler.in_flight),
                "refused": float(len(self.core.refused)),
                "planned_rate": self.core.planned_rate}

    # ---------------------------------------------------------------- results

    def _on_run(self, run: ProbeRun) -> None:
        self.probe_stats.record(run)
        result = run.result
        if not result.ok:
            log.debug("probe node=%s check=%s reason=%s duration_ms=%.1f detail=%s",
                      run.check.node, run.check.check, result.reason.value,
                      result.duration_seconds * 1000, result.detail)
        reporter = self.reporter
        if reporter is None:
            return
        if run.check.tier in LOCAL_TIERS and result.load is None:
            # telemetry and policy scans feed metrics, never verdicts: a node's SSH is not its
            # service, and a node that accepts 3DES still serves its clients
            return

        # a failure, or a re-probe the mesh asked for, is what a verdict may be waiting on: it
        # goes out at once instead of with the next group commit (probes/agent/reporter.py)
        urgent = ((not result.ok and result.reason not in AGENT_SIDE_REASONS)
                  or run.why == "reprobe")
        # a partial, not a lambda: calling it runs no frame of its own before observation's
        reporter.submit(partial(observation, run, self.vantage), urgent)

    # ---------------------------------------------------------------- reporter

    def _new_reporter(self, config: AgentConfig) -> Reporter | None:
        mesh = config.mesh
        if mesh is None:
            return None
        key = signing.load_key(resolve_path(mesh.key_file, self.base_dir))
        reporter = Reporter(agent=self.vantage, endpoints=mesh.endpoints, key_id=mesh.key_id,
                            key=key, spool_path=self.state_dir / SPOOL_FILE,
                            spool_max_bytes=mesh.spool_max_bytes, batch_max=mesh.batch_max,
                            flush_interval=mesh.flush_interval, stats=self.reporter_stats)
        reporter.on_reprobe = self._on_reprobe
        return reporter

    def _on_reprobe(self, asks: list[tuple[str, str]]) -> None:
        """Re-probes the mesh asked for: another vantage saw these checks fail."""
        honour = self.config.mesh is not None and self.config.mesh.reprobe
        for node, check in asks:
            if honour:
                self.scheduler.request(check_key(node, check))
            else:
                self.scheduler.stats.reprobe_requests["disabled"] += 1

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.reporter = self._new_reporter(self.config)
        if self.reporter is not None:
            await self.reporter.start()
        hooks = HttpHooks(render_metrics=self.render_metrics,
                          choose_probe=Chooser(lambda: (self.checks, self.config.targets)),
                          tier_timeout=lambda c: self.core.policy(c.kind.tier).timeout,
                          reload=self.reload, health=self.health)
        self._http = await start_http(hooks, self.listen)
        await self._start_tracer()
        await self.scheduler.start()
        # what start() made lives as long as the plan (the tracer's per-node state, the
        # reporter, the HTTP app): out of the collector's sight too, or each full collection
        # walks ~20,000 objects of a 4,000-target agent (4-8 ms: the start error's tail)
        release_parse_memory()
        log.info("agent %s started: %d checks, listening on %s", self.vantage, len(self.checks),
                 self.listen)

    async def _start_tracer(self) -> None:
        """Path traces go to the mesh with the observations: no mesh, no tracing."""
        if self.reporter is None or not self.config.paths.enabled:
            return
        self.tracer = Tracer(self.vantage, self.config.paths, self.reporter.submit_trace,
                             stats=self.tracer_stats)
        self.tracer.load(self.checks)
        self.scheduler.on_failing = self.tracer.failing
        await self.tracer.start()

    async def _stop_tracer(self) -> None:
        self.scheduler.on_failing = None
        if self.tracer is not None:
            await self.tracer.stop()
            self.tracer = None

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "vantage": self.vantage, "checks": len(self.checks),
                "in_flight": self.scheduler.in_flight,
                "uptime_seconds": round(time.time() - self.started_at, 1),
                "spool_depth": self.reporter_stats.spool_depth}

    def render_metrics(self) -> Iterator[str]:
        """The /metrics body in pieces: the agent's families, then the process's own."""
        yield from self.collector.render_parts()
        yield generate_latest(self.self_registry).decode("utf-8")

    async def reload(self, *, force: bool = False) -> str:
        """Re-read the config and apply it; ValueError (ConfigError, ReloadRefused) keeps the
        running one. ``force``: also when it removes more than half of the running checks."""
        try:
            message = await self._reload(force=force)
        except Exception:
            self.reloads.failed()
            raise
        self.reloads.succeeded()
        return message

    async def _reload(self, *, force: bool) -> str:
        async with self._reload_lock:
            config = load_agent_config(self.config_path)  # ConfigError: keep the running one
            if config.agent.vantage != self.vantage:
                raise ValueError("agent.vantage cannot change on reload; restart the agent")
            checks = plan(config, self.base_dir)
            refusal = reload_removal_problem(self.checks, checks)
            if refusal is not None and not force:
                raise ReloadRefused(refusal)
            new_mesh = config.mesh
            if self.reporter is not None and new_mesh is not None:
                self.reporter.key_id = new_mesh.key_id
                self.reporter.key = signing.load_key(resolve_path(new_mesh.key_file,
                                                                  self.base_dir))
                await self.reporter.set_endpoints(new_mesh.endpoints)
            elif self.reporter is not None:
                await self.reporter.close(drain_timeout=0)
                self.reporter = None
            elif new_mesh is not None:
                self.reporter = self._new_reporter(config)
                assert self.reporter is not None
                await self.reporter.start()
            self.core.max_rate = config.agent.max_probe_rate
            self.core.max_reprobe_rate = config.agent.max_reprobe_rate
            self.scheduler.max_start_lag = config.agent.max_start_lag
            self.config = config
            summary = self._apply_plan(config, checks)
            if self.tracer is not None and self.reporter is not None and config.paths.enabled:
                self.tracer.submit = self.reporter.submit_trace
                self.tracer.load(self.checks, config.paths)
            else:
                await self._stop_tracer()
                await self._start_tracer()
            release_parse_memory()
            log.info("reloaded %s: %s", self.config_path, summary)
            return f"reloaded: {summary}"

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (SIGHUP reloads), then stop gracefully."""
        loop = asyncio.get_running_loop()
        await self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._sighup()))
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.stop()

    async def _sighup(self) -> None:
        try:
            await self.reload()
        except Exception as exc:  # keep running on the old config
            log.error("reload on SIGHUP failed, keeping the running config: %s", exc)

    async def stop(self, drain_timeout: float = DRAIN_SECONDS) -> None:
        started = time.monotonic()
        log.info("stopping: %d probe(s) in flight", self.scheduler.in_flight)
        await self._stop_tracer()
        await self.scheduler.stop(timeout=PROBE_GRACE)
        if self.reporter is not None:
            await self.reporter.close(drain_timeout=drain_timeout)
        if self._http is not None:
            with contextlib.suppress(Exception):
                await self._http.cleanup()
        log.info("stopped in %.2f s; spool depth %d", time.monotonic() - started,
                 self.reporter_stats.spool_depth)
