"""The ``store:`` config section (errors name the field) and the publishing gate."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from probes.config import ConfigError
from probes.mesh.config import load_mesh_config
from probes.mesh.publish.base import Publisher, RetryableError
from probes.mesh.publish.config import RetryConfig, WebhookConfig
from probes.mesh.publish.outbox import MemoryOutbox
from probes.mesh.publish.runner import GatedPublisher, Publishing
from probes.model import Verdict, VerdictState, signing

pytestmark = pytest.mark.ha


def write(tmp_path: Path, store: str) -> Path:
    signing.write_key_file(tmp_path / "va.key", signing.generate_key())
    path = tmp_path / "mesh.yaml"
    path.write_text("agents:\n  - {name: va, key_file: va.key}\nnodes:\n  - {id: n0}\n"
                    f"store:\n{store}")
    return path


def test_an_etcd_store_section_loads(tmp_path: Path) -> None:
    cfg = load_mesh_config(write(tmp_path, "  type: etcd\n  endpoints: ['http://e1:2379']\n"
                                           "  replica: m1\n  lease_ttl_seconds: 6\n"))
    assert cfg.store.type == "etcd" and cfg.store.replica_name == "m1"
    assert cfg.store.lease_ttl_seconds == 6 and cfg.store.clock_margin_seconds == 2.0


@pytest.mark.parametrize(("store", "path"), [
    ("  type: zookeeper\n", "$.store.type"),
    ("  type: etcd\n", "$.store.endpoints"),
    ("  type: etcd\n  endpoints: ['e1:2379']\n", "$.store.endpoints[0]"),
    ("  type: etcd\n  endpoints: ['http://e1:2379']\n  prefix: ''\n", "$.store.prefix"),
    ("  type: etcd\n  endpoints: ['http://e1:2379']\n  lease_ttl_seconds: 1\n",
     "$.store.lease_ttl_seconds"),
    ("  type: etcd\n  endpoints: ['http://e1:2379']\n  clock_margin_seconds: 10\n",
     "$.store.clock_margin_seconds"),
])
def test_store_errors_name_the_field(tmp_path: Path, store: str, path: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_mesh_config(write(tmp_path, store))
    assert any(p.path == path for p in err.value.problems), err.value


class Recording(Publisher):
    def __init__(self) -> None:
        self.name = "rec"
        self.got: list[str] = []

    async def deliver(self, verdict: Verdict) -> None:
        self.got.append(verdict.idempotency_key)


VERDICT = Verdict(node="n0", state=VerdictState.DOWN, previous=VerdictState.UP, seq=1,
                  decided_at=1.0)


async def test_a_closed_gate_refuses_delivery() -> None:
    open_ = [False]
    inner = Recording()
    gated = GatedPublisher(inner, lambda: open_[0])
    with pytest.raises(RetryableError, match="fenced"):
        await gated.deliver(VERDICT)
    open_[0] = True
    await gated.deliver(VERDICT)
    assert inner.got == ["n0:1"]


async def test_publishing_starts_and_stops_with_leadership(tmp_path: Path) -> None:
    signing.write_key_file(tmp_path / "hook.key", b"k" * 32)
    config = WebhookConfig(name="hook", url="http://127.0.0.1:1/", key_id="k",
                           key_file=str(tmp_path / "hook.key"),
                           retry=RetryConfig(poll_interval=0.01))
    outbox = MemoryOutbox()
    publishing = Publishing([config], outbox, CollectorRegistry(), gate=lambda: True)
    assert publishing._tasks == []  # nothing runs before leadership
    # each flip is a task (it waits for the loops to wind down): wait for it, not a fixed 50 ms,
    # which a loaded machine may spend before the loops have stopped
    publishing.set_active(True)
    await publishing._transition
    await asyncio.sleep(0.05)  # the loop keeps running (against a refusing endpoint)
    assert len(publishing._tasks) == 1 and not publishing._tasks[0].done()
    first_loop = publishing.loops[0]
    publishing.set_active(False)
    await publishing._transition
    assert publishing._tasks == []
    publishing.set_active(True)  # leadership again: fresh loops from the shared positions
    await publishing._transition
    assert publishing.loops[0] is not first_loop and len(publishing._tasks) == 1
    await publishing.stop()
