"""Runs one delivery loop per configured publisher inside the mesh process.

The mesh app adds :func:`publishing_context` to its ``cleanup_ctx``: the loops start with the app,
are woken by the mesh service whenever it commits verdict changes, and stop (without
acknowledging anything in flight: it is delivered again after restart) when the app stops.

With a ``gate`` (HA: :mod:`probes.mesh.leader`) the loops run only while the gate is open: the
leader elector calls :meth:`Publishing.set_active` on every leadership flip, and each delivery
checks the gate first, so a replica whose lease may have expired delivers nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from probes.mesh.publish.base import Publisher, RetryableError
from probes.mesh.publish.config import PublisherConfig, build_publisher
from probes.mesh.publish.delivery import DeliveryLoop
from probes.mesh.publish.metrics import PublisherMetrics
from probes.mesh.publish.outbox import Outbox
from probes.mesh.publish.weightloop import WeightLoop, WeightMetrics
from probes.mesh.weights import WeightEngine
from probes.model import Verdict, WeightChange

log = logging.getLogger(__name__)

Gate = Callable[[], bool]


class GatedPublisher(Publisher):
    """A publisher that refuses to deliver while ``gate()`` is false (a fenced ex-leader)."""

    def __init__(self, inner: Publisher, gate: Gate) -> None:
        self.inner = inner
        self.name = inner.name
        self.gate = gate
        self.supports_weights = inner.supports_weights

    async def deliver(self, verdict: Verdict) -> None:
        if not self.gate():
            raise RetryableError("not the leader: publishing is fenced")
        await self.inner.deliver(verdict)

    async def reconcile(self, current: Any) -> int:
        if not self.gate():
            raise RetryableError("not the leader: publishing is fenced")
        return await self.inner.reconcile(current)

    async def deliver_weights(self, changes: Sequence[WeightChange]) -> None:
        if not self.gate():
            raise RetryableError("not the leader: publishing is fenced")
        await self.inner.deliver_weights(changes)

    async def reconcile_weights(self, current: Mapping[str, WeightChange]) -> int:
        if not self.gate():
            raise RetryableError("not the leader: publishing is fenced")
        return await self.inner.reconcile_weights(current)

    async def close(self) -> None:
        await self.inner.close()


# the mesh's weight engine, when weights are on (it is rebuilt when the service recovers)
WeightSource = Callable[[], WeightEngine | None]


class Publishing:
    def __init__(self, configs: Sequence[PublisherConfig], outbox: Outbox,
                 registry: CollectorRegistry, base_dir: Path | None = None,
                 gate: Gate | None = None, *, weights: WeightSource | None = None) -> None:
        self._configs = list(configs)
        self._outbox = outbox
        self._metrics = PublisherMetrics(registry)
        self._weight_metrics = WeightMetrics(registry)
        self._base_dir = base_dir
        self._gate = gate
        self._weights = weights
        self.weight_loops: list[WeightLoop] = []
        self.loops = self._build()
        self._tasks: list[asyncio.Task[None]] = []
        self._transition: asyncio.Task[None] | None = None

    def _weight_of(self, node: str) -> int | None:
        engine = self._weights() if self._weights is not None else None
        return engine.weight_of(node) if engine is not None else None

    def _current_weights(self) -> Mapping[str, WeightChange]:
        engine = self._weights() if self._weights is not None else None
        return engine.current() if engine is not None else {}

    def _build(self) -> list[DeliveryLoop]:
        loops = []
        self.weight_loops = []
        weights_on = self._weights is not None and self._weights() is not None
        for c in self._configs:
            publisher = build_publisher(c, self._base_dir)
            if weights_on:
                publisher.weight_of = self._weight_of
            if self._gate is not None:
                publisher = GatedPublisher(publisher, self._gate)
            loops.append(DeliveryLoop(
                publisher, self._outbox, self._metrics, c.retry.policy(),
                dead_letter_file=Path(c.dead_letter_file) if c.dead_letter_file else None))
            if weights_on and publisher.supports_weights:
                self.weight_loops.append(WeightLoop(publisher, self._current_weights,
                                                    self._weight_metrics, c.retry.policy()))
        return loops

    def set_active(self, active: bool) -> None:
        """Start (fresh loops, resuming from the shared positions) or stop the loops; called
        on leadership flips, from the event loop."""
        previous = self._transition

        async def flip() -> None:
            if previous is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await previous
            if active and not self._tasks:
                self.loops = self._build()
                self.start()
            elif not active:
                await self.stop()

        self._transition = asyncio.create_task(flip())

    def notify(self, *_: Any) -> None:
        for loop in self.loops:
            loop.notify()

    def notify_weights(self, changes: list[WeightChange]) -> None:
        for loop in self.weight_loops:
            loop.notify(changes)

    def start(self) -> None:
        for loop in self.loops:
            self._tasks.append(asyncio.create_task(loop.run(), name=f"publisher-{loop.name}"))
        for wloop in self.weight_loops:
            self._tasks.append(asyncio.create_task(wloop.run(), name=f"weights-{wloop.name}"))
        if self.loops:
            log.info("publishing to %s", ", ".join(loop.name for loop in self.loops))

    async def stop(self) -> None:
        for wloop in self.weight_loops:
            wloop.stop()
        for loop in self.loops:
            loop.stop()
        for task in self._tasks:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 5.0)
        self._tasks.clear()


def publishing_context(configs: Sequence[PublisherConfig], outbox: Outbox,
                       registry: CollectorRegistry,
                       listeners: list[Callable[[list[Any]], None]] | None = None,
                       *, gate: Gate | None = None,
                       on_ready: Callable[[Publishing], None] | None = None,
                       weights: WeightSource | None = None,
                       weight_listeners: list[Callable[[list[Any]], None]] | None = None,
                       ) -> Callable[[Any], AsyncIterator[None]]:
    """An aiohttp ``cleanup_ctx`` entry running the publishers for the app's lifetime.

    ``listeners`` is the mesh service's list of callbacks on committed verdicts: the loops are
    woken from it, so delivery starts as soon as a verdict is stored, not at the next poll.
    With a ``gate`` nothing starts here: ``on_ready`` receives the :class:`Publishing`, whose
    :meth:`Publishing.set_active` the leader elector drives.
    """
    publishing = Publishing(configs, outbox, registry, gate=gate, weights=weights)
    if listeners is not None:
        listeners.append(publishing.notify)
    if weight_listeners is not None:
        weight_listeners.append(publishing.notify_weights)

    async def context(app: Any) -> AsyncIterator[None]:
        if gate is None:
            publishing.start()
        elif on_ready is not None:
            on_ready(publishing)
        yield
        if publishing._transition is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await publishing._transition
        await publishing.stop()

    return context
