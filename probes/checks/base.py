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
  hard bound anyway (a kind's ``start`` its own) and reports ``timeout`` if it did not finish.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, overload

import msgspec

from probes.config import Problem, Target, resolve_path
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

    def failed(self, exc: Exception, facts: dict[str, Fact]) -> CheckResult:
        """The result of a check run that ``exc`` ended: a :class:`ProbeFailure`'s reason (the
        phase that stalled lapped first), or ``probe-error`` for our own (a
        :class:`ConfigError`)."""
        if isinstance(exc, ProbeFailure):
            if exc.phase:
                self.lap(exc.phase)
            return self.result(False, exc.reason, detail=exc.detail, facts=facts)
        return self.result(False, Reason.PROBE_ERROR, detail=str(exc), facts=facts)


class ProbeFailure(Exception):
    """Ends a check run early with a closed-enum reason. ``phase``: the phase that stalled (the
    check laps its time up to the failure)."""

    def __init__(self, reason: Reason, detail: str, phase: str = "") -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.phase = phase


class ConfigError(ValueError):
    """A check's own parameters or material (key files, certificates) are unusable: never the
    node's fault. A check turns it into ``probe-error``; ``tunnelwatch probe`` into a usage error
    before it runs anything."""


P = TypeVar("P")
Done = Callable[[CheckResult], None]


class Started(Protocol):
    """A check run started by a :data:`Starter`: it calls its ``done`` once, later, unless
    cancelled first (then it reports nothing and holds nothing)."""

    def cancel(self) -> object: ...


# Starts a run of the check on the running loop without a coroutine: ``(params, timeout, done)``
# -> the run, which calls ``done(result)`` later from a loop callback (never from within the
# call), within ``timeout`` plus its cleanup; or None, having done nothing, when these params
# need the coroutine (``CheckKind.run``). The L4 kinds' scheduled runs, thousands a second,
# cost a task, a coroutine per layer, a future and a deadline context each the other way.
Starter = Callable[[P, float, Done], Started | None]


@dataclass(frozen=True, slots=True)
class CheckKind(Generic[P]):
    """One kind of check: its name, its tier (sent with every observation of it), its params
    struct and the coroutine that runs it. Declared once, in its family (:class:`Family`).
    ``start``: the same run without a coroutine, where the kind has one (see :data:`Starter`);
    its results are the coroutine's."""

    name: str
    tier: Tier
    params_type: type[P]
    run: Callable[[P, float], Awaitable[CheckResult]]
    description: str = ""
    start: Starter[P] | None = None


@dataclass(frozen=True, slots=True)
class Planned:
    """One check of one node, as a family plans it: its name (unique per node, e.g.
    ``tcp:443``, ``wireguard.handshake``), its kind and its params. ``min_interval``: the
    check never starts sooner than this many seconds after its last start, whatever asks
    (its tier's rounds, fast re-probes, the mesh): a budget, e.g. a throughput burst's."""

    check: str
    kind: CheckKind[Any]
    params: Any
    min_interval: float = 0.0

    @classmethod
    def of(cls, kind: CheckKind[P], params: P, *, min_interval: float = 0.0) -> Planned:
        """The check named after its kind (one per node)."""
        return cls(kind.name, kind, params, min_interval)


St = TypeVar("St", bound=msgspec.Struct)


@dataclass(frozen=True, slots=True)
class PlanContext:
    """What planning one target needs beside the target: where its relative paths lead (the
    config file's folder) and where checks keep state across runs (the agent's state dir;
    ``None``: not kept, as the one-shot CLI does with ``--no-state``)."""

    target: Target
    base_dir: Path
    state_dir: Path | None = None
    state_files: Mapping[str, str] = field(default_factory=dict)  # a name's file elsewhere

    @overload
    def path(self, value: str) -> str: ...

    @overload
    def path(self, value: None) -> None: ...

    def path(self, value: str | None) -> str | None:
        """A config path, resolved against the config's folder."""
        return None if value is None else str(resolve_path(value, self.base_dir))

    def params(self, params_type: type[St], section: msgspec.Struct, **given: Any) -> St:
        """Check params whose struct extends its config section's: the section's fields, the
        target's address as ``host``, and ``given`` over them (resolved paths, state files)."""
        return params_type(**{**msgspec.structs.asdict(section), "host": self.target.address,
                              **given})

    def state_file(self, name: str) -> str | None:
        if name in self.state_files:
            return self.state_files[name]
        return None if self.state_dir is None else str(self.state_dir / name)


S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class ProbeCommand(Generic[S]):
    """``tunnelwatch probe <name>``: one check now, planned as the agent plans it
    (:func:`plan_once`). Its flags are the fields of ``options`` — the family's config section,
    or (for a command without one) the kind's params — one ``--field-name`` each, typed,
    defaulted and described (by the field's comment) as the struct says; the node is
    ``--endpoint HOST[:PORT]``."""

    name: str
    help: str
    options: type[S]
    plan: Callable[[S, PlanContext], Iterable[Planned]]
    validate: Callable[[S, str, Path], Iterable[Problem]] | None = None  # the config's rules
    preflight: Callable[[Planned], None] | None = None  # reads the check's keys, certificates
    aliases: Mapping[str, str] = field(default_factory=dict)  # older flag -> field
    negated: Mapping[str, str] = field(default_factory=dict)  # flag -> boolean field it clears
    defaults: Mapping[str, Any] = field(default_factory=dict)  # one-shot defaults of fields
    positional: tuple[str, ...] = ()  # an older positional spelling of the node (host, port)
    port_required: bool = False  # the node's port has no default: HOST:PORT
    state_files: tuple[str, ...] = ()  # what its checks keep between runs (--state-file)
    default_timeout: float = 5.0
    description: str = ""


def plan_once(command: ProbeCommand[Any], host: str, port: int | None,
              given: Mapping[str, Any] | None = None, *, state_dir: Path | None = None,
              state_files: Mapping[str, str] | None = None,
              where: Callable[[str], str] = lambda path: f"{path}: ") -> Planned:
    """One check of ``command`` against ``host[:port]`` with options ``given`` over the
    command's defaults, validated by the config file's rules and planned as the agent plans a
    target: the deepest check planned, its keys and certificates read. ValueError or
    :class:`ConfigError` when the options do not make a check (a WireGuard command without
    keys). ``tunnelwatch probe`` and the agent's ``/probe`` for an address both come here."""
    options_given = {**command.defaults, **(given or {})}
    if port is not None:
        options_given["port"] = port
    if "host" in {f.name for f in msgspec.structs.fields(command.options)}:
        options_given["host"] = host
    try:
        options = msgspec.convert(options_given, command.options)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None
    if command.validate is not None:
        problems = [f"{where(p.path)}{p.message}"
                    for p in command.validate(options, "$", Path.cwd())]
        if problems:
            raise ValueError("; ".join(problems))
    target = Target(id="probe", pool="", pop="", region="", address=host)
    planned = list(command.plan(options, PlanContext(target, Path.cwd(), state_dir,
                                                     dict(state_files or {}))))
    if not planned:
        raise ValueError("nothing to run with these options")
    chosen = planned[-1]
    if command.preflight is not None:
        command.preflight(chosen)  # keys and certificates, read now: a bad one is ours
    return chosen


def section_plan(section: str, plan: Callable[[PlanContext], Iterable[Planned]]
                 ) -> Callable[[Any, PlanContext], Iterable[Planned]]:
    """A probe command's planning when its options are a config section: the family's own
    ``plan`` for a target with that section."""
    return lambda options, ctx: plan(dataclasses.replace(
        ctx, target=msgspec.structs.replace(ctx.target, **{section: options})))


@dataclass(frozen=True, slots=True)
class Family:
    """The check kinds of one protocol (one config section) and how they are planned.

    ``plan`` turns a target into its checks of this family: nothing when the target has no
    section for it; a kind the section cannot run (a WireGuard session without a canary) is
    simply not planned. It is the one mapping from a config section to check params, used by
    the agent and by ``tunnelwatch probe`` alike."""

    name: str  # the config section, the word `checks:` filters on
    kinds: tuple[CheckKind[Any], ...]
    plan: Callable[[PlanContext], Iterable[Planned]]
    description: str = ""
    commands: tuple[ProbeCommand[Any], ...] = ()  # its `tunnelwatch probe` subcommands


def start_run(kind: CheckKind[P], params: P, timeout: float, done: Done) -> Started | None:
    """The kind's run started without a coroutine (:data:`Starter`), or None when the kind or
    these params need the coroutine; a start that raised tells ``done`` its crash, later."""
    if kind.start is None:
        return None
    began = time.monotonic()
    try:
        return kind.start(params, timeout, done)
    except Exception as exc:  # a bug in a probe must never look like a node failure
        return asyncio.get_running_loop().call_soon(done, crashed(kind, exc, began))


def settle(fut: asyncio.Future[CheckResult], result: CheckResult) -> None:
    if not fut.done():  # a started run's ``done``: told after its awaiting caller was cancelled
        fut.set_result(result)


async def result_of(fut: asyncio.Future[CheckResult], run: Started) -> CheckResult:
    """The result of a started run that settles ``fut``; the run is cancelled with the caller."""
    try:
        return await fut
    except asyncio.CancelledError:
        run.cancel()
        raise


async def execute(kind: CheckKind[P], params: P, timeout: float) -> CheckResult:
    """Run one check with a hard time bound; turn every escape into a result with a reason."""
    started = time.monotonic()
    # a run started without a coroutine (L4) keeps its own bound and ends in the callback that
    # sees its socket ready, so the caller's next check starts after every run that ended in
    # that loop turn; the coroutine ended and started L4 probes one by one (+15-25 % CPU, #19)
    fut: asyncio.Future[CheckResult] = asyncio.get_running_loop().create_future()
    run = start_run(kind, params, timeout, partial(settle, fut))
    if run is not None:
        return await result_of(fut, run)
    try:
        # the check runs in the caller's task under a deadline: ``wait_for`` would wrap it in a
        # second task per probe (a fifth of the scheduled agent's own per-probe CPU with the
        # timer and bookkeeping that go with it), and on Python 3.11 may swallow a cancel
        async with asyncio.timeout(timeout + CLEANUP_GRACE_SECONDS):
            return await kind.run(params, timeout)
    except TimeoutError:
        return CheckResult(False, Reason.TIMEOUT, time.monotonic() - started,
                           detail=f"no result within {timeout:g}s")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug in a probe must never look like a node failure
        return crashed(kind, exc, started)


def crashed(kind: CheckKind[Any], exc: Exception, started: float) -> CheckResult:
    """The result of a check run that a bug (an exception no check turns into a reason) ended,
    logged with its traceback: ``probe-error``, never a node failure."""
    log.exception("check %s crashed", kind.name, exc_info=exc)
    return CheckResult(False, Reason.PROBE_ERROR, time.monotonic() - started,
                       detail=f"{type(exc).__name__}: {exc}")


def weak_choices_result(watch: Stopwatch, facts: dict[str, Fact], accepted: list[str],
                        describe: Callable[[str], str]) -> CheckResult | None:
    """A policy scan's summary: the count and names of the deprecated choices a node accepted
    (as facts), and a WEAK_CRYPTO failure naming each; None when it accepted none."""
    facts["node_policy_weak_accepted"] = len(accepted)
    facts["weak_accepted"] = ",".join(accepted)
    if not accepted:
        return None
    named = "; ".join(describe(n) for n in accepted)
    return watch.result(False, Reason.WEAK_CRYPTO, facts=facts,
                        detail=f"accepted {len(accepted)} deprecated choice(s): {named}")
