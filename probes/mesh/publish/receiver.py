"""The reference webhook receiver: what a balancer team deploys next to its HAProxy.

``POST /v1/verdicts`` (any path configured as ``path``) takes the mesh's signed webhook
(docs/webhooks.md) and:

1. verifies it like the mesh's ingest does (:mod:`probes.mesh.gate`): headers first (no
   decompression, a declared length within ``max_body_bytes``, fresh timestamp, known key id),
   then the body within a time limit, then the HMAC signature (401 otherwise);
2. validates the envelope (400 naming the field);
3. de-duplicates and keeps per-node order by ``(epoch, seq)``: a verdict not newer than the last
   one applied for its node is answered 200 ``duplicate`` and not applied (an older verdict must
   never overwrite a newer one); a higher epoch is newer whatever its seq (the mesh's store was
   reset or restored: its seqs start again); weight webhooks likewise per node by their weight
   ``seq`` (schema ``tunnelwatch.weights``: docs/weights.md);
4. applies it to the local HAProxy through :class:`probes.mesh.publish.haproxy.HAProxyPublisher`
   (the very code the mesh uses when it talks to HAProxy directly). If HAProxy cannot be reached
   the answer is 503, so the mesh retries; a verdict for a server HAProxy does not have is 422
   (the mesh dead-letters it: retrying cannot help).

The last applied ``seq`` per node is kept in ``state_file`` (written atomically before
answering), so de-duplication survives a restart. On start, and every ``reconcile_interval``, the
receiver reconciles HAProxy with the latest verdict it holds per node, so a restarted HAProxy
converges without waiting for the next verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from probes.config import (
    Problem,
    Strict,
    check_secret_file,
    load_config_file,
    parse_host_port,
    resolve_path,
)
from probes.mesh import connections
from probes.mesh.gate import BodyGate, Rejected, answer
from probes.mesh.publish.base import PermanentError, PublishError
from probes.mesh.publish.config import HAProxyConfig, haproxy_problems
from probes.mesh.publish.envelope import HEADER_IDEMPOTENCY_KEY, WeightsEnvelope, decode_any
from probes.mesh.publish.haproxy import HAProxyPublisher
from probes.model import SchemaError, Verdict, WeightChange, signing

log = logging.getLogger(__name__)


class ReceiverKey(Strict, kw_only=True, frozen=True):
    key_id: str
    key_file: str


class ReceiverConfig(Strict, kw_only=True, frozen=True):
    listen: str = "127.0.0.1:9490"
    path: str = "/v1/verdicts"
    keys: list[ReceiverKey]
    timestamp_window_seconds: float = 300.0
    state_file: str | None = None
    haproxy: HAProxyConfig | None = None  # None: verify and record only (a dry run)
    reconcile_interval: float = 30.0
    max_body_bytes: int = 1024 * 1024

    def listen_host_port(self) -> tuple[str, int]:
        return parse_host_port(self.listen, default_host="127.0.0.1")


def _problems(cfg: ReceiverConfig, base: Path) -> list[Problem]:
    problems = []
    try:
        parse_host_port(cfg.listen, default_host="127.0.0.1")
    except ValueError as exc:
        problems.append(Problem("$.listen", str(exc)))
    if not cfg.path.startswith("/"):
        problems.append(Problem("$.path", "must start with /"))
    if not cfg.keys:
        problems.append(Problem("$.keys", "at least one key is required"))
    for i, k in enumerate(cfg.keys):
        problems += check_secret_file(k.key_file, f"$.keys[{i}].key_file", base)
    if not cfg.timestamp_window_seconds > 0:
        problems.append(Problem("$.timestamp_window_seconds", "must be > 0"))
    if cfg.haproxy is not None:
        problems += haproxy_problems(cfg.haproxy, "$.haproxy", base)
    return problems


def load_receiver_config(path: str | Path) -> tuple[ReceiverConfig, Path]:
    return load_config_file(path, ReceiverConfig, _problems)


class NodeLedger:
    """Last applied verdict per node, persisted atomically to ``path`` when set."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.latest: dict[str, Verdict] = {}
        if path is not None and path.exists():
            raw = json.loads(path.read_text())
            self.latest = {n: msgspec.convert(v, Verdict) for n, v in raw.items()}

    def last(self, node: str) -> Verdict | None:
        return self.latest.get(node)

    def record(self, verdict: Verdict) -> None:
        self.latest[verdict.node] = verdict
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(self.latest))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(self.path)


