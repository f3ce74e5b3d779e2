"""Shared by the L4 tests: the lab environment wrapper and the test servers' ports."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
SERVERS = Path(__file__).with_name("servers.py")
TCP_PORT, UDP_PORT = 7001, 7002


@dataclass
class L4Lab:
    lab: Any
    node: Any
    agent: Any

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine with its sockets inside the agent's namespace."""
        with self.agent.entered():
            return asyncio.run(coro)


