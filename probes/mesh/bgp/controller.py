"""The anycast controller: node verdicts in, BGP announcements out, through one speaker per PoP.

It owns a :class:`~probes.mesh.bgp.pop.PopEngine` and applies its changes idempotently: for each
PoP it computes the routes that *should* be announced and changes the speaker only where what it
announces differs. The same comparison runs on start (and every ``reconcile_interval``), so drift
is repaired and a restart changes nothing that was right:

* on start the controller reads what every speaker announces and *adopts* it as the PoP's
  state, so a mesh restart never re-announces a withdrawn PoP or withdraws a healthy one before
  fresh evidence arrives;
* a speaker that cannot be reached is retried on the next reconcile; its PoP's routes stay as
  the speaker has them (GoBGP keeps routes while its BGP session is up).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import msgspec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from probes.aio import wait_at_most
from probes.mesh.bgp.pop import Pin, PopChange, PopEngine, PopPolicy, PopState
from probes.mesh.bgp.speaker import Announcement, Speaker, SpeakerError
from probes.model import VerdictState

log = logging.getLogger(__name__)


class PopSpeakerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pop: str
    api_host: str
    api_port: int = 50051
    asn: int
    prefixes: list[str]
    next_hop: str | None = None


class AnycastConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The ``anycast:`` section of the mesh config."""

    pops: list[PopSpeakerConfig]
    policy: PopPolicy = msgspec.field(default_factory=PopPolicy)
    announced_med: int = 100
    drained_med: int = 1000  # soft drain: less preferred, still reachable
    drained_prepend: int = 0  # optional extra AS-path length on drain
    reconcile_interval_seconds: float = 15.0


@dataclass
class _PopRuntime:
    config: PopSpeakerConfig
    speaker: Speaker
    last_change: float = 0.0
    announced: dict[str, Announcement] = field(default_factory=dict)  # as last read / written
    reachable: bool = False


