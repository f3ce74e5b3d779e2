"""Verdict publishing: the durable outbox delivered to balancers and webhooks.

* :mod:`.base` — the :class:`Publisher` interface and its two error kinds;
* :mod:`.outbox` — what the delivery loop reads (the mesh store's verdict log) and an in-memory one;
* :mod:`.delivery` — one loop per publisher: in order, at least once, backoff, dead letter;
* :mod:`.metrics` — per-publisher Prometheus metrics;
* :mod:`.webhook` — signed JSON webhooks; :mod:`.haproxy` — the HAProxy runtime API;
* :mod:`.receiver` — the reference webhook receiver that applies verdicts to a local HAProxy.
"""

from probes.mesh.publish.base import PermanentError, Publisher, PublishError, RetryableError

__all__ = ["PermanentError", "PublishError", "Publisher", "RetryableError"]
