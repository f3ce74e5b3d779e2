"""Every check family, in one list: the agent's planner, ``tunnelwatch probe``, the documentation
and the tests read it from here. Adding a protocol is one module with its :class:`Family` plus
one line below; its kinds' tiers reach the mesh with every observation."""

from __future__ import annotations

from typing import Any

from probes.checks import ikev2, l4, mtu, openvpn, quic, telemetry, user_path, wireguard
from probes.checks.base import CheckKind, Family

# in planning order: a node's checks are planned (and listed) family by family
FAMILIES: tuple[Family, ...] = (
    l4.FAMILY,
    wireguard.FAMILY,
    openvpn.FAMILY,
    ikev2.FAMILY,
    quic.FAMILY,
    mtu.FAMILY,
    telemetry.FAMILY,
    user_path.FAMILY,
)


def kinds_of(families: tuple[Family, ...]) -> dict[str, CheckKind[Any]]:
    """Every kind of ``families`` by name; a name declared twice is an error."""
    out: dict[str, CheckKind[Any]] = {}
    for family in families:
        for kind in family.kinds:
            if out.setdefault(kind.name, kind) is not kind:
                raise ValueError(f"check kind {kind.name!r} declared twice")
    return out


KINDS: dict[str, CheckKind[Any]] = kinds_of(FAMILIES)


def kind(name: str) -> CheckKind[Any]:
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown check kind {name!r}; known: {', '.join(sorted(KINDS))}") from None
