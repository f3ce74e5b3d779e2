"""Test helpers: verdict streams and a webhook sink that can fail on purpose."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

from probes.mesh.publish.envelope import decode_envelope
from probes.model import Verdict, VerdictState, signing

KEY = b"0123456789abcdef0123456789abcdef"


def verdict_stream(nodes: list[str], per_node: int,
                   start: float | None = None) -> Iterator[Verdict]:
    """Interleaved verdict changes: node seq 1..per_node, alternating DOWN/UP."""
    t = time.time() if start is None else start
    last = {n: VerdictState.UNKNOWN for n in nodes}
    for seq in range(1, per_node + 1):
        for n in nodes:
            state = VerdictState.DOWN if seq % 2 else VerdictState.UP
            yield Verdict(node=n, state=state, previous=last[n], seq=seq, decided_at=t, pool="p")
            last[n] = state
            t += 0.001


@dataclass
class Sink:
    """Records every accepted delivery; answers ``failing_status`` (500) while ``failing_until``
    is in the future."""

    failing_until: float = 0.0
    failing_status: int = 500
    received: list[tuple[str, int]] = field(default_factory=list)  # (node, seq), in arrival order
    keys: list[str] = field(default_factory=list)
    rejected: int = 0
    bad_signatures: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ts = request.headers.get(signing.HEADER_TIMESTAMP, "")
        sig = request.headers.get(signing.HEADER_SIGNATURE, "")
        if not signing.verify(KEY, ts, body, sig):
            self.bad_signatures += 1
            return web.Response(status=401)
        if time.monotonic() < self.failing_until:
            self.rejected += 1
            return web.Response(status=self.failing_status, text="down for the test")
        env = decode_envelope(body)
        assert request.headers["Idempotency-Key"] == env.idempotency_key
        self.received.append((env.verdict.node, env.verdict.seq))
        self.keys.append(env.idempotency_key)
        return web.Response(status=204)


@asynccontextmanager
async def running_sink(sink: Sink) -> AsyncIterator[Sink]:
    app = web.Application()
    app.router.add_post("/hook", sink.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sink.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield sink
    finally:
        await runner.cleanup()
