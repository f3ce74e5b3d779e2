"""Runs one delivery loop per configured publisher inside the mesh process.

The mesh app adds :func:`publishing_context` to its ``cleanup_ctx``: the loops start with the app,
are woken by the mesh service whenever it commits verdict changes, and stop (without
acknowledging anything in flight: it is delivered again after restart) when the app stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from probes.mesh.publish.config import PublisherConfig, build_publisher
from probes.mesh.publish.delivery import DeliveryLoop
from probes.mesh.publish.metrics import PublisherMetrics
from probes.mesh.publish.outbox import Outbox

log = logging.getLogger(__name__)


class Publishing:
    def __init__(self, configs: Sequence[PublisherConfig], outbox: Outbox,
                 registry: CollectorRegistry, base_dir: Path | None = None) -> None:
        metrics = PublisherMetrics(registry)
        self.loops = [
            DeliveryLoop(build_publisher(c, base_dir), outbox, metrics, c.retry.policy(),
                         dead_letter_file=Path(c.dead_letter_file) if c.dead_letter_file else None)
            for c in configs
        ]
        self._tasks: list[asyncio.Task[None]] = []

    def notify(self, *_: Any) -> None:
        for loop in self.loops:
            loop.notify()

    def start(self) -> None:
        for loop in self.loops:
            self._tasks.append(asyncio.create_task(loop.run(), name=f"publisher-{loop.name}"))
        if self.loops:
            log.info("publishing to %s", ", ".join(loop.name for loop in self.loops))

    async def stop(self) -> None:
        for loop in self.loops:
            loop.stop()
        for task in self._tasks:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 5.0)
        self._tasks.clear()


def publishing_context(configs: Sequence[PublisherConfig], outbox: Outbox,
                       registry: CollectorRegistry,
                       listeners: list[Callable[[list[Any]], None]] | None = None,
                       ) -> Callable[[Any], AsyncIterator[None]]:
    """An aiohttp ``cleanup_ctx`` entry running the publishers for the app's lifetime.

    ``listeners`` is the mesh service's list of callbacks on committed verdicts: the loops are
    woken from it, so delivery starts as soon as a verdict is stored, not at the next poll.
    """
    publishing = Publishing(configs, outbox, registry)
    if listeners is not None:
        listeners.append(publishing.notify)

    async def context(app: Any) -> AsyncIterator[None]:
        publishing.start()
        yield
        await publishing.stop()

    return context
