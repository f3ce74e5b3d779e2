"""Weight publishing: the weight loop (latest per node, retry with merge, reconcile on start and
after failures), the webhook's weights envelope, and the reference receiver applying weights
to a real HAProxy (lab)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from prometheus_client import CollectorRegistry

from probes.lab.haproxy import Backend
from probes.lab.topology import Lab
from probes.mesh.publish.base import Publisher, RetryableError
from probes.mesh.publish.delivery import RetryPolicy
from probes.mesh.publish.envelope import decode_any, decode_weights, encode_weights
from probes.mesh.publish.receiver import build_receiver_app, load_receiver_config
from probes.mesh.publish.runtime_api import parse_servers_state
from probes.mesh.publish.webhook import WebhookPublisher
from probes.mesh.publish.weightloop import WeightLoop, WeightMetrics
from probes.model import SchemaError, Verdict, VerdictState, WeightChange
from tests.publish.helpers import KEY
from tests.publish.test_receiver import start, write_config

pytestmark = pytest.mark.publish

FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, poll_interval=0.01)


def w(node: str, weight: int, seq: int, state: VerdictState = VerdictState.UP) -> WeightChange:
    return WeightChange(node=node, weight=weight, previous=None, seq=seq,
                        decided_at=time.time(), state=state)


class Recorder(Publisher):
    """Records deliveries; fails the first ``failures`` calls (a destination that is down).
    Only the loop's behaviour is under test here; real destinations are in the lab tests."""

    supports_weights = True

    def __init__(self, failures: int = 0) -> None:
        self.name = "rec"
        self.failures = failures
        self.batches: list[list[tuple[str, int]]] = []
        self.reconciled: list[dict[str, int]] = []

    async def deliver(self, verdict: Verdict) -> None:
        raise NotImplementedError

    async def deliver_weights(self, changes: Sequence[WeightChange]) -> None:
        if self.failures:
            self.failures -= 1
            raise RetryableError("down")
        self.batches.append([(c.node, c.weight) for c in changes])

    async def reconcile_weights(self, current: Mapping[str, WeightChange]) -> int:
        self.reconciled.append({n: c.weight for n, c in current.items()})
        return len(current)


async def until(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_latest_per_node_wins_and_failures_merge_and_reconcile() -> None:
    current = {"n1": w("n1", 100, 1)}
    rec = Recorder(failures=1)
    loop = WeightLoop(rec, lambda: current, WeightMetrics(CollectorRegistry()), FAST)
    task = asyncio.create_task(loop.run())
    await until(lambda: rec.reconciled)  # on start: the engine's current weights
    assert rec.reconciled[0] == {"n1": 100}
    loop.notify([w("n1", 80, 2), w("n2", 50, 1), w("n1", 60, 3)])  # n1: only the newest
    # the first attempt fails; n1 moves again meanwhile: the retry carries the newer one
    await asyncio.sleep(0)
    loop.notify([w("n1", 40, 4)])
    await until(lambda: rec.batches)
    assert sorted(rec.batches[0]) == [("n1", 40), ("n2", 50)]
    assert len(rec.reconciled) == 2  # a failure makes the loop reconcile again before retrying
    loop.stop()
    await task


async def test_webhook_weights_body_and_receiver_dedup(tmp_path: Path) -> None:
    changes = [w("n1", 75, 3), w("n2", 0, 9, VerdictState.DRAINING)]
    key, body = encode_weights(changes)
    env = decode_weights(body)
    assert env.idempotency_key == key and env.weights == changes
    assert decode_any(body) == env
    with pytest.raises(SchemaError) as err:
        decode_weights(body.replace(b'"weight":75', b'"weight":"x"'))
    assert err.value.path == "$.weights[0].weight"
    with pytest.raises(SchemaError, match="idempotency_key"):
        decode_weights(body.replace(key.encode(), b"weights:forged"))

    cfg, base = load_receiver_config(write_config(tmp_path))
    app, receiver = build_receiver_app(cfg, base)
    runner, url = await start(app)
    pub = WebhookPublisher("hook", url + cfg.path, KEY, "k1")
    try:
        await pub.deliver_weights(changes)
        assert {n: c.weight for n, c in receiver.weights.items()} == {"n1": 75, "n2": 0}
        await pub.deliver_weights([w("n1", 50, 2)])  # older than what it has: not applied
        assert receiver.weights["n1"].weight == 75
        await pub.reconcile_weights({"n1": w("n1", 60, 4)})
        assert receiver.weights["n1"].weight == 60
        async with ClientSession() as session, session.get(url + "/v1/state") as resp:
            assert resp.status == 200
    finally:
        await pub.close()
        await runner.cleanup()


@pytest.mark.lab
async def test_receiver_applies_weights_to_its_haproxy(lab: Lab, tmp_path: Path) -> None:
    host = lab.add_host("lb")
    hap = lab.start_haproxy(host, servers=[Backend(n, f"10.99.0.{i}", 51820, "weight 20")
                                           for i, n in enumerate(("n1", "n2"), start=1)])
    cfg, base = load_receiver_config(write_config(
        tmp_path, f"haproxy: {{name: lb, socket: {hap.runtime_socket}}}\n"))
    app, _receiver = build_receiver_app(cfg, base)
    runner, url = await start(app)
    pub = WebhookPublisher("hook", url + cfg.path, KEY, "k1")

    def weights() -> dict[str, int]:
        rows = parse_servers_state(hap.command("show servers state vpn"))
        return {server: row.user_weight for (_, server), row in rows.items()}

    try:
        await pub.deliver_weights([w("n1", 25, 1), w("n2", 100, 1)])
        assert weights() == {"n1": 5, "n2": 20}
        # a verdict applied by the receiver keeps the weight it holds, not 100 %
        verdict = Verdict(node="n1", state=VerdictState.UP, previous=VerdictState.DOWN, seq=1,
                          decided_at=time.time())
        await pub.deliver(verdict)
        assert weights()["n1"] == 5
    finally:
        await pub.close()
        await runner.cleanup()
