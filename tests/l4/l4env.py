"""Shared by the L4 tests: the lab environment wrapper and the test servers' ports."""

from __future__ import annotations

from pathlib import Path

from tests.labenv import AgentLab

SERVERS = Path(__file__).with_name("servers.py")
TCP_PORT, UDP_PORT = 7001, 7002


class L4Lab(AgentLab):
    """The node runs the TCP/UDP test servers (SERVERS) on TCP_PORT and UDP_PORT."""


