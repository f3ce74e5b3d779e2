"""The publisher interface: one verdict in, delivered or an error that says whether to retry."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence

from probes.model import Verdict, WeightChange

# a node's current published weight (percent), or None: no weights, or none published yet
WeightOf = Callable[[str], int | None]


class PublishError(Exception):
    """A delivery failed. Subclasses say whether trying again can help."""


class RetryableError(PublishError):
    """Worth retrying: the receiver is down, overloaded, unreachable or timed out."""


class PermanentError(PublishError):
    """Retrying cannot help (rejected as malformed, unknown server): dead-letter it at once."""


class Publisher(abc.ABC):
    """A destination for verdict changes.

    :meth:`deliver` must be idempotent per ``verdict.idempotency_key`` (``node:epoch:seq``): the
    delivery loop delivers at least once, so after a crash a verdict may come again. Applying a
    verdict twice must leave the destination as applying it once does.
    """

    name: str
    # weights (docs/weights.md): a publisher that can carry them sets ``supports_weights`` and
    # implements :meth:`deliver_weights`; the mesh hands it ``weight_of`` so that a verdict it
    # applies (and reconcile) uses the node's current weight, not the one of the verdict's time
    supports_weights = False
    weight_of: WeightOf | None = None

    @abc.abstractmethod
    async def deliver(self, verdict: Verdict) -> None:
        """Deliver one verdict; raise :class:`RetryableError` or :class:`PermanentError`."""

    async def reconcile(self, current: Mapping[str, Verdict]) -> int:
        """Bring the destination in line with the latest verdict of every node (on start, and
        after the destination was unreachable). Returns how many things it had to fix.
        Publishers without state of their own (webhooks) have nothing to do."""
        del current
        return 0

    async def deliver_weights(self, changes: Sequence[WeightChange]) -> None:
        """Apply the latest weight change of each of some nodes (at most one per node). Weights
        are levels, not events: only the newest matters, and applying one twice is harmless.
        Weight 0 comes with a state (DOWN, DRAINING, MAINTENANCE) that the verdict applies."""
        del changes

    async def reconcile_weights(self, current: Mapping[str, WeightChange]) -> int:
        """Bring the destination's weights in line with ``current`` (the latest change of every
        node) on start and after an outage; returns how many things it had to fix. Publishers
        whose :meth:`reconcile` already converges weights (through ``weight_of``) need nothing
        here."""
        del current
        return 0

    async def close(self) -> None:  # noqa: B027 - optional hook, most publishers hold nothing
        """Release connections."""
