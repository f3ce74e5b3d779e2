"""Poison input (issue #17, item 2): one valid-looking observation must never stop the mesh.

Every number on the wire is bounded (seq and batch_seq in 63 bits, durations >= 0, ratios in
[0, 1], times in a sane window), duplicate JSON keys are refused, and whatever reaches the store
cannot leave a transaction open. The property test at the end feeds hypothesis-generated extreme
values through ingest, snapshot, restart and replay.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.mesh.config import load_mesh_config
from probes.mesh.replay import replay
from probes.mesh.service import MeshService
from probes.mesh.snapshot import dump_engine
from probes.mesh.store import AgentPosition, EntryKind, JournalEntry, StoreError
from probes.mesh.store_sqlite import SQLiteStore
from probes.model import (
    MAX_SECONDS,
    MAX_SEQ,
    MAX_WALL_TIME,
    Observation,
    ObservationBatch,
    Quality,
    Reason,
    decode_batch,
    encode,
    within_bounds,
)
from tests.mesh.apptest import NOW, Mesh, mesh_app

pytestmark = pytest.mark.mesh


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async with mesh_app(tmp_path) as m:
        yield m


def _batch_dict(mesh: Mesh, seq: int = 1) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(mesh.body("va", seq, {"n0": True, "n1": False}))
    data["observations"][0].update(
        phases={"connect": 0.01}, quality={"sent": 3, "received": 3, "rtt_p50_seconds": 0.01}
    )
    return data


async def test_a_huge_observation_seq_is_refused_and_snapshots_keep_working(mesh: Mesh) -> None:
    data = _batch_dict(mesh)
    data["observations"][0]["seq"] = 2**70
    before = mesh.stored()
    status, reply = await mesh.post("va", json.dumps(data).encode())
    assert (status, reply["error"], reply["field"]) == (400, "schema", "$.observations[0].seq")
    assert mesh.stored() == before
    dump_engine(mesh.service.engine)  # what every snapshot, shutdown and restart does


async def test_a_huge_batch_seq_is_refused_and_leaves_no_transaction_open(mesh: Mesh) -> None:
    data = _batch_dict(mesh)
    data["batch_seq"] = 2**64
    status, reply = await mesh.post("va", json.dumps(data).encode())
    assert (status, reply.get("field")) == (400, "$.batch_seq")
    status, reply = await mesh.post("va", mesh.body("va", 1, {"n0": True}))
    assert (status, reply) == (200, {"accepted": True, "verdicts": 0,
                                     "accepts": ["traces", "epoch", "columnar"]})


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("observations", 0, "duration_seconds"), -0.5),
        (("observations", 0, "duration_seconds"), MAX_SECONDS * 2),
        (("observations", 0, "quality", "loss_ratio"), 7),
        (("observations", 0, "quality", "loss_ratio"), -0.1),
        (("observations", 0, "quality", "rtt_p50_seconds"), -1),
        (("observations", 0, "quality", "sent"), -3),
        (("observations", 0, "phases", "connect"), -0.01),
        (("observations", 0, "wall_time"), 1e300),
        (("observations", 0, "wall_time"), -1.0),
        (("observations", 0, "seq"), -1),
        (("observations", 0, "node"), "n" * 1000),
        (("sent_at",), 1e300),
        (("batch_seq",), -1),
    ],
)
async def test_out_of_range_values_are_refused_naming_the_field(
    mesh: Mesh, path: tuple[str | int, ...], value: object
) -> None:
    data = _batch_dict(mesh)
    target: Any = data
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    before = mesh.stored()
    status, reply = await mesh.post("va", json.dumps(data).encode())
    where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
    assert (status, reply["error"]) == (400, "schema"), reply
    assert reply["field"] == (where.rsplit(".", 1)[0] + "[...]" if "phases" in path else where)
    assert mesh.stored() == before


@pytest.mark.parametrize(
    ("needle", "doubled", "field"),
    [
        (b'"ok":false', b'"ok":true,"ok":false', "$.observations[1].ok"),
        (b'"batch_seq":1', b'"batch_seq":1,"batch_seq":1', "$.batch_seq"),
        (b'"connect":0.01', b'"connect":0.01,"connect":0.5', "$.observations[0].phases.connect"),
    ],
)
async def test_duplicate_keys_are_refused(
    mesh: Mesh, needle: bytes, doubled: bytes, field: str
) -> None:
    body = msgspec.json.encode(_batch_dict(mesh))
    assert needle in body
    before = mesh.stored()
    status, reply = await mesh.post("va", body.replace(needle, doubled, 1))
    assert (status, reply["error"], reply["field"]) == (400, "schema", field)
    assert "duplicate key" in reply["detail"]
    assert mesh.stored() == before
    # the same content without duplicates, formatted by another encoder, is taken
    status, _ = await mesh.post("va", json.dumps(_batch_dict(mesh), indent=1).encode())
    assert status == 200


def test_every_store_write_error_rolls_back(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "m.db")
    with pytest.raises(StoreError):  # the driver refuses a value beyond 64 bits
        store.commit(JournalEntry(EntryKind.TICK, 1.0), [], AgentPosition("va", 2**64))
    assert not store._db.in_transaction
    store.commit(JournalEntry(EntryKind.TICK, 2.0), [], AgentPosition("va", 1))
    for call in (lambda: store.ack("p", 2**64), lambda: store.prune_journal(2**64),
                 lambda: store.verdicts(after=2**64)):
        with pytest.raises(StoreError):
            call()
        assert not store._db.in_transaction
    store.commit(JournalEntry(EntryKind.TICK, 3.0), [])
    assert [e.now for e in store.recover().entries] == [2.0, 3.0]
    store.close()


def test_within_bounds_clamps_what_an_agent_measured() -> None:
    odd = Observation(node="n" * 300, check="c", vantage="v", seq=-5, wall_time=-1.0, ok=True,
                      reason=Reason.OK, duration_seconds=float("inf"),
                      phases={f"p{i}": -1.0 for i in range(40)},
                      quality=Quality(sent=2, received=3, loss_ratio=-0.5, rtt_p50_seconds=-1e-6),
                      detail="x" * 5000)
    clean = within_bounds(odd)
    batch = ObservationBatch(version=1, agent="v", batch_seq=1, sent_at=1.0, observations=[clean])
    assert decode_batch(encode(batch)).observations[0] == clean
    assert clean.quality is not None and clean.quality.loss_ratio == 0.0
    assert clean.duration_seconds == MAX_SECONDS and len(clean.phases) == 32


# ---- the property: extreme values through ingest, snapshot, restart and replay --------------

_seqs = st.one_of(st.sampled_from([0, 1, MAX_SEQ - 1, MAX_SEQ, MAX_SEQ + 1, 2**64, 2**70, -1]),
                  st.integers(0, MAX_SEQ))
_seconds = st.one_of(st.sampled_from([0.0, 5e-324, MAX_SECONDS, MAX_SECONDS * 1.01, -0.0, -1e-9,
                                      1e300]),
                     st.floats(0, MAX_SECONDS))
_ratios = st.one_of(st.sampled_from([0.0, 1.0, 1.0000001, -1e-12, 7.0]), st.floats(0, 1))
_times = st.one_of(st.sampled_from([NOW, NOW - 600, 0.0, MAX_WALL_TIME, MAX_WALL_TIME * 2,
                                    -1.0, 1e300]),
                   st.floats(NOW - 10, NOW + 10))
_names = st.one_of(st.sampled_from(["n0", "n1", "n9", "", "ü" * 256, "n" * 257]),
                   st.text(max_size=12))


@st.composite
def _observation(draw: st.DrawFn) -> dict[str, Any]:
    item: dict[str, Any] = {
        "node": draw(_names), "check": draw(st.sampled_from(["wg", "tcp", "c" * 256])),
        "vantage": "va", "seq": draw(_seqs), "wall_time": draw(_times), "ok": draw(st.booleans()),
        "reason": draw(st.sampled_from([r.value for r in Reason])),
        "duration_seconds": draw(_seconds),
    }
    if draw(st.booleans()):
        item["phases"] = {"connect": draw(_seconds)}
    if draw(st.booleans()):
        item["quality"] = {"sent": draw(st.sampled_from([0, 3, 2**31 - 1, 2**31, -1])),
                           "received": 0, "loss_ratio": draw(_ratios),
                           "rtt_p99_seconds": draw(_seconds)}
    return item


def _valid(observation: dict[str, Any]) -> bool:
    try:
        msgspec.convert(observation, Observation)
    except msgspec.ValidationError:
        return False
    return True


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batches=st.lists(st.tuples(_seqs, st.lists(_observation(), min_size=1, max_size=4)),
                        min_size=1, max_size=4))
def test_extreme_values_survive_ingest_snapshot_restart_and_replay(
    tmp_path_factory: pytest.TempPathFactory, batches: list[tuple[int, list[dict[str, Any]]]]
) -> None:
    asyncio.run(_through_the_mesh(tmp_path_factory.mktemp("mesh"), batches))


async def _through_the_mesh(folder: Path, batches: list[tuple[int, list[dict[str, Any]]]]) -> None:
    accepted: list[bytes] = []
    crashed = folder / "crashed"
    async with mesh_app(folder, extra="max_body_bytes: 65536\n") as mesh:
        last = -1
        for batch_seq, observations in batches:
            data = {"version": 1, "agent": "va", "batch_seq": batch_seq, "sent_at": NOW,
                    "observations": observations}
            body = json.dumps(data).encode()
            valid = 0 <= batch_seq <= MAX_SEQ and all(_valid(o) for o in observations)
            status, reply = await mesh.post("va", body)
            if not valid:
                assert (status, reply["error"]) == (400, "schema"), reply
            elif batch_seq <= last:
                assert status == 409
            else:
                assert status == 200, reply
                accepted.append(body)
                last = batch_seq
            mesh.now += 1.0
        before = dump_engine(mesh.service.engine)
        # a copy of the files as a crash would leave them: no final snapshot, journal replayed
        crashed.mkdir()
        for name in ("mesh.db", "mesh.db-wal", "mesh.db.snapshot", "mesh.db.snapshot-wal"):
            if (folder / name).exists():
                shutil.copy(folder / name, crashed / name)
    cfg = load_mesh_config(folder / "mesh.yaml")
    # the app's shutdown took a snapshot; a restart loads it and continues where it stood
    async with mesh_app(folder) as again:
        assert dump_engine(again.service.engine) == before
        assert again.service.store.recover().agents == ({"va": (0, last)} if accepted else {})
    after_crash = MeshService(SQLiteStore(crashed / "mesh.db"), cfg.decision, cfg.node_infos())
    assert dump_engine(after_crash.engine) == before
    await after_crash.close()
    # an offline replay of what was accepted runs, and decides the same twice
    stream = [o for body in accepted for o in decode_batch(body).observations]
    first = encode(list(replay(cfg.decision, cfg.node_infos(), stream)))
    assert encode(list(replay(cfg.decision, cfg.node_infos(), stream))) == first
