"""The publisher interface: one verdict in, delivered or an error that says whether to retry."""

from __future__ import annotations

import abc
from collections.abc import Mapping

from probes.model import Verdict


class PublishError(Exception):
    """A delivery failed. Subclasses say whether trying again can help."""


class RetryableError(PublishError):
    """Worth retrying: the receiver is down, overloaded, unreachable or timed out."""


class PermanentError(PublishError):
    """Retrying cannot help (rejected as malformed, unknown server): dead-letter it at once."""


class Publisher(abc.ABC):
    """A destination for verdict changes.

    :meth:`deliver` must be idempotent per ``verdict.idempotency_key`` (``node:seq``): the delivery
    loop delivers at least once, so after a crash a verdict may come again. Applying a verdict
    twice must leave the destination as applying it once does.
    """

    name: str

    @abc.abstractmethod
    async def deliver(self, verdict: Verdict) -> None:
        """Deliver one verdict; raise :class:`RetryableError` or :class:`PermanentError`."""

    async def reconcile(self, current: Mapping[str, Verdict]) -> int:
        """Bring the destination in line with the latest verdict of every node (on start, and
        after the destination was unreachable). Returns how many things it had to fix.
        Publishers without state of their own (webhooks) have nothing to do."""
        del current
        return 0

    async def close(self) -> None:  # noqa: B027 - optional hook, most publishers hold nothing
        """Release connections."""
