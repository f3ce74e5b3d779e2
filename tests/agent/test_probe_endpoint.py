"""/probe as blackbox_exporter users write it: target=<address> with module=<check kind or
protocol> (node ids keep working), distinct 400s for an unknown module and a bad target, and
debug=true answering the probe's log and result as text. Real TCP servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from probes.agent.runtime import Agent

from .helpers import FAST_L4, free_port, l4_target, write_config

pytestmark = pytest.mark.agent


@pytest.fixture
async def servers() -> AsyncIterator[tuple[int, int]]:
    """Two listening TCP ports: one a configured node's, one nobody configured."""
    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    configured = await asyncio.start_server(accept, "127.0.0.1", 0)
    other = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield configured.sockets[0].getsockname()[1], other.sockets[0].getsockname()[1]
    configured.close()
    other.close()


async def test_probe_takes_addresses_and_modules_like_blackbox(
        tmp_path: Path, servers: tuple[int, int]) -> None:
    port, other = servers
    addr = f"127.0.0.1:{free_port()}"
    cfg = write_config(tmp_path / "agent.yaml", listen=addr, tiers=FAST_L4,
                       targets=[l4_target("node-a", port)])
    agent = Agent(cfg)
    await agent.start()
    try:
        async with aiohttp.ClientSession(f"http://{addr}") as s:
            async def probe(**params: str) -> tuple[int, str]:
                async with s.get("/probe", params=params) as r:
                    return r.status, await r.text()

            for target, module in (("node-a", "tcp"), ("node-a", f"tcp:{port}"),
                                   (f"127.0.0.1:{port}", "tcp"),  # the configured node's
                                   (f"127.0.0.1:{other}", "tcp")):  # an address alone
                status, text = await probe(target=target, module=module)
                assert status == 200 and "probe_success 1.0" in text, (target, module, text)
            status, text = await probe(target=f"127.0.0.1:{free_port()}", module="tcp")
            assert status == 200 and "probe_success 0.0" in text
            assert 'probe_failure_reason{reason="refused"} 1.0' in text
            # an unknown module and a bad target are told apart
            status, text = await probe(target=f"127.0.0.1:{port}", module="tcp_connect")
            assert status == 400 and text.startswith("Unknown module 'tcp_connect'")
            status, text = await probe(target="not a host!", module="tcp")
            assert status == 400 and text.startswith("Bad target 'not a host!'")
            status, text = await probe(target="127.0.0.1", module="tcp")  # node-a's address
            assert status == 200 and "probe_success 1.0" in text
            status, text = await probe(target="127.0.0.2", module="tcp")  # no node, no port
            assert status == 400 and "Bad target '127.0.0.2' for module 'tcp'" in text
            status, text = await probe(target="192.0.2.7:51820", module="wireguard")
            assert status == 400 and "Bad target" in text  # no keys for a bare address
            status, text = await probe(module="tcp")
            assert status == 400 and "Target parameter is missing" in text
            # debug=true: the log, the metrics and the check, as text
            status, text = await probe(target=f"127.0.0.1:{other}", module="tcp", debug="true")
            assert status == 200, text
            assert text.startswith("Logs for the probe:\nBeginning probe: target=127.0.0.1:")
            assert "Probe succeeded after" in text and "phase connect:" in text
            assert "Metrics that would have been returned:\n" in text
            assert "probe_success 1.0" in text
            assert f"Module configuration:\ntcp (address 127.0.0.1:{other}):" in text
            assert f'"port": {other}' in text
    finally:
        await agent.stop(drain_timeout=0)
