"""HAProxy publisher: verdicts become server admin states and weights through the runtime API.

=============  =======================================================
verdict        HAProxy server
=============  =======================================================
UP             ``ready``, weight 100% of the configured weight
DEGRADED       ``ready``, weight ``degraded_weight_percent`` (50%)
DOWN           ``maint`` (``down_action: drain`` keeps its connections)
DRAINING       ``drain``: no new connections, existing ones stay
MAINTENANCE    ``maint``
UNKNOWN        left as it is (we know nothing better)
=============  =======================================================

Every delivery converges one server: read its row of ``show servers state``, send only the
commands that differ. So applying a verdict twice is the same as once (idempotent by
construction), and :meth:`reconcile` is the same code over every mapped server — after a HAProxy
restart, the servers come back in their configured state and reconcile puts them right.

With weights on (docs/weights.md) the weight comes from the mesh's weight engine instead of the
table (DEGRADED's cap, slow start and load are in it already): every delivery and reconcile sets
the node's *current* weight, and weight changes between verdicts go out as ``set weight
<b>/<s> <n>%`` alone (:meth:`HAProxyPublisher.deliver_weights`).

Admin flags: in HAProxy 2.6 ``set server B/S state ready|drain|maint`` sets exactly that state
(``drain`` from ``maint`` clears maint, ``maint`` from ``drain`` clears drain; checked against the
real binary in tests/publish/test_haproxy_lab.py), so one command per change, and the server never
passes through "ready" between drain and maint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from probes.mesh.publish.base import PermanentError, Publisher
from probes.mesh.publish.runtime_api import RuntimeAPI, ServerState
from probes.model import Verdict, VerdictState, WeightChange

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Desired:
    admin: str  # "ready" | "drain" | "maint"
    weight_percent: int


@dataclass(frozen=True, slots=True)
class ServerMap:
    """Node id -> (backend, server). Nodes not listed map to ``default_backend``/``<node id>``."""

    default_backend: str = "vpn"
    servers: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    only_listed: bool = False  # True: ignore nodes not in ``servers``

    def lookup(self, node: str) -> tuple[str, str] | None:
        if node in self.servers:
            return self.servers[node]
        return None if self.only_listed else (self.default_backend, node)

    @staticmethod
    def parse_ref(ref: str, default_backend: str) -> tuple[str, str]:
        """``"backend/server"`` or just ``"server"`` (in the default backend)."""
        backend, _, server = ref.rpartition("/")
        return (backend or default_backend, server)


@dataclass(frozen=True, slots=True)
class StateMapping:
    down_action: str = "maint"  # or "drain"
    degraded_weight_percent: int = 50

    def desired(self, state: VerdictState) -> Desired | None:
        if state == VerdictState.UP:
            return Desired("ready", 100)
        if state == VerdictState.DEGRADED:
            return Desired("ready", self.degraded_weight_percent)
        if state == VerdictState.DOWN:
            return Desired(self.down_action, 100)
        if state == VerdictState.DRAINING:
            return Desired("drain", 100)
        if state == VerdictState.MAINTENANCE:
            return Desired("maint", 100)
        return None


def plan(ref: str, current: ServerState, want: Desired) -> list[str]:
    """The runtime API commands that take ``current`` to ``want`` (empty when already there)."""
    commands: list[str] = []
    expected_weight = current.initial_weight * want.weight_percent // 100
    if current.user_weight != expected_weight:
        commands.append(f"set weight {ref} {want.weight_percent}%")
    have = current.admin
    if have != want.admin:
        commands.append(f"set server {ref} state {want.admin}")
    return commands


class HAProxyPublisher(Publisher):
    supports_weights = True

    def __init__(self, name: str, api: RuntimeAPI, servers: ServerMap | None = None,
                 mapping: StateMapping | None = None) -> None:
        self.name = name
        self.api = api
        self.servers = servers or ServerMap()
        self.mapping = mapping or StateMapping()
        self.applied: list[tuple[str, list[str]]] = []  # (idempotency key, commands): last 1000

    async def _converge(self, backend: str, server: str, want: Desired,
                        rows: Mapping[tuple[str, str], ServerState] | None = None) -> list[str]:
        if rows is None:
            rows = await self.api.servers_state(backend)
        current = rows.get((backend, server))
        if current is None:
            raise PermanentError(f"HAProxy has no server {backend}/{server}")
        commands = plan(f"{backend}/{server}", current, want)
        for command in commands:
            await self.api.set_command(command)
        return commands

    def _desired(self, node: str, state: VerdictState) -> Desired | None:
        want = self.mapping.desired(state)
        weight = self.weight_of(node) if self.weight_of is not None else None
        if want is None or weight is None:
            return want
        return Desired(want.admin, weight)

    async def deliver(self, verdict: Verdict) -> None:
        ref = self.servers.lookup(verdict.node)
        want = self._desired(verdict.node, verdict.state)
        if ref is None or want is None:
            return  # not ours, or UNKNOWN: nothing to apply
        commands = await self._converge(*ref, want)
        if commands:
            log.info("haproxy %s: %s %s -> %s", self.name, verdict.idempotency_key,
                     verdict.state, "; ".join(commands))
        self.applied.append((verdict.idempotency_key, commands))
        del self.applied[:-1000]

    async def reconcile(self, current: Mapping[str, Verdict]) -> int:
        rows = await self.api.servers_state()
        fixed = 0
        for node, verdict in sorted(current.items()):
            ref = self.servers.lookup(node)
            want = self._desired(node, verdict.state)
            if ref is None or want is None:
                continue
            if ref not in rows:
                log.warning("haproxy %s: node %s maps to %s/%s, which HAProxy does not have",
                            self.name, node, *ref)
                continue
            commands = await self._converge(*ref, want, rows)
            if commands:
                log.info("haproxy %s: reconcile %s (%s) -> %s", self.name, node, verdict.state,
                         "; ".join(commands))
                fixed += 1
        return fixed

    async def deliver_weights(self, changes: Sequence[WeightChange]) -> None:
        rows = await self.api.servers_state()
        for change in changes:
            ref = self.servers.lookup(change.node)
            if ref is None:
                continue
            current = rows.get(ref)
            if current is None:  # the others still get theirs; the verdict path says so loudly
                log.warning("haproxy %s: no server %s/%s for %s's weight", self.name, *ref,
                            change.node)
                continue
            if current.user_weight != current.initial_weight * change.weight // 100:
                await self.api.set_command(f"set weight {ref[0]}/{ref[1]} {change.weight}%")
                log.info("haproxy %s: %s weight -> %d%%", self.name, change.idempotency_key,
                         change.weight)

    async def close(self) -> None:
        await self.api.close()
