"""A real Prometheus scrapes the agent's /metrics, and /probe through blackbox relabeling."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from probes.agent.runtime import Agent

from .helpers import FAST_L4, free_port, l4_target, until, write_config

pytestmark = [pytest.mark.agent,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="prometheus binary not installed")]


def prometheus_config(agent_addr: str) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
        "scrape_configs": [
            {"job_name": "agent", "static_configs": [{"targets": [agent_addr]}]},
            {   # the standard blackbox_exporter multi-target relabeling, unchanged
                "job_name": "blackbox", "metrics_path": "/probe",
                "params": {"module": ["tcp"]},
                "static_configs": [{"targets": ["node-a", "node-b"]}],
                "relabel_configs": [
                    {"source_labels": ["__address__"], "target_label": "__param_target"},
                    {"source_labels": ["__param_target"], "target_label": "instance"},
                    {"target_label": "__address__", "replacement": agent_addr},
                ],
            },
        ],
    }


async def _query(session: aiohttp.ClientSession, base: str, q: str) -> list[dict[str, Any]]:
    try:
        async with session.get(f"{base}/api/v1/query", params={"query": q}) as resp:
            if resp.status != 200:
                return []
            data = await resp.json()
    except aiohttp.ClientError:  # not listening yet
        return []
    return list(data.get("data", {}).get("result", []))


async def test_prometheus_scrapes_metrics_and_blackbox_probe(tmp_path: Path) -> None:
    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    open_port = server.sockets[0].getsockname()[1]
    agent_addr = f"127.0.0.1:{free_port()}"
    cfg = write_config(tmp_path / "agent.yaml", listen=agent_addr, tiers=FAST_L4,
                       targets=[l4_target("node-a", open_port),
                                l4_target("node-b", free_port())])  # nothing listens: refused
    agent = Agent(cfg)
    await agent.start()
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    (prom_dir / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(agent_addr)))
    base = f"http://127.0.0.1:{free_port()}"
    log = (prom_dir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={prom_dir / 'prometheus.yml'}",
         f"--storage.tsdb.path={prom_dir / 'data'}",
         f"--web.listen-address={base.removeprefix('http://')}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=prom_dir)
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        async with aiohttp.ClientSession() as session:
            queries = {
                "up": "up == 1",
                "ok": 'probe_success{job="blackbox",instance="node-a"} == 1',
                "down": 'probe_success{job="blackbox",instance="node-b"} == 0',
                "reason": 'probe_failure_reason{instance="node-b",reason="refused"} == 1',
                "connect": 'probe_phase_duration_seconds{instance="node-a",phase="connect"}',
                "attempts": 'tunnelwatch_probe_attempts_total{job="agent",node="node-a",'
                            f'check="tcp:{open_port}",vantage="test-vantage"}} > 0',
                "failures": 'tunnelwatch_probe_failures_total{node="node-b",reason="refused"} > 0',
                "slo_bucket": 'tunnelwatch_probe_duration_seconds_bucket{pool="pool-a",le="0.15"}'
                              " > 0",
                "lag": "tunnelwatch_scheduler_lag_seconds_count > 0",
            }

            async def poll() -> None:
                while True:
                    for name, q in queries.items():
                        results[name] = await _query(session, base, q)
                    if len(results["up"]) == 3 and all(results.values()):
                        return
                    if proc.poll() is not None:
                        raise AssertionError("prometheus exited; see its log")
                    await asyncio.sleep(0.5)

            await asyncio.wait_for(poll(), 90)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                await asyncio.to_thread(proc.wait)
        log.close()
        await agent.stop(drain_timeout=0)
        server.close()
    assert {r["metric"]["job"] for r in results["up"]} == {"agent", "blackbox"}
    for name in ("ok", "down", "reason", "connect", "attempts", "failures", "slo_bucket"):
        assert results[name], name


async def test_metrics_endpoints_directly(tmp_path: Path) -> None:
    """/healthz, /probe errors like blackbox (400), POST /-/reload picks up a new target; a
    reload that would remove more than half of the running checks is refused unless forced."""
    agent_addr = f"127.0.0.1:{free_port()}"
    port_a = free_port()
    cfg = write_config(tmp_path / "agent.yaml", listen=agent_addr, tiers=FAST_L4,
                       targets=[l4_target("node-a", port_a)])
    agent = Agent(cfg)
    await agent.start()
    try:
        async with aiohttp.ClientSession(f"http://{agent_addr}") as s:
            async with s.get("/healthz") as r:
                assert r.status == 200 and (await r.json())["checks"] == 1
            async with s.get("/probe", params={"module": "tcp"}) as r:
                assert r.status == 400
            async with s.get("/probe", params={"target": "nope", "module": "tcp"}) as r:
                assert r.status == 400
            write_config(cfg, listen=agent_addr, tiers=FAST_L4,
                         targets=[l4_target("node-a", port_a), l4_target("node-c", 2)])
            async with s.post("/-/reload") as r:
                assert r.status == 200, await r.text()
            # node-a's port changes: one of the two running checks would go (half: allowed)
            write_config(cfg, listen=agent_addr, tiers=FAST_L4,
                         targets=[l4_target("node-a", 1), l4_target("node-c", 2)])
            async with s.post("/-/reload") as r:
                assert r.status == 200, await r.text()
            # node-a renamed and node-c dropped: both running checks would go: refused
            write_config(cfg, listen=agent_addr, tiers=FAST_L4,
                         targets=[{**l4_target("node-a", 1), "id": "node-b"}])
            async with s.post("/-/reload") as r:
                text = await r.text()
                assert r.status == 400 and "would remove 2 of the 2 running checks" in text
            assert {c.node for c in agent.checks} == {"node-a", "node-c"}
            write_config(cfg, listen=agent_addr, tiers=FAST_L4,
                         targets=[l4_target("node-a", 1), l4_target("node-c", 2)])
            async with s.get("/probe", params={"target": "node-c", "module": "tcp:2"}) as r:
                text = await r.text()
                assert r.status == 200 and "probe_success 0.0" in text
            cfg.write_text("agent: [not, a, mapping]\n")
            async with s.post("/-/reload") as r:
                assert r.status == 400  # refused; the running config stays
            await until(lambda: agent.probe_stats.series.get(
                ("node-c", "pool-a", "pop-1", "eu", "tcp:2")) is not None, 10, "node-c series")
            async with s.get("/metrics") as r:
                assert 'node="node-c"' in await r.text()
    finally:
        await agent.stop(drain_timeout=0)


async def test_a_reload_removing_most_checks_needs_force(tmp_path: Path) -> None:
    agent_addr = f"127.0.0.1:{free_port()}"
    ports = [free_port() for _ in range(4)]
    targets = [l4_target(f"node-{i}", port) for i, port in enumerate(ports)]
    cfg = write_config(tmp_path / "agent.yaml", listen=agent_addr, tiers=FAST_L4,
                       targets=targets)
    agent = Agent(cfg)
    await agent.start()
    try:
        async with aiohttp.ClientSession(f"http://{agent_addr}") as s:
            write_config(cfg, listen=agent_addr, tiers=FAST_L4, targets=targets[:1])
            async with s.post("/-/reload") as r:
                text = await r.text()
                assert r.status == 400 and "would remove 3 of the 4 running checks" in text
                assert "force" in text
            assert len(agent.checks) == 4
            async with s.post("/-/reload", params={"force": "true"}) as r:
                assert r.status == 200, await r.text()
            assert [c.node for c in agent.checks] == ["node-0"]
    finally:
        await agent.stop(drain_timeout=0)
