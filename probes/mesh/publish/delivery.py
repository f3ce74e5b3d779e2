"""The delivery loop: a publisher's outbox, delivered in order, at least once.

One loop per publisher. It reads the unacknowledged verdicts oldest first and delivers them one at
a time, so verdicts of a node can never overtake each other (the log is ordered, and per node the
sequence numbers increase with it). A verdict is acknowledged only after the publisher returned,
so a crash between delivery and acknowledgement re-delivers it after restart with the same
idempotency key (``node:epoch:seq``) — duplicates, never gaps.

A failed attempt is retried with exponential backoff and jitter ("decorrelated" enough that many
meshes do not retry in step) until it succeeds, or until the verdict has been failing for
``dead_letter_after`` seconds: then it is dead-lettered (logged, counted, appended to the optional
dead-letter file) and the loop moves on, because a balancer stuck on one undeliverable verdict
would miss every later one. A :class:`PermanentError` dead-letters at once.

Reconcile runs on start and again after the destination had been unreachable (a balancer that
restarted has lost its runtime state), and every ``reconcile_interval`` seconds when set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from probes.aio import wait_at_most
from probes.mesh.publish.base import PermanentError, Publisher
from probes.mesh.publish.metrics import PublisherMetrics
from probes.mesh.publish.outbox import Outbox, OutboxEntry
from probes.model import encode

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    initial_backoff: float = 0.25  # seconds before the first retry
    max_backoff: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5  # each wait is drawn from [(1 - jitter) * b, b]
    dead_letter_after: float = 900.0  # seconds of failing before a verdict is given up on
    poll_interval: float = 0.1  # how often an idle loop looks at the outbox (notify() wakes it)
    reconcile_interval: float = 0.0  # 0 = only on start and after an outage

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Wait before retry number ``attempt`` (0-based)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** attempt)
        return ceiling * (1.0 - self.jitter * rng.random())


Sleep = Callable[[float], Awaitable[None]]


class DeliveryLoop:
    def __init__(self, publisher: Publisher, outbox: Outbox, metrics: PublisherMetrics,
                 policy: RetryPolicy | None = None, *, dead_letter_file: Path | None = None,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None,
                 batch: int = 100) -> None:
        self.publisher = publisher
        self.name = publisher.name
        self.outbox = outbox
        self.metrics = metrics
        self.policy = policy or RetryPolicy()
        self.dead_letter_file = dead_letter_file
        self.clock = clock
        self.rng = rng or random.Random()
        self.batch = batch
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._needs_reconcile = True
        self._last_reconcile = 0.0
        self.dead_letters: list[OutboxEntry] = []
        metrics.init(self.name)

    # ------------------------------------------------------------------ control

    def notify(self) -> None:
        """New verdicts are in the outbox: look now instead of at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def _idle(self, seconds: float) -> None:
        """Wait for new verdicts: returns on notify(), stop() or after ``seconds``."""
        await wait_at_most(self._wake, seconds)
        if not self._stop.is_set():
            self._wake.clear()

    async def _sleep(self, seconds: float) -> None:
        """A backoff wait: only stop() cuts it short (new verdicts must not hurry a retry)."""
        await wait_at_most(self._stop, seconds)

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        try:
            while not self._stop.is_set():
                await self._maybe_reconcile()
                try:
                    entries = await self.outbox.outbox(self.name, self.batch)
                except Exception as exc:  # the store failed: nothing was read, try again
                    log.error("publisher %s: reading the outbox failed: %s", self.name, exc)
                    await self._sleep(1.0)
                    continue
                if not entries:
                    self.metrics.lag.labels(self.name).set(0)
                    await self._idle(self.policy.poll_interval)
                    continue
                for entry in entries:
                    if self._stop.is_set():
                        return
                    self._update_lag(entry)
                    if not await self._deliver(entry):
                        return  # stopped while retrying: not acknowledged, delivered after restart
                    try:
                        await self.outbox.ack(self.name, entry.id)
                    except Exception as exc:  # not acknowledged: delivered again (same key)
                        log.error("publisher %s: acknowledging %d failed: %s", self.name,
                                  entry.id, exc)
                        break
        finally:
            with contextlib.suppress(Exception):
                await self.publisher.close()

    def _update_lag(self, oldest: OutboxEntry) -> None:
        lag = max(0.0, self.clock() - oldest.verdict.decided_at)
        self.metrics.lag.labels(self.name).set(lag)

    async def _maybe_reconcile(self) -> None:
        interval = self.policy.reconcile_interval
        due = interval > 0 and self.clock() - self._last_reconcile >= interval
        if not (self._needs_reconcile or due):
            return
        try:
            fixed = await self.publisher.reconcile(await self.outbox.node_verdicts())
        except Exception as exc:  # an unreachable destination: deliveries will retry it
            log.warning("publisher %s: reconcile failed: %s", self.name, exc)
            self._needs_reconcile = True
            return
        self._needs_reconcile = False
        self._last_reconcile = self.clock()
        if fixed:
            self.metrics.reconcile_fixes.labels(self.name).inc(fixed)
            log.info("publisher %s: reconcile fixed %d item(s)", self.name, fixed)

    async def _deliver(self, entry: OutboxEntry) -> bool:
        """Deliver until success or dead letter (True), or until stopped (False)."""
        verdict = entry.verdict
        first_failure: float | None = None
        attempt = 0
        while not self._stop.is_set():
            try:
                await self.publisher.deliver(verdict)
            except PermanentError as exc:
                self._dead_letter(entry, f"permanent: {exc}")
                return True
            except Exception as exc:  # RetryableError, or a bug: retrying is the safe side
                now = self.clock()
                first_failure = now if first_failure is None else first_failure
                if now - first_failure >= self.policy.dead_letter_after:
                    self._dead_letter(entry, f"failing for {now - first_failure:.0f} s: {exc}")
                    return True
                self.metrics.retries.labels(self.name).inc()
                self._update_lag(entry)
                self._needs_reconcile = True
                wait = self.policy.backoff(attempt, self.rng)
                log.info("publisher %s: %s failed (attempt %d), retry in %.2f s: %s",
                         self.name, verdict.idempotency_key, attempt + 1, wait, exc)
                attempt += 1
                await self._sleep(wait)
                # a destination that failed may have restarted empty: reconcile before the retry
                await self._maybe_reconcile()
                continue
            self.metrics.delivered.labels(self.name).inc()
            return True
        return False

    def _dead_letter(self, entry: OutboxEntry, why: str) -> None:
        self.metrics.dead_lettered.labels(self.name).inc()
        self.dead_letters.append(entry)
        log.error("publisher %s: dead-lettered %s (log id %d): %s", self.name,
                  entry.verdict.idempotency_key, entry.id, why)
        if self.dead_letter_file is not None:
            record = {"publisher": self.name, "id": entry.id, "why": why, "at": self.clock(),
                      "verdict": json.loads(encode(entry.verdict))}
            with self.dead_letter_file.open("a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
