"""The reference receiver: signature checks, de-duplication, per-node order, persistence, and a
webhook chain mesh-outbox -> receiver -> real HAProxy in the lab."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
from aiohttp import ClientSession, web
from prometheus_client import CollectorRegistry

from probes.lab.haproxy import Backend
from probes.lab.topology import Lab
from probes.mesh.publish.delivery import DeliveryLoop, RetryPolicy
from probes.mesh.publish.envelope import encode_envelope
from probes.mesh.publish.metrics import PublisherMetrics
from probes.mesh.publish.outbox import MemoryOutbox
from probes.mesh.publish.receiver import build_receiver_app, load_receiver_config
from probes.mesh.publish.runtime_api import parse_servers_state
from probes.mesh.publish.webhook import WebhookPublisher
from probes.model import Verdict, VerdictState, signing
from probes.model.signing import write_key_file
from tests.publish.helpers import KEY

pytestmark = pytest.mark.publish


def write_config(tmp: Path, extra: str = "") -> Path:
    write_key_file(tmp / "hook.key", KEY)
    cfg = tmp / "receiver.yaml"
    cfg.write_text("listen: 127.0.0.1:9490\nkeys:\n  - {key_id: k1, key_file: hook.key}\n"
                   "state_file: state.json\nreconcile_interval: 0.2\n" + extra)
    return cfg


class Client:
    def __init__(self, session: ClientSession, url: str) -> None:
        self.session, self.url = session, url
        self.pub = WebhookPublisher("t", url, KEY, "k1")

    async def post(self, verdict: Verdict, *, key: bytes = KEY, key_id: str = "k1",
                   ts: float | None = None,
                   body: bytes | None = None) -> tuple[int, dict[str, str]]:
        body = encode_envelope(verdict) if body is None else body
        timestamp = signing.format_timestamp(time.time() if ts is None else ts)
        headers = {"Content-Type": "application/json", signing.HEADER_KEY_ID: key_id,
                   signing.HEADER_TIMESTAMP: timestamp,
                   signing.HEADER_SIGNATURE: signing.sign(key, timestamp, body)}
        async with self.session.post(self.url, data=body, headers=headers) as resp:
            return resp.status, await resp.json()


async def start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def v(node: str, seq: int, state: VerdictState = VerdictState.DOWN) -> Verdict:
    return Verdict(node=node, state=state, previous=VerdictState.UP, seq=seq,
                   decided_at=time.time())


async def test_verifies_deduplicates_orders_and_persists(tmp_path: Path) -> None:
    cfg, base = load_receiver_config(write_config(tmp_path))
    app, receiver = build_receiver_app(cfg, base)
    runner, url = await start(app)
    async with ClientSession() as session:
        c = Client(session, url + cfg.path)
        assert (await c.post(v("n1", 1), key=b"x" * 32))[0] == 401  # forged
        assert (await c.post(v("n1", 1), key_id="nobody"))[0] == 401
        assert (await c.post(v("n1", 1), ts=time.time() - 3600))[0] == 401  # stale
        status, answer = await c.post(v("n1", 1), body=b'{"schema": 1}')
        assert status == 400 and answer["field"].startswith("$")
        assert await c.post(v("n1", 1)) == (200, {"status": "applied", "key": "n1:1"})
        assert (await c.post(v("n1", 1)))[1]["status"] == "duplicate"
        assert (await c.post(v("n1", 3, VerdictState.UP)))[1]["status"] == "applied"
        # an older verdict arriving late never overwrites a newer one
        assert (await c.post(v("n1", 2)))[1]["status"] == "duplicate"
        assert (await c.post(v("n2", 1)))[1]["status"] == "applied"
        async with session.get(url + "/v1/state") as resp:
            assert await resp.json() == {"n1": {"seq": 3, "state": "UP"},
                                         "n2": {"seq": 1, "state": "DOWN"}}
    await runner.cleanup()
    assert receiver.registry.get_sample_value("tunnelwatch_receiver_sequence_gaps_total") == 1

    # a restarted receiver remembers what it applied
    app, _ = build_receiver_app(cfg, base)
    runner, url = await start(app)
    async with ClientSession() as session:
        c = Client(session, url + cfg.path)
        assert (await c.post(v("n1", 3)))[1]["status"] == "duplicate"
        assert (await c.post(v("n1", 4)))[1]["status"] == "applied"
    await runner.cleanup()


async def test_receiver_orders_by_epoch_then_seq(tmp_path: Path) -> None:
    """A newer epoch (the mesh's store was reset or restored) is newer whatever its seq; an
    older epoch's verdict arriving late is a duplicate; a gap is only a gap within an epoch."""
    cfg, base = load_receiver_config(write_config(tmp_path))
    app, receiver = build_receiver_app(cfg, base)
    runner, url = await start(app)

    def e(epoch: int, seq: int, state: VerdictState) -> Verdict:
        return msgspec.structs.replace(v("n1", seq, state), epoch=epoch)

    async with ClientSession() as session:
        c = Client(session, url + cfg.path)
        assert (await c.post(e(100, 5, VerdictState.DOWN)))[1]["status"] == "applied"
        status, answer = await c.post(e(200, 1, VerdictState.UP))
        assert (status, answer) == (200, {"status": "applied", "key": "n1:200:1"})
        assert (await c.post(e(100, 6, VerdictState.DOWN)))[1]["status"] == "duplicate"
        assert (await c.post(e(200, 2, VerdictState.DOWN)))[1]["status"] == "applied"
    await runner.cleanup()
    assert receiver.ledger.latest["n1"].order == (200, 2)
    registry = receiver.registry
    assert registry.get_sample_value("tunnelwatch_receiver_epoch_changes_total") == 1
    assert registry.get_sample_value("tunnelwatch_receiver_sequence_gaps_total") == 0


@pytest.mark.parametrize(("extra", "path"), [
    ("haproxy: {name: lb, down_action: sideways, socket: /x}\n", "$.haproxy.down_action"),
    ("haproxy: {name: lb}\n", "$.haproxy"),
    ("haproxy: {name: lb, address: 'nope'}\n", "$.haproxy.address"),
    ("haproxy: {name: lb, socket: /x, servers: {n1: 'a/b/c'}}\n", "$.haproxy.servers.n1"),
    ("listen: localhost\n", "$.listen"),
    ("surprise: 1\n", "$.surprise"),  # the unknown key at its own path
])
def test_bad_configs_name_the_field(tmp_path: Path, extra: str, path: str) -> None:
    from probes.config import ConfigError

    cfg = write_config(tmp_path, extra)
    text = cfg.read_text()
    if extra.startswith("listen:"):
        text = text.replace("listen: 127.0.0.1:9490\n", "")
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_receiver_config(cfg)
    assert any(p.path == path for p in err.value.problems), err.value


def test_cli_checks_config(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    ok = subprocess.run([sys.executable, "-m", "probes.cli", "receiver", "--config", str(cfg),
                         "--check"], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    cfg.write_text(cfg.read_text() + "haproxy: {name: lb}\n")
    bad = subprocess.run([sys.executable, "-m", "probes.cli", "receiver", "--config", str(cfg)],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "$.haproxy" in bad.stderr


@pytest.mark.lab
async def test_webhook_chain_to_real_haproxy_survives_its_restart(lab: Lab, tmp_path: Path) -> None:
    host = lab.add_host("lb")
    nodes = ["node1", "node2", "node3"]
    hap = lab.start_haproxy(host, servers=[Backend(n, f"10.99.0.{i + 1}", 51820)
                                           for i, n in enumerate(nodes)])
    cfg, base = load_receiver_config(write_config(
        tmp_path, f"haproxy: {{name: lb, socket: {hap.runtime_socket}, backend: vpn}}\n"))
    app, receiver = build_receiver_app(cfg, base)
    runner, url = await start(app)
    outbox = MemoryOutbox()
    loop = DeliveryLoop(WebhookPublisher("hook", url + cfg.path, KEY, "k1"), outbox,
                        PublisherMetrics(CollectorRegistry()),
                        RetryPolicy(initial_backoff=0.05, max_backoff=0.3, poll_interval=0.02),
                        rng=random.Random(3))
    task = asyncio.create_task(loop.run())
    script = [("node1", VerdictState.DOWN), ("node2", VerdictState.DRAINING),
              ("node1", VerdictState.UP), ("node3", VerdictState.MAINTENANCE),
              ("node1", VerdictState.DOWN)]
    seqs: dict[str, int] = {}
    for i, (node, state) in enumerate(script):
        seqs[node] = seqs.get(node, 0) + 1
        outbox.append(v(node, seqs[node], state))
        loop.notify()
        if i == 2:
            hap.stop()  # receiver answers 503 until HAProxy is back; the mesh retries
            await asyncio.sleep(0.5)
            hap.start()

    def admin() -> dict[str, str]:
        rows = parse_servers_state(hap.command("show servers state vpn"))
        return {s: r.admin for (_, s), r in rows.items()}

    want = {"node1": "maint", "node2": "drain", "node3": "maint"}
    deadline = time.monotonic() + 60
    while (outbox.positions.get("hook", 0) < len(script) or admin() != want) \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    loop.stop()
    await task
    await runner.cleanup()
    assert admin() == want
    assert outbox.positions["hook"] == len(script)
    assert receiver.registry.get_sample_value("tunnelwatch_receiver_requests_total",
                                              {"outcome": "unavailable"}) >= 1
    assert receiver.registry.get_sample_value("tunnelwatch_receiver_requests_total",
                                              {"outcome": "applied"}) == len(script)
