"""Watches a running :class:`probes.lab.stack.Stack`: the mesh's verdict log and HAProxy's server
states, polled every ``interval`` (50 ms) on a thread, each change stamped with wall-clock time.

Times: verdicts carry the mesh's ``decided_at`` (wall clock, the instant the engine decided);
balancer changes are stamped when a poll first sees them, so they are late by at most one poll
interval (plus the poll's own duration). Fault times come from the scenario, same clock.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from probes.lab.stack import Stack


@dataclass(frozen=True, slots=True)
class VerdictEvent:
    at: float  # decided_at
    node: str
    state: str
    previous: str
    seq: int
    seen_at: float  # when the recorder saw it in the log
    why: str = ""  # the verdict's evidence, compact: "what vantage/check=reason; ..."


@dataclass(frozen=True, slots=True)
class BalancerEvent:
    at: float
    backend: str
    server: str
    in_rotation: bool
    admin: str
    op_state: int


@dataclass
class Recorder:
    stack: Stack
    interval: float = 0.05
    verdicts: list[VerdictEvent] = field(default_factory=list)
    balancer: list[BalancerEvent] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)  # latest mesh view, for tables
    details: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> /v1/nodes/{id}
    errors: int = 0
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Recorder:
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        last_id = 0
        rotation: dict[tuple[str, str], bool] = {}
        next_view = 0.0
        while not self._stop.is_set():
            started = time.time()
            try:
                for (backend, server), row in self.stack.haproxy.states().items():
                    if rotation.get((backend, server)) != row.in_rotation:
                        rotation[(backend, server)] = row.in_rotation
                        with self._lock:
                            self.balancer.append(BalancerEvent(started, backend, server,
                                                               row.in_rotation, row.admin,
                                                               row.op_state))
                for entry in self.stack.log(after=last_id):
                    last_id = max(last_id, int(entry["id"]))
                    v = entry["verdict"]
                    with self._lock:
                        self.verdicts.append(VerdictEvent(float(v["decided_at"]), v["node"],
                                                          v["state"], v["previous"],
                                                          int(v["seq"]), time.time(),
                                                          _why(v.get("reasons", []))))
                if started >= next_view:
                    nodes = self.stack.nodes()
                    details = {n["node"]: self.stack.node_view(n["node"]) for n in nodes}
                    with self._lock:
                        self.nodes, self.details = nodes, details
                    next_view = started + 1.0
            except Exception:  # a poll that failed (mesh restarting, ...) is retried
                self.errors += 1
            with contextlib.suppress(ValueError):
                self._stop.wait(max(0.0, self.interval - (time.time() - started)))

    # ------------------------------------------------------------------ queries

    def first_verdict(self, node: str, state: str, after: float) -> VerdictEvent | None:
        with self._lock:
            return next((v for v in self.verdicts
                         if v.node == node and v.state == state and v.at >= after), None)

    def first_balancer(self, backend: str, server: str, in_rotation: bool,
                       after: float) -> BalancerEvent | None:
        with self._lock:
            return next((b for b in self.balancer if b.backend == backend and b.server == server
                         and b.in_rotation == in_rotation and b.at >= after), None)

    def verdicts_between(self, start: float, end: float) -> list[VerdictEvent]:
        with self._lock:
            return [v for v in self.verdicts if start <= v.at <= end]

    def in_rotation(self, backend: str, server: str) -> bool | None:
        with self._lock:
            for b in reversed(self.balancer):
                if b.backend == backend and b.server == server:
                    return b.in_rotation
        return None

    def view(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.nodes)

    def failing_checks(self, node: str) -> list[str]:
        """``check=reason`` for every check some vantage sees failing on ``node`` (sorted)."""
        with self._lock:
            detail = self.details.get(node, {})
        failing: set[str] = set()
        for view in detail.get("vantages", {}).values():
            for name, check in view.get("checks", {}).items():
                if check.get("effective") == "DOWN":
                    failing.add(f"{name}={check.get('reason', '?')}")
                elif check.get("quality_breach"):
                    failing.add(f"{name}=quality")
        return sorted(failing)


def _why(reasons: list[dict[str, Any]]) -> str:
    parts = []
    for r in reasons[:8]:
        where = "/".join(x for x in (r.get("vantage", ""), r.get("check", "")) if x)
        text = r.get("what", "?") + (f" {where}" if where else "")
        if r.get("reason"):
            text += f"={r['reason']}"
        elif r.get("note"):
            text += f" ({r['note']})"
        parts.append(text)
    return "; ".join(parts)
