"""Whether the mesh's store can commit, and when to try it again.

While it cannot, the mesh refuses every input (agents get 503 and resend; ticks and admin
actions wait), ``/healthz`` answers 503 saying why, and ``tunnelwatch_mesh_store_up`` is 0. It
never decides alone: a verdict that cannot be stored is not made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BACKOFF_INITIAL = 0.5  # seconds before the first probe of a failed store
BACKOFF_MAX = 30.0


@dataclass
class StoreHealth:
    ok: bool = True
    # the engine could not be rebuilt from the store after a failed commit: it may hold an
    # input the store does not, so nothing is decided (or snapshotted) until it is rebuilt
    diverged: bool = False
    # the snapshot every start takes (so config changes apply from there) is not written yet
    snapshot_required: bool = False
    error: str = ""
    since: float = 0.0  # wall clock when the trouble began
    commit_failures_total: int = 0
    rebuilds_total: int = 0  # the engine rebuilt from the store after a failure
    retry_at: float = 0.0  # monotonic
    backoff: float = BACKOFF_INITIAL

    def failed(self, error: str, wall: float, monotonic: float) -> None:
        """A write failed: refuse inputs, probe the store again after the backoff."""
        if self.ok:
            self.since = wall
            self.backoff = BACKOFF_INITIAL
        self.ok = False
        self.error = error[:300]
        self.retry_at = monotonic + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def due(self, monotonic: float) -> bool:
        return not self.ok and monotonic >= self.retry_at

    def recovered(self) -> None:
        self.ok = True
        self.diverged = False
        self.snapshot_required = False
        self.error = ""
        self.backoff = BACKOFF_INITIAL

    def view(self) -> dict[str, Any]:
        if self.ok:
            return {"store": "ok"}
        return {"store": "failing", "error": self.error, "since": self.since,
                "engine": "diverged: rebuilt once the store reads" if self.diverged
                else "as stored"}
