"""Asyncio check runners that drive a protocol core over real sockets.

Each protocol module declares its check kinds and how they are planned in one
:class:`probes.checks.base.Family`; :mod:`probes.checks.registry` lists the families.
"""
