"""Per-publisher delivery metrics. The only label is ``publisher`` (a configured name: bounded)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class PublisherMetrics:
    """The metric families, registered once per registry and shared by every delivery loop."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.delivered = Counter(
            "tunnelwatch_publisher_delivered_total",
            "Verdicts the publisher delivered (acknowledged by the destination).",
            ["publisher"], registry=registry)
        self.retries = Counter(
            "tunnelwatch_publisher_retries_total",
            "Delivery attempts that failed and were retried.",
            ["publisher"], registry=registry)
        self.dead_lettered = Counter(
            "tunnelwatch_publisher_dead_lettered_total",
            "Verdicts given up on: a permanent error, or failing for over dead_letter_after.",
            ["publisher"], registry=registry)
        self.lag = Gauge(
            "tunnelwatch_publisher_lag_seconds",
            "Age of the oldest verdict the publisher has not delivered yet (0 when caught up).",
            ["publisher"], registry=registry)
        self.reconcile_fixes = Counter(
            "tunnelwatch_publisher_reconcile_fixes_total",
            "Drift fixed by reconciling the destination with the current verdicts.",
            ["publisher"], registry=registry)

    def init(self, publisher: str) -> None:
        """Create the series at 0 so rates and alerts work before the first event."""
        for family in (self.delivered, self.retries, self.dead_lettered, self.reconcile_fixes):
            family.labels(publisher)
        self.lag.labels(publisher).set(0)