class AnycastController:
    def __init__(self, config: AnycastConfig, members: Iterable[tuple[str, str, str]],
                 speakers: dict[str, Speaker], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.engine = PopEngine(config.policy, members)
        self.clock = clock
        self._pops = {p.pop: _PopRuntime(p, speakers[p.pop]) for p in config.pops}
        self._lock = asyncio.Lock()
        self.changes: list[PopChange] = []  # the PoP-level audit trail
        self.speaker_errors_total = 0

    # ------------------------------------------------------------------ desired routes

    def desired(self, pop: str) -> dict[str, Announcement]:
        rt = self._pops[pop]
        state = self.engine.state(pop)
        if state is PopState.WITHDRAWN:
            return {}
        drained = state is PopState.DRAINED
        return {prefix: Announcement(
            prefix, med=self.config.drained_med if drained else self.config.announced_med,
            prepend=self.config.drained_prepend if drained else 0,
            next_hop=rt.config.next_hop) for prefix in rt.config.prefixes}

    def _state_of(self, pop: str, routes: dict[str, Announcement]) -> PopState:
        ours = [routes[p] for p in self._pops[pop].config.prefixes if p in routes]
        if not ours:
            return PopState.WITHDRAWN
        drained_med = self.config.drained_med != self.config.announced_med
        drained = any((drained_med and r.med == self.config.drained_med) or r.prepend > 0
                      for r in ours)
        return PopState.DRAINED if drained else PopState.ANNOUNCED

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Adopt what the speakers announce now; then make them match (fixes partial drift)."""
        now = self.clock()
        for pop, rt in self._pops.items():
            try:
                rt.announced = await rt.speaker.announced()
                rt.reachable = True
            except SpeakerError as exc:
                self.speaker_errors_total += 1
                log.warning("anycast: speaker of %s unreachable at start: %s", pop, exc)
                continue
            self.engine.adopt(pop, self._state_of(pop, rt.announced), now)
        await self.reconcile()

    async def reconcile(self) -> None:
        async with self._lock:
            for pop in self._pops:
                await self._converge(pop, reread=True)

    async def run(self, stop: asyncio.Event) -> None:
        """Timers (hysteresis, damping) and periodic reconciliation until ``stop`` is set."""
        next_reconcile = self.clock() + self.config.reconcile_interval_seconds
        while not stop.is_set():
            now = self.clock()
            await self._apply(self.engine.tick(now))
            if now >= next_reconcile:
                await self.reconcile()
                next_reconcile = now + self.config.reconcile_interval_seconds
            timer = self.engine.next_timer(now)
            wait = min(next_reconcile, timer if timer is not None else next_reconcile) - now
            await wait_at_most(stop, max(0.05, wait))

    # ------------------------------------------------------------------ inputs

    async def on_verdict(self, node: str, state: VerdictState) -> list[PopChange]:
        changes = self.engine.on_verdict(node, state, self.clock())
        await self._apply(changes)
        return changes

    async def pin(self, pop: str, pin: Pin | None, *, who: str, note: str = "",
                  force: bool = False) -> list[PopChange]:
        if pop not in self._pops:
            raise KeyError(pop)
        changes = self.engine.pin(pop, pin, self.clock(), who=who, note=note, force=force)
        await self._apply(changes)
        return changes

    # ------------------------------------------------------------------ applying

    async def _apply(self, changes: list[PopChange]) -> None:
        if not changes:
            return
        async with self._lock:
            for change in changes:
                self.changes.append(change)
                self._pops[change.pop].last_change = change.at
                level = logging.WARNING if change.held_by_guard else logging.INFO
                log.log(level, "anycast: PoP %s %s -> %s (%s)", change.pop, change.previous,
                        change.state, "; ".join(change.reasons))
            for pop in {c.pop for c in changes}:
                await self._converge(pop, reread=False)

    async def _converge(self, pop: str, *, reread: bool) -> None:
        rt = self._pops[pop]
        want = self.desired(pop)
        try:
            if reread or not rt.reachable:
                rt.announced = await rt.speaker.announced()
                rt.reachable = True
            for prefix, route in want.items():
                if rt.announced.get(prefix) != route:
                    await rt.speaker.announce(route)
                    rt.announced[prefix] = route
            for prefix in [p for p in rt.config.prefixes if p in rt.announced]:
                if prefix not in want:
                    await rt.speaker.withdraw(prefix)
                    del rt.announced[prefix]
        except SpeakerError as exc:
            rt.reachable = False
            self.speaker_errors_total += 1
            log.warning("anycast: speaker of %s: %s (retrying at next reconcile)", pop, exc)

    # ------------------------------------------------------------------ views

    def view(self) -> list[dict[str, object]]:
        now = self.clock()
        out = []
        for pop, rt in self._pops.items():
            v = self.engine.view(pop, now)
            v["announced"] = {p: {"med": a.med, "prepend": a.prepend}
                              for p, a in rt.announced.items()}
            v["speaker_reachable"] = rt.reachable
            out.append(v)
        return out

    def collector(self) -> Collector:
        return _AnycastCollector(self)


class _AnycastCollector(Collector):
    def __init__(self, controller: AnycastController) -> None:
        self.c = controller

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        return iter(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        return iter(self._families())

    def _families(self) -> list[GaugeMetricFamily | CounterMetricFamily]:
        state = GaugeMetricFamily("tunnelwatch_anycast_pop_state",
                                  "1 for the PoP's current anycast state", labels=["pop", "state"])
        announced = GaugeMetricFamily("tunnelwatch_anycast_prefix_announced",
                                      "1 while the PoP's speaker announces the prefix",
                                      labels=["pop", "prefix"])
        changed = GaugeMetricFamily("tunnelwatch_anycast_last_change_timestamp_seconds",
                                    "when the PoP's anycast state last changed", labels=["pop"])
        holding = GaugeMetricFamily("tunnelwatch_anycast_guard_holding",
                                    "1 while the fleet-wide guard keeps this PoP announced",
                                    labels=["pop"])
        reachable = GaugeMetricFamily("tunnelwatch_anycast_speaker_up",
                                      "1 when the PoP's BGP speaker answered last time",
                                      labels=["pop"])
        holds = CounterMetricFamily("tunnelwatch_anycast_guard_holds",
                                    "withdrawals the fleet-wide guard refused")
        errors = CounterMetricFamily("tunnelwatch_anycast_speaker_errors",
                                     "calls to BGP speakers that failed")
        now = self.c.clock()
        for pop, rt in self.c._pops.items():
            current = self.c.engine.state(pop)
            for s in PopState:
                state.add_metric([pop, s.value], 1.0 if s is current else 0.0)
            for prefix in rt.config.prefixes:
                announced.add_metric([pop, prefix], 1.0 if prefix in rt.announced else 0.0)
            changed.add_metric([pop], rt.last_change)
            view = self.c.engine.view(pop, now)
            holding.add_metric([pop], 1.0 if view["held_by_guard"] else 0.0)
            reachable.add_metric([pop], 1.0 if rt.reachable else 0.0)
        holds.add_metric([], float(self.c.engine.guard_holds_total))
        errors.add_metric([], float(self.c.speaker_errors_total))
        return [state, announced, changed, holding, reachable, holds, errors]


def anycast_problems(cfg: AnycastConfig, node_pops: dict[str, str],
                     at: str = "$.anycast") -> Iterator[tuple[str, str]]:
    """(field path, message) for everything wrong with an ``anycast:`` section.

    ``node_pops`` maps every configured node (and anycast check) to its PoP.
    """
    import ipaddress  # noqa: PLC0415 - only config validation needs it

    if not cfg.pops:
        yield f"{at}.pops", "at least one PoP speaker is required"
    seen: dict[str, int] = {}
    known_pops = set(node_pops.values())
    for i, pop in enumerate(cfg.pops):
        here = f"{at}.pops[{i}]"
        if pop.pop in seen:
            yield f"{here}.pop", f"duplicate of {at}.pops[{seen[pop.pop]}]"
        seen.setdefault(pop.pop, i)
        if pop.pop not in known_pops:
            yield f"{here}.pop", f"no node has pop {pop.pop!r}"
        if not 0 < pop.api_port < 65536:
            yield f"{here}.api_port", f"must be 1..65535, got {pop.api_port}"
        if not 0 < pop.asn < 2**32:
            yield f"{here}.asn", f"must be a 32-bit AS number, got {pop.asn}"
        if not pop.prefixes:
            yield f"{here}.prefixes", "at least one prefix is required"
        for j, prefix in enumerate(pop.prefixes):
            try:
                ipaddress.ip_network(prefix)
            except ValueError:
                yield f"{here}.prefixes[{j}]", f"expected a network like 192.0.2.0/24: {prefix!r}"
    p = cfg.policy
    if not 0 < p.degraded_below_share <= 1:
        yield f"{at}.policy.degraded_below_share", "must be within (0, 1]"
    if not 0 <= p.max_withdrawn_share <= 1:
        yield f"{at}.policy.max_withdrawn_share", "must be within [0, 1]"
    if p.max_withdrawn < 0:
        yield f"{at}.policy.max_withdrawn", "must be >= 0"
    for name in ("down_after_seconds", "up_after_seconds"):
        if getattr(p, name) < 0:
            yield f"{at}.policy.{name}", "must be >= 0"
    if p.damping.half_life_seconds <= 0 or p.damping.reuse <= 0:
        yield f"{at}.policy.damping", "half_life_seconds and reuse must be > 0"
    if cfg.reconcile_interval_seconds <= 0:
        yield f"{at}.reconcile_interval_seconds", "must be > 0"
