"""Helpers for agent tests: free ports, config files, polling, a signed-batch receiver."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from probes.model import SchemaError, signing
from probes.model.columnar import is_columnar, whole_batch


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, *, listen: str, targets: list[dict[str, Any]],
                 tiers: dict[str, Any] | None = None, mesh: dict[str, Any] | None = None,
                 vantage: str = "test-vantage") -> Path:
    doc: dict[str, Any] = {"agent": {"vantage": vantage, "listen": listen,
                                     "state_dir": str(path.parent / "state")},
                           "targets": targets}
    if tiers:
        doc["tiers"] = tiers
    if mesh:
        doc["mesh"] = mesh
    path.write_text(yaml.safe_dump(doc))
    return path


def l4_target(node: str, port: int) -> dict[str, Any]:
    return {"id": node, "pool": "pool-a", "pop": "pop-1", "region": "eu",
            "address": "127.0.0.1", "l4": {"tcp_ports": [port]}}


FAST_L4 = {"l4": {"interval": 0.2, "timeout": 0.15, "fast_interval": 0.1}}


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}") from None


@dataclass
class Receiver:
    """A stand-in for the mesh ingest: verifies signatures, rejects replays (409), records seqs.

    ``lose_answers`` accepted batches get a 503 although they were kept, as if the answer was
    lost on the way back: the agent must retry and be told 409, not deliver twice.
    """

    key: bytes
    agent: str
    lose_answers: int = 0
    seqs: list[int] = field(default_factory=list)
    checks: set[str] = field(default_factory=set)  # every check name that was reported
    last_batch_seq: int = -1
    last_epoch: int = 0
    bad_signatures: int = 0
    replays: int = 0
    # "columnar": whether its answers list it ("takes" / "refuses": listed, yet every columnar
    # body answered 400, as by a mesh downgraded since) and the formats of the bodies it got
    columnar: str = "no"
    formats: list[str] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ts = request.headers.get(signing.HEADER_TIMESTAMP, "")
        sig = request.headers.get(signing.HEADER_SIGNATURE, "")
        if (request.headers.get(signing.HEADER_AGENT) != self.agent
                or not signing.verify(self.key, ts, body, sig)):
            self.bad_signatures += 1
            return web.Response(status=401, text="bad-signature")
        self.formats.append("columnar" if is_columnar(body) else "json")
        if self.columnar == "refuses" and is_columnar(body):
            return web.Response(status=400, text="columnar: not taken")
        try:
            batch = whole_batch(body)
        except SchemaError as exc:
            return web.Response(status=400, text=str(exc))
        if (batch.epoch, batch.batch_seq) <= (self.last_epoch, self.last_batch_seq):
            self.replays += 1  # answered as the mesh does: with the agent's position
            return web.json_response({"error": "replay", "epoch": self.last_epoch,
                                      "batch_seq": self.last_batch_seq}, status=409)
        self.last_epoch, self.last_batch_seq = batch.epoch, batch.batch_seq
        self.seqs.extend(o.seq for o in batch.observations)
        self.checks.update(o.check for o in batch.observations)
        if self.lose_answers > 0:
            self.lose_answers -= 1
            return web.Response(status=503, text="answer lost")
        accepts = ["epoch", "columnar"] if self.columnar != "no" else ["epoch"]
        return web.json_response({"accepted": len(batch.observations), "accepts": accepts})

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_post("/v1/batches", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


NODE_LABELS = {"node": "n1", "pool": "pool-a", "pop": "pop-1", "region": "eu", "vantage": "v1"}


def exported(kind: Any, result: Any) -> Any:
    """The agent's Prometheus registry after one run of ``kind`` with ``result`` for node
    ``n1`` from vantage ``v1`` (labels: :data:`NODE_LABELS` and ``check`` = the kind's name)."""
    from probes.agent.metrics import AgentCollector, ProbeStats, new_registry
    from probes.agent.plan import PlannedCheck
    from probes.agent.scheduler import ProbeRun, SchedulerStats

    check = PlannedCheck(node="n1", pool="pool-a", pop="pop-1", region="eu", check=kind.name,
                         kind=kind, params=None, tier=kind.tier)
    stats = ProbeStats()
    stats.record(ProbeRun(check, result, 0.0, 1.0, 1.0, "round"))
    return new_registry(AgentCollector("v1", stats, SchedulerStats, None))
