"""The one interface every check kind implements.

A check kind is a name (``"wireguard.handshake"``), a tier, a typed parameter struct and an async
function ``run(params, timeout) -> CheckResult``. The agent's scheduler, the one-shot
``tunnelwatch probe`` CLI and the ``/probe`` endpoint all go through :func:`execute`, so a check
behaves the same wherever it is called from.

Contract for ``run``:

* it never raises for anything the network or the server did: a malformed packet, silence, a
  refused connection are all a failed :class:`CheckResult` with a closed-enum reason;
* it measures with a monotonic clock (:class:`Stopwatch`);
* it may overrun ``timeout`` only by cleanup (sending an EXIT, a Delete); :func:`execute` enforces a
  hard bound anyway and reports ``timeout`` if the check did not finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec

from probes.model import NodeLoad, Quality, Reason, Tier

log = logging.getLogger(__name__)

# cleanup (EXIT, Delete, close) may take this long past the check's own timeout
CLEANUP_GRACE_SECONDS = 1.0
MIN_RETRY_SECONDS = 0.05


def first_retry_after(configured: float, timeout: float) -> float:
    """When a check first retransmits: its configured interval, but no later than a quarter of
    its timeout, so that (with a doubling backoff: at 1/4 and 3/4 of it) two retries fit.

    A check whose first retry comes after its timeout turns every lost packet into a failure:
    with the 1 s handshake timeouts fast detection wants, 5 % loss failed 17-19 % of OpenVPN
    TLS probes, and a few such runs in a row at two vantages made a false DOWN."""
    return max(MIN_RETRY_SECONDS, min(configured, timeout / 4))

Fact = str | int | float | bool


@dataclass(slots=True)
class CheckResult:
    ok: bool
    reason: Reason
    duration_seconds: float
    phases: dict[str, float] = field(default_factory=dict)
    quality: Quality | None = None
    detail: str = ""
    facts: dict[str, Fact] = field(default_factory=dict)
    load: NodeLoad | None = None  # a node load read's rates (telemetry.load), for the mesh

    def to_json_dict(self) -> dict[str, Any]:
        """The one-shot CLI's ``--json`` output contract."""
        out: dict[str, Any] = {
            "ok": self.ok,
            "reason": self.reason.value,
            "duration_seconds": round(self.duration_seconds, 6),
            "phases": {k: round(v, 6) for k, v in self.phases.items()},
        }
        if self.quality is not None:
            out["quality"] = msgspec.to_builtins(self.quality)
        if self.detail:
            out["detail"] = self.detail
        if self.facts:
            out["facts"] = dict(self.facts)
        if self.load is not None:
            out["load"] = msgspec.to_builtins(self.load)
        return out


class Stopwatch:
    """Monotonic phase timer: ``lap("connect")`` records the time since the previous lap."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self._last = self.start
        self.phases: dict[str, float] = {}

    def lap(self, phase: str) -> float:
        now = time.monotonic()
        took = now - self._last
        self.phases[phase] = self.phases.get(phase, 0.0) + took
        self._last = now
        return took

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def result(
        self,
        ok: bool,
        reason: Reason,
        *,
        quality: Quality | None = None,
        detail: str = "",
        facts: dict[str, Fact] | None = None,
    ) -> CheckResult:
        return CheckResult(
            ok=ok,
            reason=reason,
            duration_seconds=self.elapsed(),
            phases=dict(self.phases),
            quality=quality,
            detail=detail,
            facts=facts or {},
        )


P = TypeVar("P")


@dataclass(frozen=True, slots=True)
class CheckKind(Generic[P]):
    name: str
    tier: Tier
    params_type: type[P]
    run: Callable[[P, float], Awaitable[CheckResult]]
    description: str = ""


_REGISTRY: dict[str, CheckKind[Any]] = {}


def register(kind: CheckKind[P]) -> CheckKind[P]:
    if kind.name in _REGISTRY and _REGISTRY[kind.name] is not kind:
        raise ValueError(f"check kind {kind.name!r} registered twice")
    _REGISTRY[kind.name] = kind
    return kind


def get_kind(name: str) -> CheckKind[Any]:
    from probes.checks import load_all  # noqa: PLC0415 - registry fills lazily, avoids import cycles

    load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown check kind {name!r}; known: {known}") from None


def all_kinds() -> dict[str, CheckKind[Any]]:
    from probes.checks import load_all  # noqa: PLC0415

    load_all()
    return dict(_REGISTRY)


async def execute(kind: CheckKind[P], params: P, timeout: float) -> CheckResult:
    """Run one check with a hard time bound; turn every escape into a result with a reason."""
    started = time.monotonic()
    try:
        return await asyncio.wait_for(kind.run(params, timeout), timeout + CLEANUP_GRACE_SECONDS)
    except TimeoutError:
        return CheckResult(False, Reason.TIMEOUT, time.monotonic() - started,
                           detail=f"no result within {timeout:g}s")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug in a probe must never look like a node failure
        log.exception("check %s crashed", kind.name)
        return CheckResult(False, Reason.PROBE_ERROR, time.monotonic() - started,
                           detail=f"{type(exc).__name__}: {exc}")
