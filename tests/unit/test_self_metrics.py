"""Agent and mesh say what they are and how they are doing: process and platform collectors,
``tunnelwatch_build_info``, and whether the config in use came from the last (re)load."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp

from probes import __version__
from probes.agent.runtime import Agent
from tests.agent.helpers import FAST_L4, free_port, l4_target, write_config
from tests.mesh.apptest import mesh_app

SELF = ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
        "process_start_time_seconds", "python_info", "python_gc_collections_total")


def _value(text: str, name: str) -> float:
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert match, f"{name} missing"
    return float(match.group(1))


def _has_self_metrics(text: str, role: str) -> None:
    for name in SELF:
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    assert ('tunnelwatch_build_info{python="' in text
            and f'role="{role}",version="{__version__}"}} 1.0' in text), text[-3000:]


async def test_agent_self_metrics_and_reload_outcome(tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    targets = [l4_target("node-a", free_port())]
    cfg = write_config(tmp_path / "agent.yaml", listen=addr, tiers=FAST_L4, targets=targets)
    agent = Agent(cfg)
    await agent.start()
    try:
        async with aiohttp.ClientSession(f"http://{addr}") as s:
            async def metrics() -> str:
                async with s.get("/metrics") as r:
                    assert r.status == 200
                    return await r.text()

            text = await metrics()
            _has_self_metrics(text, "agent")
            assert _value(text, "tunnelwatch_config_last_reload_successful") == 1
            loaded = _value(text, "tunnelwatch_config_last_reload_success_timestamp_seconds")
            assert loaded > 1.7e9
            cfg.write_text("agent: [not, a, mapping]\n")
            async with s.post("/-/reload") as r:
                assert r.status == 400
            text = await metrics()
            assert _value(text, "tunnelwatch_config_last_reload_successful") == 0
            assert _value(text, "tunnelwatch_config_last_reload_success_timestamp_seconds") == (
                loaded)
            write_config(cfg, listen=addr, tiers=FAST_L4, targets=targets)
            async with s.post("/-/reload") as r:
                assert r.status == 200
            text = await metrics()
            assert _value(text, "tunnelwatch_config_last_reload_successful") == 1
            assert _value(text, "tunnelwatch_config_last_reload_success_timestamp_seconds") >= (
                loaded)
    finally:
        await agent.stop(drain_timeout=0)


async def test_mesh_self_metrics(tmp_path: Path) -> None:
    async with mesh_app(tmp_path) as mesh:
        text = await (await mesh.client.get("/metrics")).text()
    _has_self_metrics(text, "mesh")
    assert _value(text, "tunnelwatch_config_last_reload_successful") == 1
    assert _value(text, "tunnelwatch_config_last_reload_success_timestamp_seconds") > 1.7e9
