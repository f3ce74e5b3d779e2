"""Webhook delivery through the loop: outage then recovery, order, no gaps, dead letters."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from probes.mesh.publish.base import PermanentError, Publisher, RetryableError
from probes.mesh.publish.delivery import DeliveryLoop, RetryPolicy
from probes.mesh.publish.envelope import decode_envelope, encode_envelope
from probes.mesh.publish.metrics import PublisherMetrics
from probes.mesh.publish.outbox import MemoryOutbox
from probes.mesh.publish.webhook import WebhookPublisher
from probes.model import SchemaError, Verdict, VerdictState, signing
from tests.publish.helpers import KEY, Sink, running_sink, verdict_stream

pytestmark = pytest.mark.publish

NODES = ["node-a", "node-b", "node-c"]


def value(registry: CollectorRegistry, name: str, publisher: str) -> float:
    got = registry.get_sample_value(name, {"publisher": publisher})
    return 0.0 if got is None else got


def assert_complete_in_order(received: list[tuple[str, int]], per_node: int) -> None:
    by_node: dict[str, list[int]] = defaultdict(list)
    for node, seq in received:
        by_node[node].append(seq)
    for node in NODES:
        seqs = by_node[node]
        assert seqs == sorted(seqs), f"{node} out of order: {seqs}"
        assert sorted(set(seqs)) == list(range(1, per_node + 1)), f"{node} has gaps: {seqs}"


async def run_outage(outage: float, per_node: int = 6) -> None:
    registry = CollectorRegistry()
    metrics = PublisherMetrics(registry)
    outbox = MemoryOutbox()
    policy = RetryPolicy(initial_backoff=0.05, max_backoff=1.0, dead_letter_after=outage * 4 + 30,
                         poll_interval=0.02)
    async with running_sink(Sink(failing_until=time.monotonic() + outage)) as sink:
        pub = WebhookPublisher("hook", sink.url, KEY, "k1")
        loop = DeliveryLoop(pub, outbox, metrics, policy, rng=random.Random(7))
        task = asyncio.create_task(loop.run())
        stream = list(verdict_stream(NODES, per_node))
        # verdicts keep coming while the receiver is down
        for i, v in enumerate(stream):
            outbox.append(v)
            loop.notify()
            if i % 3 == 0:
                await asyncio.sleep(outage / len(stream))
        deadline = time.monotonic() + outage + 30
        while len(sink.received) < len(stream) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        loop.stop()
        await task
    assert sink.rejected > 0, "the outage never hit a delivery"
    assert sink.bad_signatures == 0
    assert len(sink.received) == len(stream)  # exactly once here: nothing crashed
    assert_complete_in_order(sink.received, per_node)
    assert value(registry, "tunnelwatch_publisher_delivered_total", "hook") == len(stream)
    assert value(registry, "tunnelwatch_publisher_retries_total", "hook") >= 1
    assert value(registry, "tunnelwatch_publisher_dead_lettered_total", "hook") == 0
    assert value(registry, "tunnelwatch_publisher_lag_seconds", "hook") == 0
    assert outbox.positions["hook"] == len(stream)


async def test_receiver_500_then_recovers_short() -> None:
    await run_outage(outage=3.0)


@pytest.mark.slow
async def test_receiver_500_for_60s_then_recovers() -> None:
    await run_outage(outage=60.0, per_node=10)


class Flaky(Publisher):
    """Fails in scripted ways; records what it accepted."""

    def __init__(self, fail: dict[str, type[Exception]]) -> None:
        self.name = "flaky"
        self.fail = fail
        self.accepted: list[str] = []

    async def deliver(self, verdict: Verdict) -> None:
        error = self.fail.get(verdict.idempotency_key)
        if error is not None:
            raise error("scripted")
        self.accepted.append(verdict.idempotency_key)


async def drain(loop: DeliveryLoop, outbox: MemoryOutbox, total: int,
                timeout: float = 10) -> None:
    task = asyncio.create_task(loop.run())
    deadline = time.monotonic() + timeout
    while outbox.positions.get(loop.name, 0) < total and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    loop.stop()
    await task


async def test_permanent_error_dead_letters_at_once_and_moves_on(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    outbox = MemoryOutbox()
    for v in verdict_stream(["n"], 3):
        outbox.append(v)
    pub = Flaky({"n:2": PermanentError})
    dlq = tmp_path / "dead.jsonl"
    loop = DeliveryLoop(pub, outbox, PublisherMetrics(registry),
                        RetryPolicy(poll_interval=0.01), dead_letter_file=dlq)
    await drain(loop, outbox, 3)
    assert pub.accepted == ["n:1", "n:3"]
    assert value(registry, "tunnelwatch_publisher_dead_lettered_total", "flaky") == 1
    record = json.loads(dlq.read_text())
    assert record["verdict"]["seq"] == 2 and record["why"].startswith("permanent")


async def test_retryable_error_dead_letters_after_configured_time() -> None:
    registry = CollectorRegistry()
    outbox = MemoryOutbox()
    for v in verdict_stream(["n"], 2):
        outbox.append(v)
    pub = Flaky({"n:1": RetryableError})
    loop = DeliveryLoop(pub, outbox, PublisherMetrics(registry),
                        RetryPolicy(initial_backoff=0.01, max_backoff=0.05,
                                    dead_letter_after=0.3, poll_interval=0.01))
    await drain(loop, outbox, 2)
    assert pub.accepted == ["n:2"]
    assert value(registry, "tunnelwatch_publisher_retries_total", "flaky") >= 2
    assert value(registry, "tunnelwatch_publisher_dead_lettered_total", "flaky") == 1


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=8.0, multiplier=2.0, jitter=0.5)
    rng = random.Random(1)
    for attempt, ceiling in enumerate([1, 2, 4, 8, 8, 8]):
        waits = [policy.backoff(attempt, rng) for _ in range(200)]
        assert all(ceiling * 0.5 <= w <= ceiling for w in waits)
        assert max(waits) - min(waits) > ceiling * 0.3  # jitter actually spreads them


@pytest.mark.parametrize(("status", "outcome"), [
    (200, None), (204, None), (409, None), (500, RetryableError), (503, RetryableError),
    (429, RetryableError), (408, RetryableError), (400, PermanentError), (422, PermanentError),
    # refusals a receiver gives while it rotates keys or is redeployed: retried (issue #17)
    (401, RetryableError), (403, RetryableError), (404, RetryableError), (410, RetryableError),
    (307, RetryableError), (301, RetryableError),
])
async def test_status_classification(status: int, outcome: type[Exception] | None) -> None:
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
    pub = WebhookPublisher("w", url, KEY, "k")
    verdict = next(verdict_stream(["n"], 1))
    try:
        if outcome is None:
            await pub.deliver(verdict)
        else:
            with pytest.raises(outcome):
                await pub.deliver(verdict)
    finally:
        await pub.close()
        await runner.cleanup()


async def test_unreachable_receiver_is_retryable() -> None:
    pub = WebhookPublisher("w", "http://127.0.0.1:9/", KEY, "k", timeout=1.0)
    with pytest.raises(RetryableError):
        await pub.deliver(next(verdict_stream(["n"], 1)))
    await pub.close()


def test_headers_verify_with_signing_module_and_body_is_stable() -> None:
    verdict = Verdict(node="n1", state=VerdictState.DOWN, previous=VerdictState.UP, seq=4,
                      decided_at=1.0)
    pub = WebhookPublisher("w", "http://x/", KEY, "k1", clock=lambda: 1764134400.0)
    body = encode_envelope(verdict)
    assert body == encode_envelope(verdict)
    headers = pub.headers(verdict, body)
    assert headers["Idempotency-Key"] == "n1:4"
    assert signing.verify(KEY, headers[signing.HEADER_TIMESTAMP], body,
                          headers[signing.HEADER_SIGNATURE])
    assert not signing.verify(KEY, headers[signing.HEADER_TIMESTAMP], body + b" ",
                              headers[signing.HEADER_SIGNATURE])
    env = decode_envelope(body)
    assert env.verdict == verdict and env.schema_version == 2


@pytest.mark.parametrize(("body", "path"), [
    (b'{"schema":"x","schema_version":1,"idempotency_key":"n:1","verdict":{}}', "$.verdict"),
    (b"not json", "$"),
])
def test_bad_envelopes_name_the_field(body: bytes, path: str) -> None:
    with pytest.raises(SchemaError) as err:
        decode_envelope(body)
    assert err.value.path.startswith(path)


def test_envelope_rejects_unknown_version_and_mismatched_key() -> None:
    verdict = Verdict(node="n1", state=VerdictState.UP, previous=VerdictState.DOWN, seq=2,
                      decided_at=1.0)
    doc = json.loads(encode_envelope(verdict))
    doc["schema_version"] = 3
    with pytest.raises(SchemaError) as err:
        decode_envelope(json.dumps(doc).encode())
    assert err.value.path == "$.schema_version"
    doc["schema_version"] = 1  # an older mesh's body (no epoch) is still read
    doc["idempotency_key"] = "n1:3"
    with pytest.raises(SchemaError) as err:
        decode_envelope(json.dumps(doc).encode())
    assert err.value.path == "$.idempotency_key"


class BrittleOutbox(MemoryOutbox):
    """Fails the first read and the first acknowledgement, like a store that hiccups."""

    def __init__(self) -> None:
        super().__init__()
        self.read_failures = 1
        self.ack_failures = 1

    async def outbox(self, publisher: str, limit: int = 100) -> list:  # type: ignore[type-arg]
        if self.read_failures:
            self.read_failures -= 1
            raise RuntimeError("store busy")
        return await super().outbox(publisher, limit)

    async def ack(self, publisher: str, position: int) -> None:
        if self.ack_failures:
            self.ack_failures -= 1
            raise RuntimeError("store busy")
        await super().ack(publisher, position)


async def test_store_hiccups_cost_a_duplicate_never_a_verdict() -> None:
    outbox = BrittleOutbox()
    for v in verdict_stream(["n"], 3):
        outbox.append(v)
    pub = Flaky({})
    registry = CollectorRegistry()
    loop = DeliveryLoop(pub, outbox, PublisherMetrics(registry), RetryPolicy(poll_interval=0.01))
    task = asyncio.create_task(loop.run())
    deadline = time.monotonic() + 60
    while outbox.positions.get("flaky", 0) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    loop.stop()
    await task
    assert pub.accepted == ["n:1", "n:1", "n:2", "n:3"]  # the unacknowledged one came again


@pytest.mark.parametrize("status", [401, 403, 404, 410])
async def test_a_short_refusal_window_loses_no_verdict(status: int) -> None:
    """Issue #17 item 7: a receiver rotating its key answers 401 for a few seconds; those
    verdicts must be retried with backoff, not dead-lettered at once (4 were lost for good)."""
    registry = CollectorRegistry()
    outbox = MemoryOutbox()
    stream = list(verdict_stream(NODES, 3))
    for v in stream:
        outbox.append(v)
    policy = RetryPolicy(initial_backoff=0.05, max_backoff=0.5, dead_letter_after=30,
                         poll_interval=0.02)
    sink = Sink(failing_until=time.monotonic() + 1.5, failing_status=status)
    async with running_sink(sink):
        loop = DeliveryLoop(WebhookPublisher("hook", sink.url, KEY, "k1"), outbox,
                            PublisherMetrics(registry), policy, rng=random.Random(3))
        await drain(loop, outbox, len(stream), timeout=30)
    assert sink.rejected > 0
    assert value(registry, "tunnelwatch_publisher_dead_lettered_total", "hook") == 0
    assert_complete_in_order(sink.received, 3)


async def test_a_redirect_is_never_followed() -> None:
    """Issue #17 item 9: a 307 from the webhook target was followed to another port and
    counted as delivered. A redirect is not a delivery: retried (and in the end
    dead-lettered), never followed."""
    from aiohttp import web

    async with running_sink(Sink()) as elsewhere:
        async def redirect(request: web.Request) -> web.Response:
            raise web.HTTPTemporaryRedirect(elsewhere.url)

        app = web.Application()
        app.router.add_post("/", redirect)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        pub = WebhookPublisher("w", f"http://127.0.0.1:{runner.addresses[0][1]}/", KEY, "k")
        try:
            with pytest.raises(RetryableError, match="307"):
                await pub.deliver(next(verdict_stream(["n"], 1)))
        finally:
            await pub.close()
            await runner.cleanup()
        assert elsewhere.received == []
