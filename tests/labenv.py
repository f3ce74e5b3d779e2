"""Shared by the lab tests: a lab with a node host, and an agent host the probes run in."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class AgentLab:
    lab: Any
    node: Any
    agent: Any

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine with its sockets inside the agent's namespace."""
        with self.agent.entered():
            return asyncio.run(coro)