class Receiver:
    def __init__(self, keys: dict[str, bytes], haproxy: HAProxyPublisher | None,
                 ledger: NodeLedger, window: float, *, registry: CollectorRegistry,
                 clock: Callable[[], float] = time.time,
                 max_body_bytes: int = 1024 * 1024) -> None:
        self.keys = keys
        self.haproxy = haproxy
        self.ledger = ledger
        # the latest weight applied per node: weights are levels the mesh re-sends whole on its
        # start, so memory is enough; verdicts applied here use it
        self.weights: dict[str, WeightChange] = {}
        if haproxy is not None:
            haproxy.weight_of = self._weight_of
        self.window = window
        self.clock = clock
        # the mesh's own ingest rules: headers judged before the body, nothing decompressed
        self.gate = BodyGate(keys, max_body_bytes=max_body_bytes, window_seconds=window,
                             timeout=15.0, budget_bytes=8 * max_body_bytes, clock=clock)
        self.guard = connections.ConnectionGuard(connections.connection_limit(512))
        self.registry = registry
        self._locks: dict[str, asyncio.Lock] = {}
        self.requests = Counter("tunnelwatch_receiver_requests_total",
                                "Webhook requests by outcome.", ["outcome"], registry=registry)
        self.gaps = Counter("tunnelwatch_receiver_sequence_gaps_total",
                            "Verdicts applied whose seq skipped past the next expected one "
                            "(the sender dead-lettered something, or the state file was lost).",
                            registry=registry)
        self.epochs = Counter("tunnelwatch_receiver_epoch_changes_total",
                              "Verdicts applied from a newer mesh epoch than the node's last "
                              "(the mesh's store was reset or restored, or it restarted).",
                              registry=registry)
        for outcome in ("applied", "duplicate", "unauthorized", "bad_request", "unavailable",
                        "rejected"):
            self.requests.labels(outcome)

    def _answer(self, outcome: str, status: int, **extra: object) -> web.Response:
        self.requests.labels(outcome).inc()
        return web.json_response({"status": outcome, **extra}, status=status)

    async def handle(self, request: web.Request) -> web.Response:
        try:
            body = (await self.gate.read(request)).body
            self.guard.trust(request.protocol)  # a signed request: keep this connection
        except Rejected as exc:
            outcome = ("unauthorized" if exc.status == 401 else
                       "unavailable" if exc.status == 503 else "bad_request")
            self.requests.labels(outcome).inc()
            return await answer(request, exc)
        try:
            env = decode_any(body)
        except SchemaError as exc:
            return self._answer("bad_request", 400, field=exc.path, error=str(exc)[:200])
        header_key = request.headers.get(HEADER_IDEMPOTENCY_KEY)
        if header_key is not None and header_key != env.idempotency_key:
            return self._answer("bad_request", 400, field="Idempotency-Key",
                                error="header does not match the body")
        if isinstance(env, WeightsEnvelope):
            return await self._apply_weights(env)
        verdict = env.verdict
        lock = self._locks.setdefault(verdict.node, asyncio.Lock())
        async with lock:  # one verdict per node at a time: order holds under concurrency
            last = self.ledger.last(verdict.node)
            # (epoch, seq): a reset or restored mesh starts a higher epoch, its seq 1 is news
            if last is not None and verdict.order <= last.order:
                return self._answer("duplicate", 200, key=env.idempotency_key,
                                    applied_seq=last.seq, applied_epoch=last.epoch)
            if self.haproxy is not None:
                try:
                    await self.haproxy.deliver(verdict)
                except PermanentError as exc:
                    return self._answer("rejected", 422, error=str(exc)[:200])
                except PublishError as exc:
                    log.warning("receiver: HAProxy unavailable for %s: %s",
                                env.idempotency_key, exc)
                    return self._answer("unavailable", 503, error=str(exc)[:200])
            if last is not None and verdict.epoch != last.epoch:
                self.epochs.inc()
            elif last is not None and verdict.seq != last.seq + 1:
                self.gaps.inc()
            self.ledger.record(verdict)
        log.info("receiver: applied %s %s", env.idempotency_key, verdict.state)
        return self._answer("applied", 200, key=env.idempotency_key)

    def _weight_of(self, node: str) -> int | None:
        change = self.weights.get(node)
        return change.weight if change is not None else None

    async def _apply_weights(self, env: WeightsEnvelope) -> web.Response:
        newer = [c for c in env.weights
                 if c.seq > (self.weights[c.node].seq if c.node in self.weights else 0)]
        if not newer:
            return self._answer("duplicate", 200, key=env.idempotency_key)
        if self.haproxy is not None:
            try:
                await self.haproxy.deliver_weights(newer)
            except PermanentError as exc:
                return self._answer("rejected", 422, error=str(exc)[:200])
            except PublishError as exc:
                log.warning("receiver: HAProxy unavailable for %s: %s", env.idempotency_key, exc)
                return self._answer("unavailable", 503, error=str(exc)[:200])
        for change in newer:
            self.weights[change.node] = change
        log.info("receiver: applied weights %s", ", ".join(
            f"{c.node}={c.weight}" for c in newer))
        return self._answer("applied", 200, key=env.idempotency_key)

    async def state(self, request: web.Request) -> web.Response:
        out: dict[str, dict[str, object]] = {}
        for node, verdict in sorted(self.ledger.latest.items()):
            out[node] = {"seq": verdict.seq, "state": str(verdict.state)}
            if verdict.epoch:  # a mesh with epochs (docs/webhooks.md): the pair orders them
                out[node]["epoch"] = verdict.epoch
            if node in self.weights:  # weights on: the weight it last applied
                out[node]["weight"] = self.weights[node].weight
        return web.json_response(out)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def reconcile_forever(self, interval: float) -> None:
        while True:
            if self.haproxy is not None:
                try:
                    fixed = await self.haproxy.reconcile(dict(self.ledger.latest))
                    if fixed:
                        log.info("receiver: reconcile fixed %d server(s)", fixed)
                except PublishError as exc:
                    log.warning("receiver: reconcile failed: %s", exc)
            if interval <= 0:
                return
            await asyncio.sleep(interval)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def build_receiver_app(cfg: ReceiverConfig, base: Path,
                       registry: CollectorRegistry | None = None) -> tuple[web.Application,
                                                                          Receiver]:
    registry = registry or CollectorRegistry()
    keys = {k.key_id: signing.load_key(resolve_path(k.key_file, base)) for k in cfg.keys}
    haproxy = cfg.haproxy.publisher(base) if cfg.haproxy is not None else None
    state = resolve_path(cfg.state_file, base) if cfg.state_file else None
    receiver = Receiver(keys, haproxy, NodeLedger(state), cfg.timestamp_window_seconds,
                        registry=registry, max_body_bytes=cfg.max_body_bytes)
    app = web.Application(client_max_size=cfg.max_body_bytes,
                          handler_args=connections.handler_args(idle_timeout=30.0))
    app.router.add_post(cfg.path, receiver.handle)
    app.router.add_get("/v1/state", receiver.state)
    app.router.add_get("/metrics", receiver.metrics)
    app.router.add_get("/healthz", healthz)

    async def reconciler(app_: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(receiver.reconcile_forever(cfg.reconcile_interval))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if haproxy is not None:
            await haproxy.close()

    app.cleanup_ctx.append(reconciler)
    return app, receiver


def serve(cfg: ReceiverConfig, base: Path) -> None:
    host, port = cfg.listen_host_port()
    app, receiver = build_receiver_app(cfg, base)
    log.info("receiver listening on %s:%d%s", host, port, cfg.path)
    connections.serve(app, host, port, receiver.guard)
