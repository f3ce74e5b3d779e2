"""Every check family, in one list: the agent's planner, ``tunnelwatch probe``, the documentation
and the tests read it from here. Adding a protocol is one module with its :class:`Family` plus
one entry below; its kinds' tiers reach the mesh with every observation.

A family's module is imported when it is first needed, not when the registry is: an agent whose
targets have no ``quic:`` section never loads aioquic, one without ``ikev2:`` never loads the
IKEv2 core and its cryptography (their imports are most of an agent's fixed memory). Every
entry names the config section its family plans from; a family plans nothing for a target
without that section, so the planner loads only the families its targets use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from probes.checks.base import CheckKind, Family
    from probes.config import Target


@dataclass(frozen=True, slots=True)
class Listed:
    """One family of the registry, not yet imported."""

    name: str  # its config section (the family's name)
    used_by: Callable[[Target], bool]  # whether a target has that section
    load: Callable[[], Family]  # imports the family's module (once: the import system caches)


def _l4() -> Family:
    from probes.checks import l4  # noqa: PLC0415 - loaded when first needed (module docstring)

    return l4.FAMILY


def _wireguard() -> Family:
    from probes.checks import wireguard  # noqa: PLC0415

    return wireguard.FAMILY


def _openvpn() -> Family:
    from probes.checks import openvpn  # noqa: PLC0415

    return openvpn.FAMILY


def _openvpn_policy() -> Family:
    from probes.checks import openvpn_policy  # noqa: PLC0415

    return openvpn_policy.FAMILY


def _ikev2() -> Family:
    from probes.checks import ikev2  # noqa: PLC0415

    return ikev2.FAMILY


def _quic() -> Family:
    from probes.checks import quic  # noqa: PLC0415

    return quic.FAMILY


def _mtu() -> Family:
    from probes.checks import mtu  # noqa: PLC0415

    return mtu.FAMILY


def _telemetry() -> Family:
    from probes.checks import telemetry  # noqa: PLC0415

    return telemetry.FAMILY


def _user_path() -> Family:
    from probes.checks import user_path  # noqa: PLC0415

    return user_path.FAMILY


# in planning order: a node's checks are planned (and listed) family by family
LISTED: tuple[Listed, ...] = (
    Listed("l4", lambda t: t.l4 is not None, _l4),
    Listed("wireguard", lambda t: t.wireguard is not None, _wireguard),
    Listed("openvpn", lambda t: t.openvpn is not None, _openvpn),
    # the openvpn section's policy scan (its probe subclasses the openvpn family's)
    Listed("openvpn", lambda t: t.openvpn is not None, _openvpn_policy),
    Listed("ikev2", lambda t: t.ikev2 is not None, _ikev2),
    Listed("quic", lambda t: t.quic is not None, _quic),
    Listed("mtu", lambda t: t.mtu is not None, _mtu),
    Listed("telemetry", lambda t: t.telemetry is not None, _telemetry),
    Listed("user_path", lambda t: t.user_path is not None, _user_path),
)


def families(target: Target | None = None) -> tuple[Family, ...]:
    """Every family (each module loaded), or only those ``target`` has a section for."""
    out = []
    for entry in LISTED:
        if target is None or entry.used_by(target):
            family = entry.load()
            if family.name != entry.name:
                raise ValueError(f"registry entry {entry.name!r} loads family {family.name!r}")
            out.append(family)
    return tuple(out)


def kinds_of(families: tuple[Family, ...]) -> dict[str, CheckKind[Any]]:
    """Every kind of ``families`` by name; a name declared twice is an error."""
    out: dict[str, CheckKind[Any]] = {}
    for family in families:
        for kind in family.kinds:
            if out.setdefault(kind.name, kind) is not kind:
                raise ValueError(f"check kind {kind.name!r} declared twice")
    return out


def all_kinds() -> dict[str, CheckKind[Any]]:
    """Every kind of every family (loads them all: the CLI, the docs, the tests)."""
    return kinds_of(families())


def kind(name: str) -> CheckKind[Any]:
    known = all_kinds()
    try:
        return known[name]
    except KeyError:
        raise KeyError(f"unknown check kind {name!r}; known: {', '.join(sorted(known))}") from None
