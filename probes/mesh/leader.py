"""Leader election on an etcd lease, with fencing by the local monotonic clock.

Acquire: grant a lease of ``ttl`` seconds, then in one txn create the leader key (value = this
replica's name, attached to the lease) only if it does not exist (``create_revision == 0``).
Hold: keep the lease alive every ``ttl / 3`` seconds. Follow: read the key every
``poll_interval`` seconds (it names the leader) and try to acquire it when it is gone, which
etcd does when the holder's lease expires.

Fencing. etcd expires a lease ``ttl`` seconds after the last keepalive *it processed*, which is
after the moment this replica *sent* it. So the replica may publish until::

    valid_until = monotonic time the last successful keepalive was sent + ttl - margin

and not a moment longer, whether or not it has heard from etcd since (a partitioned leader
cannot learn that it lost). No other replica can acquire the key before the lease expired, so
the publishing windows of two leaders never overlap, with ``margin`` seconds to spare for clock
*rate* differences and for a delivery in flight. Only intervals of the local monotonic clock are
used; no wall clocks are compared. Besides, every leader-only store write (the publishers'
positions) compares the key's value and lease in the same txn: a deposed leader's write fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from probes.mesh.store_etcd import EtcdClient, EtcdError, FenceToken, cmp_created, req_put

log = logging.getLogger(__name__)


class LeaderElector:
    def __init__(self, client: EtcdClient, key: str, name: str, *, ttl: int = 10,
                 margin: float = 2.0, poll_interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < margin < ttl:
            raise ValueError("margin must be between 0 and the lease TTL")
        self.client = client
        self.key = key
        self.name = name
        self.ttl = ttl
        self.margin = margin
        self.poll_interval = poll_interval if poll_interval is not None else ttl / 10
        self.clock = clock
        self.lease = 0  # our lease while we hold (or try to hold) the key
        self.leading = False  # we acquired the key and have not noticed losing it
        self.valid_until = 0.0  # monotonic deadline for publishing
        self.leader = ""  # who holds the key, as last seen ("" = nobody / unknown)
        self.terms = 0  # how often this replica became leader

    # ---- the fencing predicate --------------------------------------------------------------

    def may_publish(self) -> bool:
        return self.leading and self.clock() < self.valid_until

    def fence_token(self) -> FenceToken | None:
        return FenceToken(self.key, self.name, self.lease) if self.leading else None

    # ---- one round of blocking I/O ----------------------------------------------------------

    def step(self) -> None:
        """Keep the lease alive (leader) or look at / try to take the key (follower)."""
        try:
            if self.leading:
                self._hold()
            else:
                self._follow()
        except EtcdError as exc:
            log.warning("leader election: etcd unreachable: %s", exc)

    def _hold(self) -> None:
        sent = self.clock()
        ttl = self.client.lease_keepalive(self.lease)
        holder = self.client.get(self.key) if ttl > 0 else None
        if ttl <= 0 or holder is None or holder.lease != self.lease:
            log.warning("leader %s: lease %d lost", self.name, self.lease)
            self._lose()
            return
        self.valid_until = sent + ttl - self.margin

    def _follow(self) -> None:
        holder = self.client.get(self.key)
        if holder is not None:
            self.leader = holder.value.decode(errors="replace")
            return
        # a fresh lease per attempt: one kept from a lost race would expire unused, and a put
        # under an expired lease is an error
        self.lease = 0
        lease, _ = self.client.lease_grant(self.ttl)
        try:
            ok, _ = self.client.txn([cmp_created(self.key, 0)],
                                    [req_put(self.key, self.name.encode(), lease)])
        except EtcdError:
            with contextlib.suppress(EtcdError):
                self.client.lease_revoke(lease)
            raise
        if not ok:  # somebody else was faster; we see them at the next poll
            with contextlib.suppress(EtcdError):
                self.client.lease_revoke(lease)
            return
        self.lease = lease
        # count the window from a keepalive sent after the key is ours, not from the grant
        sent = self.clock()
        ttl = self.client.lease_keepalive(self.lease)
        if ttl <= 0:
            self._lose()
            return
        self.leading = True
        self.leader = self.name
        self.valid_until = sent + ttl - self.margin
        self.terms += 1
        log.info("replica %s is the leader (lease %d, ttl %d s)", self.name, self.lease, ttl)

    def _lose(self) -> None:
        self.leading = False
        self.leader = ""
        self.lease = 0  # expired or no longer ours: a fresh one for the next attempt
        self.valid_until = 0.0

    def resign(self) -> None:
        """Give the key up at once (clean shutdown): followers need not wait for the TTL."""
        if self.lease:
            with contextlib.suppress(EtcdError):
                self.client.lease_revoke(self.lease)
        self._lose()

    # ---- the asyncio side -------------------------------------------------------------------

    async def run(self, on_change: Callable[[bool], None], watch_interval: float = 0.05) -> None:
        """Elect and hold until cancelled; ``on_change(may_publish)`` on every flip.

        Election I/O runs in a thread, and the fencing deadline is checked on its own every
        ``watch_interval`` seconds: a leader whose keepalive hangs (partition) still stops on
        time."""
        publishing = False
        io: asyncio.Task[None] | None = None
        next_io = 0.0
        try:
            while True:
                now = self.clock()
                if io is None and now >= next_io:
                    io = asyncio.create_task(asyncio.to_thread(self.step))
                if io is not None and io.done():
                    if io.exception() is not None:
                        log.error("leader election step failed", exc_info=io.exception())
                    io = None
                    next_io = now + (self.ttl / 3 if self.leading else self.poll_interval)
                allowed = self.may_publish()
                if allowed != publishing:
                    publishing = allowed
                    log.info("replica %s: publishing %s", self.name, "on" if allowed else "off")
                    on_change(allowed)
                await asyncio.sleep(watch_interval)
        finally:
            if publishing:
                on_change(False)
            if io is not None:
                with contextlib.suppress(Exception):
                    await io


class LeaderCollector:
    """Prometheus view of the election: who may publish, how often this replica led, and how
    many verdicts wait for etcd (``unsynced`` reads the store's backlog)."""

    def __init__(self, elector: LeaderElector, unsynced: Callable[[], int]) -> None:
        self.elector = elector
        self.unsynced = unsynced

    def collect(self) -> Iterator[Metric]:
        leading = GaugeMetricFamily(
            "tunnelwatch_mesh_leader",
            "1 while this replica holds the leader lease and may publish, else 0")
        leading.add_metric([], 1.0 if self.elector.may_publish() else 0.0)
        yield leading
        terms = CounterMetricFamily(
            "tunnelwatch_mesh_leader_terms", "Times this replica became the leader")
        terms.add_metric([], float(self.elector.terms))
        yield terms
        backlog = GaugeMetricFamily(
            "tunnelwatch_mesh_etcd_unsynced_verdicts",
            "Verdicts decided by this replica and not yet appended to the etcd log")
        backlog.add_metric([], float(self.unsynced()))
        yield backlog
