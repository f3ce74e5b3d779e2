"""The asyncio shell against tiny misbehaving servers on 127.0.0.1 (no lab, no root)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from probes.checks.openvpn import Level, OpenVPNParams, run_level
from probes.model import Reason
from tests.openvpn.pki import static_key_text

pytestmark = pytest.mark.openvpn


class _Garbage(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(b"\x40" + b"\x00" * 13, addr)  # a plain server reset


async def _udp_garbage_probe(key_file: str) -> tuple[Reason, str]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_Garbage, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        params = OpenVPNParams(host="127.0.0.1", port=port, tls_crypt_file=key_file)
        result = await run_level(params, 0.5, Level.RESET)
    finally:
        transport.close()
    return result.reason, result.detail


def test_unauthenticated_answer_is_bad_packet(tmp_path: Path) -> None:
    # well-formed but unwrapped: with tls-crypt configured it cannot authenticate
    key = tmp_path / "tc.key"
    key.write_text(static_key_text(bytes(range(256))))
    reason, detail = asyncio.run(_udp_garbage_probe(str(key)))
    assert reason == Reason.BAD_PACKET, detail


def test_udp_silence_is_reset_ignored() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as quiet:
        quiet.bind(("127.0.0.1", 0))
        params = OpenVPNParams(host="127.0.0.1", port=quiet.getsockname()[1])
        result = asyncio.run(run_level(params, 0.3, Level.RESET))
    assert (result.ok, result.reason) == (False, Reason.RESET_IGNORED)


async def _tcp_probe(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                       Awaitable[None]]) -> Reason:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        params = OpenVPNParams(host="127.0.0.1", port=port, proto="tcp")
        return (await run_level(params, 0.5, Level.RESET)).reason
    finally:
        server.close()
        await server.wait_closed()


async def _close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(2)
    writer.close()


async def _zero_frame(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(2)
    writer.write(b"\x00\x00")
    await writer.drain()
    await asyncio.sleep(1)
    writer.close()


def test_tcp_close_without_reset_is_reset_ignored() -> None:
    assert asyncio.run(_tcp_probe(_close_at_once)) == Reason.RESET_IGNORED


def test_tcp_broken_framing_is_bad_packet() -> None:
    assert asyncio.run(_tcp_probe(_zero_frame)) == Reason.BAD_PACKET


def test_tcp_refused() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    params = OpenVPNParams(host="127.0.0.1", port=port, proto="tcp")
    assert asyncio.run(run_level(params, 0.5, Level.RESET)).reason == Reason.REFUSED
