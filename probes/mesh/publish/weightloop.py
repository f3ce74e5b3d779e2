"""The weight loop: a publisher's weight changes, latest per node, delivered as soon as they come.

Weights are levels, not events (docs/weights.md): what a balancer needs is each node's newest
weight, not the history. So unlike verdicts there is no durable outbox: the loop keeps the
newest undelivered change per node in memory (a newer change of a node replaces the pending
one), delivers everything pending in one call, and on failure retries with the verdict loop's
backoff, merging in whatever came meanwhile. Nothing can be lost for good: on start, and after
every failure, the loop reconciles the destination with the engine's current weights (which a
mesh restart recovers from its snapshot and journal), so a balancer that restarted, or a mesh
that restarted mid-delivery, converges.

``tunnelwatch_publisher_weight_update_seconds`` measures decided -> applied for each change.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram

from probes.aio import wait_at_most
from probes.mesh.publish.base import PermanentError, Publisher
from probes.mesh.publish.delivery import RetryPolicy
from probes.model import WeightChange

log = logging.getLogger(__name__)

Current = Callable[[], Mapping[str, WeightChange]]
UPDATE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)


class WeightMetrics:
    """Weight delivery families, one set per registry; the only label is ``publisher``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.delivered = Counter(
            "tunnelwatch_publisher_weights_delivered_total",
            "Weight changes the destination acknowledged.", ["publisher"], registry=registry)
        self.failures = Counter(
            "tunnelwatch_publisher_weight_failures_total",
            "Weight deliveries that failed (retried, or dropped when permanent).",
            ["publisher"], registry=registry)
        self.update = Histogram(
            "tunnelwatch_publisher_weight_update_seconds",
            "From the mesh deciding a weight to the destination acknowledging it.",
            ["publisher"], buckets=UPDATE_BUCKETS, registry=registry)

    def init(self, publisher: str) -> None:
        self.delivered.labels(publisher)
        self.failures.labels(publisher)
        self.update.labels(publisher)


class WeightLoop:
    def __init__(self, publisher: Publisher, current: Current, metrics: WeightMetrics,
                 policy: RetryPolicy | None = None, *, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.publisher = publisher
        self.name = publisher.name
        self.current = current
        self.metrics = metrics
        self.policy = policy or RetryPolicy()
        self.clock = clock
        self.rng = rng or random.Random()
        self.pending: dict[str, WeightChange] = {}
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._needs_reconcile = True
        metrics.init(self.name)

    def notify(self, changes: Sequence[WeightChange]) -> None:
        """New weight changes (from the mesh's weight listeners): deliver now."""
        for change in changes:
            self.pending[change.node] = change
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            if self._needs_reconcile and not await self._reconcile():
                attempt = await self._back_off(attempt)
                continue
            if not self.pending:
                await wait_at_most(self._wake, self.policy.poll_interval * 10)
                self._wake.clear()
                continue
            batch, self.pending = self.pending, {}
            try:
                await self.publisher.deliver_weights(list(batch.values()))
            except PermanentError as exc:
                self.metrics.failures.labels(self.name).inc()
                log.error("publisher %s: weights refused, not retried: %s", self.name, exc)
                continue
            except Exception as exc:  # RetryableError, or a bug: retrying is the safe side
                self.metrics.failures.labels(self.name).inc()
                for node, change in batch.items():  # what came meanwhile is newer: keep it
                    self.pending.setdefault(node, change)
                self._needs_reconcile = True
                log.info("publisher %s: weights failed (attempt %d): %s", self.name,
                         attempt + 1, exc)
                attempt = await self._back_off(attempt)
                continue
            attempt = 0
            now = self.clock()
            for change in batch.values():
                self.metrics.update.labels(self.name).observe(max(0.0, now - change.decided_at))
            self.metrics.delivered.labels(self.name).inc(len(batch))

    async def _reconcile(self) -> bool:
        try:
            fixed = await self.publisher.reconcile_weights(self.current())
        except Exception as exc:  # an unreachable destination: try again after a backoff
            self.metrics.failures.labels(self.name).inc()
            log.warning("publisher %s: weight reconcile failed: %s", self.name, exc)
            return False
        self._needs_reconcile = False
        if fixed:
            log.info("publisher %s: weight reconcile fixed %d item(s)", self.name, fixed)
        return True

    async def _back_off(self, attempt: int) -> int:
        await wait_at_most(self._stop, self.policy.backoff(attempt, self.rng))
        return attempt + 1
