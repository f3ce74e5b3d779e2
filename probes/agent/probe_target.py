"""What ``/probe?target=...&module=...`` asks for, as blackbox_exporter users write it.

``target`` is a node id of the agent config (as before) or an address: ``HOST``, ``HOST:PORT``
or ``[IPV6]:PORT``, as blackbox_exporter takes it. ``module`` is a check name of that node
(``tcp:443``), a check kind (``tcp``, ``wireguard.handshake``) or a protocol name as ``checks:``
takes it (``wireguard``). An address is first looked up among the configured nodes (a node whose
``address`` it is, and on a given port the check on that port), so a module that needs keys
(WireGuard, OpenVPN) runs with that node's; otherwise the check is planned for the address alone,
as ``tunnelwatch probe`` plans it, which works for the kinds an address is enough for (``tcp``,
``udp``, ``icmp``, ``quic``, ``ikev2``, ``mtu``).

The two mistakes get distinct answers (both 400, as blackbox): an unknown module, and a target
that is neither a node nor an address (or not enough for that module).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from probes.agent.plan import PlannedCheck
from probes.checks import registry
from probes.checks.base import CheckKind, ConfigError, ProbeCommand, plan_once
from probes.config import HOSTNAME, Target, split_host_port


class ProbeRequestError(ValueError):
    """A /probe request that cannot be run; ``kind`` is ``module`` or ``target``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class ProbeChoice:
    """The check a /probe request runs, and where it came from (for ``debug=true``)."""

    name: str  # check name, e.g. "tcp:443"
    kind: CheckKind[Any]
    params: Any
    source: str  # "node n1" or "address 192.0.2.1:443"
    tier_check: PlannedCheck | None  # the configured check (its tier's timeout), if any


def _protocol(kind: str) -> str:
    return kind.split(".", 1)[0]


def _matches(check: PlannedCheck, module: str) -> bool:
    return module in (check.check, check.kind.name, _protocol(check.kind.name))


def _known_module(module: str, checks: Iterable[PlannedCheck]) -> bool:
    if any(_matches(c, module) for c in checks):
        return True
    kinds = registry.all_kinds()  # every family loaded: only for a module no node plans
    return module in kinds or module in {_protocol(k) for k in kinds}


def _command_for(module: str) -> ProbeCommand[Any] | None:
    """The ``tunnelwatch probe`` command that runs ``module`` for a bare address."""
    for family in registry.families():
        for command in family.commands:
            kinds = {k.name for k in family.kinds}
            if module == command.name or module in kinds or module == family.name:
                return command
    return None


def _address(target: str) -> tuple[str, int | None]:
    try:
        host, port = split_host_port(target)
    except ValueError as exc:
        raise ProbeRequestError("target", f"Bad target {target!r}: {exc}") from None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not HOSTNAME.match(host):
            raise ProbeRequestError(
                "target", f"Bad target {target!r}: expected a node id of this agent, HOST, "
                          "HOST:PORT or [IPV6]:PORT") from None
    return host, port


def _first(checks: Iterable[PlannedCheck], module: str, port: int | None = None
           ) -> PlannedCheck | None:
    """A check name wins over a kind or protocol; with ``port``, the check on that port."""
    matching = [c for c in checks if _matches(c, module)]
    if port is not None:
        matching = [c for c in matching if getattr(c.params, "port", port) == port]
    exact = [c for c in matching if c.check == module]
    best = exact or matching
    return best[0] if best else None


def choose(target: str, module: str, checks: Sequence[PlannedCheck],
           targets: Sequence[Target]) -> ProbeChoice:
    """The check ``target`` and ``module`` name; :class:`ProbeRequestError` otherwise."""
    if not target:
        raise ProbeRequestError("target", "Target parameter is missing")
    if not _known_module(module, checks):
        raise ProbeRequestError("module", f"Unknown module {module!r}")
    nodes = {c.node for c in checks}
    if target in nodes:
        check = _first((c for c in checks if c.node == target), module)
        if check is None:
            raise ProbeRequestError("module", f"Unknown module {module!r} for node {target!r}")
        return ProbeChoice(check.check, check.kind, check.params, f"node {target}", check)
    host, port = _address(target)
    by_address = {t.id for t in targets if t.address == host}
    check = _first((c for c in checks if c.node in by_address), module, port)
    if check is not None:
        return ProbeChoice(check.check, check.kind, check.params,
                           f"node {check.node} (address {target})", check)
    command = _command_for(module)
    if command is None:
        raise ProbeRequestError("module", f"Unknown module {module!r} for an address")
    try:
        planned = plan_once(command, host, port)
    except (ValueError, ConfigError) as exc:
        raise ProbeRequestError(
            "target", f"Bad target {target!r} for module {module!r}: {exc} (a node of the "
                      "agent config with that address runs with its settings)") from None
    return ProbeChoice(planned.check, planned.kind, planned.params, f"address {target}", None)


CHOICE_MEMO_MAX = 256  # distinct (target, module) pairs whose choice is remembered


class Chooser:
    """:func:`choose` against the running plan, remembered per (target, module) while the plan
    (checks and targets) is the same: a scraper asks for the same few again and again, and a
    reload's new plan starts afresh. Refusals are not remembered."""

    def __init__(self, plan: Callable[[], tuple[Sequence[PlannedCheck], Sequence[Target]]]
                 ) -> None:
        self._plan = plan
        self._of: tuple[Sequence[PlannedCheck], Sequence[Target]] | None = None
        self._memo: dict[tuple[str, str], ProbeChoice] = {}

    def __call__(self, target: str, module: str) -> ProbeChoice:
        plan = self._plan()
        if self._of is None or plan[0] is not self._of[0] or plan[1] is not self._of[1]:
            self._of, self._memo = plan, {}
        choice = self._memo.get((target, module))
        if choice is None:
            choice = choose(target, module, *plan)
            if len(self._memo) >= CHOICE_MEMO_MAX:
                self._memo.clear()
            self._memo[target, module] = choice
        return choice
