"""Asyncio check runners that drive a protocol core over real sockets.

Each module registers its check kinds with :func:`probes.checks.base.register` when imported;
:func:`load_all` imports every module listed in ``CHECK_MODULES``.
"""

from __future__ import annotations

import importlib

CHECK_MODULES: tuple[str, ...] = (
    "l4",
    "wireguard",
    "openvpn",
    "ikev2",
    "quic",
    "mtu",
    "telemetry",
    "load",
)

_loaded = False


def load_all() -> None:
    global _loaded  # noqa: PLW0603 - import-once latch
    if _loaded:
        return
    _loaded = True
    for name in CHECK_MODULES:
        importlib.import_module(f"probes.checks.{name}")
