"""What to run against each node: config :class:`Target` -> list of :class:`PlannedCheck`.

* L4 checks come from the target's ``l4:`` section: one ``tcp:<port>`` per TCP port, one
  ``udp:<port>`` per UDP exchange, ``icmp`` when enabled.
* Protocol checks come from the ``wireguard:`` / ``openvpn:`` / ``ikev2:`` / ``quic:`` sections.
  Every registered check kind named ``<protocol>.<something>`` belongs to that protocol; the
  module that registered it turns the section into params with a module-level
  ``params_from_target(target, base_dir[, state_dir])`` returning either one params struct
  (shared by all the protocol's kinds) or a ``{kind name: params}`` mapping. A module without
  that function gets params by convention (section fields of the same name, plus ``host``; see
  :func:`_by_convention`). A protocol with no registered kinds is skipped with one log line,
  not an error: the agent runs what it can.
* ``checks:`` on a target filters: an entry matches a check name (``tcp:443``), a kind
  (``tcp``, ``wireguard.handshake``) or a protocol (``wireguard``).
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from probes.checks.base import CheckKind, all_kinds
from probes.config import AgentConfig, Target, resolve_path
from probes.model import Tier

log = logging.getLogger(__name__)

PROTOCOLS = ("wireguard", "openvpn", "ikev2", "quic", "mtu", "telemetry")


@dataclass(frozen=True, slots=True)
class PlannedCheck:
    """One check of one node, as the scheduler runs it."""

    node: str
    pool: str
    pop: str
    region: str
    check: str  # name, unique per node: "tcp:443", "icmp", "wireguard.handshake"
    kind: CheckKind[Any]
    params: Any
    tier: Tier

    @property
    def key(self) -> str:
        return f"{self.node}/{self.check}"


def _wanted(target: Target, check: str, kind: str) -> bool:
    if not target.checks:
        return True
    protocol = kind.split(".", 1)[0]
    return any(w in (check, kind, protocol) for w in target.checks)


def _l4_checks(target: Target, kinds: dict[str, CheckKind[Any]]) -> Iterable[tuple[str, str,
                                                                                    Any]]:
    if target.l4 is None:
        return
    from probes.checks import l4  # noqa: PLC0415 - registered through CHECK_MODULES as well

    if "tcp" in kinds:
        for port in target.l4.tcp_ports:
            yield f"tcp:{port}", "tcp", l4.TcpParams(host=target.address, port=port)
    if "udp" in kinds:
        for ex in target.l4.udp:
            expect = bytes.fromhex(ex.expect_hex) if ex.expect_hex is not None else None
            yield (f"udp:{ex.port}", "udp",
                   l4.UdpParams(host=target.address, port=ex.port,
                                send=bytes.fromhex(ex.send_hex), expect_prefix=expect))
    if target.l4.icmp and "icmp" in kinds:
        yield "icmp", "icmp", l4.IcmpParams(host=target.address)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _params_builder(kinds: list[CheckKind[Any]]) -> Callable[..., Any] | None:
    for kind in kinds:
        module = sys.modules.get(getattr(kind.run, "__module__", ""))
        builder = getattr(module, "params_from_target", None)
        if callable(builder):
            return builder  # type: ignore[no-any-return]
    return None


def _protocol_checks(target: Target, protocol: str, kinds: dict[str, CheckKind[Any]],
                     base_dir: Path, state_dir: Path) -> Iterable[tuple[str, str, Any]]:
    ours = [k for name, k in sorted(kinds.items()) if name.startswith(f"{protocol}.")]
    if not ours:
        _warn_once(f"plan: no {protocol} check kinds registered; skipping {protocol} checks")
        return
    builder = _params_builder(ours)
    if builder is None:
        yield from _by_convention(target, protocol, ours, base_dir, state_dir)
        return
    try:
        if "state_dir" in inspect.signature(builder).parameters:
            built = builder(target, base_dir, state_dir=state_dir)
        else:
            built = builder(target, base_dir)
    except (ValueError, OSError) as exc:
        log.warning("plan: node=%s protocol=%s skipped: %s", target.id, protocol, exc)
        return
    for kind in ours:
        params = built.get(kind.name) if isinstance(built, dict) else built
        if params is not None and isinstance(params, kind.params_type):
            yield kind.name, kind.name, params


# deepest level first-to-last: a section's ``level`` runs the kinds up to and including it
_LEVELS = {"openvpn": ("reset", "tls", "session", "tunnel")}


def _by_convention(target: Target, protocol: str, kinds: list[CheckKind[Any]], base_dir: Path,
                   state_dir: Path) -> Iterable[tuple[str, str, Any]]:
    """Params for a protocol module without ``params_from_target``, by naming convention.

    The params struct gets ``host`` = the target address plus every field of the config section
    it has under the same name (``*_file`` paths resolved against the config directory; a
    ``state_file`` field goes to the agent's state dir). Session-level kinds that need an
    in-tunnel address run only when the section names one.
    """
    section = getattr(target, protocol)
    raw: dict[str, Any] = msgspec.to_builtins(section)
    for name, value in raw.items():
        if name.endswith("_file") and isinstance(value, str):
            raw[name] = str(resolve_path(value, base_dir))
    raw["host"] = target.address
    raw["state_file"] = str(state_dir / f"{protocol}-state.json")
    levels = _LEVELS.get(protocol)
    level = raw.get("level")
    for kind in kinds:
        fields = getattr(kind.params_type, "__struct_fields__", None)
        if fields is None:
            continue
        suffix = kind.name.split(".", 1)[1]
        if levels and level in levels and suffix in levels and (
                levels.index(suffix) > levels.index(level)):
            continue
        if suffix == "session" and "canary" in fields and not raw.get("canary"):
            continue  # a WireGuard session needs tunnel_address + canary
        try:
            params = msgspec.convert({k: v for k, v in raw.items() if k in fields},
                                     kind.params_type)
        except msgspec.ValidationError as exc:
            log.warning("plan: node=%s check=%s skipped: %s", target.id, kind.name, exc)
            continue
        yield kind.name, kind.name, params


def plan_target(target: Target, base_dir: Path, state_dir: Path,
                kinds: dict[str, CheckKind[Any]] | None = None) -> list[PlannedCheck]:
    kinds = all_kinds() if kinds is None else kinds
    found: list[tuple[str, str, Any]] = list(_l4_checks(target, kinds))
    for protocol in PROTOCOLS:
        if getattr(target, protocol) is not None:
            found.extend(_protocol_checks(target, protocol, kinds, base_dir, state_dir))
    return [PlannedCheck(target.id, target.pool, target.pop, target.region, check, kinds[kind],
                         params, kinds[kind].tier)
            for check, kind, params in found if _wanted(target, check, kind)]


def plan(config: AgentConfig, base_dir: Path,
         kinds: dict[str, CheckKind[Any]] | None = None) -> list[PlannedCheck]:
    """Every check of every target, in config order."""
    state_dir = Path(config.agent.state_dir)
    if not state_dir.is_absolute():
        state_dir = base_dir / state_dir
    out: list[PlannedCheck] = []
    for target in config.targets:
        out.extend(plan_target(target, base_dir, state_dir, kinds))
    return out
