"""Traces over the signed report channel: the mesh's ingest (identity, schema errors naming the
field), the service (verdicts republished with evidence that came later, restart and crash
replay keep the paths), and the agent's reporter against a new mesh, an old one, and one that
refuses traces: observations are never lost for them."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from probes.agent.metrics import ReporterStats
from probes.agent.reporter import Reporter
from probes.mesh.config import load_mesh_config
from probes.mesh.paths import PathPolicy
from probes.mesh.policy import DampingPolicy, DecisionPolicy
from probes.mesh.server import SERVICE_KEY, build_app
from probes.mesh.service import MeshService
from probes.mesh.store_sqlite import SQLiteStore
from probes.model import (
    Observation,
    ObservationBatch,
    PathTrace,
    Reason,
    VerdictState,
    encode,
    signing,
)
from probes.paths.asn import AsnTable
from tests.agent.helpers import free_port, until
from tests.mesh.apptest import mesh_app
from tests.mesh.helpers import fleet, obs, write_mesh_config
from tests.paths.test_localise import A_PATH, flow, trace

pytestmark = [pytest.mark.paths, pytest.mark.mesh]

TABLE = AsnTable([("10.1.0.0/16", 64501), ("10.10.0.0/16", 64510), ("10.20.0.0/16", 64520)],
                 {64501: "provider-a", 64510: "transit-1"})


def failing_trace(vantage: str, node: str = "n0") -> PathTrace:
    return trace(vantage, True, flow(A_PATH[:2]), node=node)


def batch(agent: str, seq: int, at: float, results: dict[str, bool],
          traces: list[PathTrace] | None = None) -> ObservationBatch:
    return ObservationBatch(version=1, agent=agent, batch_seq=seq, sent_at=at,
                            observations=[obs(n, agent, ok, at=at) for n, ok in results.items()],
                            traces=traces or [])


# ------------------------------------------------------------------------------ ingest


async def test_ingest_takes_traces_and_names_bad_fields(tmp_path: Path) -> None:
    async with mesh_app(tmp_path, extra="max_body_bytes: 65536\n") as mesh:
        good = encode(batch("va", 1, mesh.now, {"n0": True}, [failing_trace("va")]))
        status, reply = await mesh.post("va", good)
        assert status == 200 and reply["accepts"] == ["traces", "epoch", "columnar"]
        view = mesh.service.paths.node_view("n0", mesh.now)
        assert view["vantages"]["va"]["failing"] is True

        def posted(data: dict[str, Any], seq: int) -> bytes:
            data["batch_seq"] = seq
            return json.dumps(data).encode()

        base = msgspec.to_builtins(batch("va", 2, mesh.now, {}, [failing_trace("vb")]))
        status, reply = await mesh.post("va", posted(base, 2))
        assert (status, reply["error"], reply["field"]) == (403, "identity",
                                                             "$.traces[0].vantage")
        bad_addr = msgspec.to_builtins(batch("va", 2, mesh.now, {}, [failing_trace("va")]))
        bad_addr["traces"][0]["flows"][0]["hops"][1]["addr"] = "10.10.0.999"
        status, reply = await mesh.post("va", posted(bad_addr, 2))
        assert (status, reply["field"]) == (400, "$.traces[0].flows[0].hops[1].addr")
        back = msgspec.to_builtins(batch("va", 2, mesh.now, {}, [failing_trace("va")]))
        back["traces"][0]["flows"][0]["hops"][1]["ttl"] = 1
        status, reply = await mesh.post("va", posted(back, 2))
        assert (status, reply["field"]) == (400, "$.traces[0].flows[0].hops[1].ttl")
        unknown = batch("va", 2, mesh.now, {}, [failing_trace("va", node="elsewhere")])
        status, _ = await mesh.post("va", encode(unknown))
        assert status == 200 and mesh.service.paths.unknown_node_total == 1


# ------------------------------------------------------------------------------ the service


def service(db: Path) -> MeshService:
    return MeshService(SQLiteStore(db), DecisionPolicy(), fleet(2),
                       path_policy=PathPolicy(), asn_table=TABLE)


async def _fail_n0(svc: MeshService, seq: int, start: float, rounds: int,
             traces: dict[str, list[PathTrace]] | None = None) -> tuple[int, list[Any]]:
    """va and vb fail n0 (vc passes it) for ``rounds`` rounds; the verdicts they caused."""
    verdicts = []
    for t in range(rounds):
        for vantage in ("va", "vb", "vc"):
            seq += 1
            b = batch(vantage, seq, start + t, {"n0": vantage == "vc", "n1": True},
                      (traces or {}).get(vantage) if t == 0 else None)
            verdicts += await svc.accept_batch(encode(b), b, start + t)
    return seq, verdicts


async def test_traces_before_the_verdict_are_its_evidence(tmp_path: Path) -> None:
    svc = service(tmp_path / "mesh.db")
    # agents trace at a check's first failure: the traces ride with the first failures
    _, verdicts = await _fail_n0(svc, 0, 100.0, 4, {"va": [failing_trace("va")],
                                              "vb": [failing_trace("vb")]})
    (down,) = [v for v in verdicts if v.node == "n0" and v.state is VerdictState.DOWN]
    assert down.reasons[0].what == "vote"  # path evidence right after the vote
    paths = [(r.vantage, r.reason, r.asn, r.hop) for r in down.reasons if r.what == "path"]
    assert paths[0] == ("", "network", 64510, "")  # every failing vantage: the same AS
    assert sorted(paths[1:]) == [("va", "stop", 64510, "10.10.0.1"),
                                 ("vb", "stop", 64510, "10.10.0.1")]
    await svc.close()


async def test_traces_after_the_verdict_are_an_audit_note(tmp_path: Path) -> None:
    svc = service(tmp_path / "mesh.db")
    seq, _ = await _fail_n0(svc, 0, 100.0, 4)
    node = svc.engine.nodes["n0"]
    assert node.state is VerdictState.DOWN
    seq_before = node.seq
    seq += 1
    late = batch("va", seq, 105.0, {}, [failing_trace("va")])
    # only state changes are verdicts
    assert await svc.accept_batch(encode(late), late, 105.0) == []
    assert node.seq == seq_before
    (note,) = [n for n in svc.audit if n.what == "path-localised"]
    assert note.node == "n0" and "AS64510" in note.note and "va loses n0" in note.note
    # the same news again says nothing; an UP node's traces say nothing either
    seq += 1
    again = batch("va", seq, 106.0, {}, [failing_trace("va"), failing_trace("va", "n1")])
    assert await svc.accept_batch(encode(again), again, 106.0) == []
    assert [n.what for n in svc.audit].count("path-localised") == 1
    assert svc.paths.news_total == 1
    view = svc.paths.node_view("n0", 106.0)
    # a crash (no close, no snapshot since start): the journal replays into the same paths
    crashed = service(tmp_path / "mesh.db")
    assert crashed.paths.node_view("n0", 106.0) == view
    assert not [n for n in crashed.audit if n.what == "path-localised"]  # logged once, live
    # a clean restart: the snapshot carries them
    await crashed.close()
    svc.thread.close()
    svc.store.close()
    clean = service(tmp_path / "mesh.db")
    assert clean.paths.node_view("n0", 106.0) == view
    assert clean.replayed_entries == 0  # nothing replayed: it came from the snapshot
    assert clean.paths.news_total == 1
    await clean.close()


async def test_an_impaired_vantage_explains_itself_in_the_verdicts(tmp_path: Path) -> None:
    """va is cut off inside its own provider (AS64501): it fails every node and its traces stop
    there while vb and vc pass; it is judged impaired. When n0 then really goes DOWN, the
    verdict says where va loses its nodes (``vantage-path``: its own network)."""
    nodes = [f"n{i}" for i in range(4)]
    svc = MeshService(SQLiteStore(tmp_path / "mesh.db"),
                      DecisionPolicy(damping=DampingPolicy(enabled=False)), fleet(4),
                      path_policy=PathPolicy(), asn_table=TABLE)
    seq, verdicts = 0, []
    for t in range(12):
        down_for_all = t >= 6  # from then on n0 fails for vb and vc too
        for vantage in ("va", "vb", "vc"):
            seq += 1
            results = {n: vantage != "va" and not (down_for_all and n == "n0") for n in nodes}
            cut = [trace("va", True, flow(["10.1.0.1"]), node=n) for n in nodes]
            b = batch(vantage, seq, 100.0 + t, results,
                      cut if vantage == "va" and t == 0 else None)
            verdicts += await svc.accept_batch(encode(b), b, 100.0 + t)
        if t == 5:
            assert svc.engine.vantages["va"].impaired
            assert not [v for v in verdicts if v.state is VerdictState.DOWN]
    (down,) = [v for v in verdicts if v.node == "n0" and v.state is VerdictState.DOWN]
    (why,) = [r for r in down.reasons if r.what == "vantage-path"]
    assert (why.vantage, why.asn, why.value) == ("va", 64501, 4.0)
    assert "provider-a" in why.note and why.note.startswith("impaired: ")
    await svc.close()


# ------------------------------------------------------------------------------ the reporter


def observation(seq: int) -> Observation:
    return Observation(node="n0", check="wg", vantage="va", seq=seq, wall_time=1.7e9 + seq,
                       ok=False, reason=Reason.TIMEOUT, duration_seconds=0.5,
                       kind="wireguard.handshake")


async def _reporter(tmp_path: Path, port: int, stats: ReporterStats) -> Reporter:
    reporter = Reporter(agent="va", endpoints=[f"http://127.0.0.1:{port}"], key_id="va",
                        key=signing.load_key(tmp_path / "va.key"),
                        spool_path=tmp_path / "agent" / "spool.sqlite",
                        spool_max_bytes=10_000_000, batch_max=10, flush_interval=0.05,
                        stats=stats)
    await reporter.start()
    return reporter


async def _serve(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@contextlib.asynccontextmanager
async def fake_mesh(tmp_path: Path, ingest: Any) -> AsyncIterator[tuple[Reporter,
                                                                         ReporterStats]]:
    """A reporter posting to ``ingest`` (an aiohttp handler standing in for a mesh)."""
    signing.write_key_file(tmp_path / "va.key", signing.generate_key() + "\n")
    app = web.Application()
    app.router.add_post("/v1/batches", ingest)
    port = free_port()
    runner = await _serve(app, port)
    stats = ReporterStats()
    reporter = await _reporter(tmp_path, port, stats)
    try:
        yield reporter, stats
    finally:
        await reporter.close(drain_timeout=1)
        await runner.cleanup()


async def test_the_reporter_delivers_traces_to_a_mesh_that_takes_them(tmp_path: Path) -> None:
    port = free_port()
    cfg = load_mesh_config(write_mesh_config(tmp_path, 1, ["va"], port=port))
    app = build_app(cfg)
    runner = await _serve(app, port)
    stats = ReporterStats()
    reporter = await _reporter(tmp_path, port, stats)
    try:
        reporter.submit(observation)  # the first answer says the mesh takes traces
        await until(lambda: stats.sent_total.get("0", 0) >= 1, 60, "the first batch")
        reporter.submit_trace(failing_trace("va"))
        reporter.submit(observation)
        await until(lambda: stats.traces_sent_total.get("0", 0) == 1, 60, "the trace")
        assert app[SERVICE_KEY].paths.traces_total == {"va": 1}
    finally:
        await reporter.close(drain_timeout=1)
        await runner.cleanup()


class _OldBatch(msgspec.Struct, forbid_unknown_fields=True):
    """The batch as a mesh from before path traces (and agent epochs) decodes it: a stand-in
    for that mesh, which cannot run here beside this one."""

    version: int
    agent: str
    batch_seq: int
    sent_at: float
    observations: list[dict[str, Any]]


async def test_an_old_mesh_never_gets_traces_and_loses_nothing(tmp_path: Path) -> None:
    got: list[int] = []
    refused = []

    async def old_ingest(request: web.Request) -> web.Response:
        try:
            b = msgspec.json.decode(await request.read(), type=_OldBatch)
        except msgspec.ValidationError as exc:
            refused.append(str(exc))
            return web.json_response({"error": "schema", "detail": str(exc)}, status=400)
        got.extend(o["seq"] for o in b.observations)
        return web.json_response({"accepted": True, "verdicts": 0})

    async with fake_mesh(tmp_path, old_ingest) as (reporter, stats):
        for i in range(30):
            reporter.submit(observation)
            reporter.submit_trace(failing_trace("va"))
            if i % 10 == 0:
                await until(lambda n=i: len(got) > n, 60, "a batch")
        await until(lambda: len(got) == 30, 60, "every observation")
        # its first batch carried the agent's instance epoch, which such a mesh refuses too:
        # it went again at once without it, and so did every later one
        assert len(refused) == 1 and "epoch" in refused[0], refused
        assert stats.traces_sent_total == {}
        assert stats.batches_total.get(("0", "rejected"), 0) == 0
        assert sorted(got) == list(range(30))


async def test_a_mesh_refusing_traces_gets_the_batch_again_without_them(tmp_path: Path) -> None:
    """A mesh that says it takes traces but refuses a batch carrying them (a bug, or limits of
    its own): the batch goes again at once without them; the traces are dropped and counted."""
    got: list[int] = []
    with_traces = 0

    async def picky(request: web.Request) -> web.Response:
        nonlocal with_traces
        body = json.loads(await request.read())
        if body.get("traces"):
            with_traces += 1
            return web.json_response({"error": "schema"}, status=400)
        got.extend(o["seq"] for o in body["observations"])
        return web.json_response({"accepted": True, "verdicts": 0, "accepts": ["traces"]})

    async with fake_mesh(tmp_path, picky) as (reporter, stats):
        reporter.submit(observation)
        await until(lambda: len(got) == 1, 60, "the first batch")
        for _ in range(5):
            reporter.submit_trace(failing_trace("va"))
        for _ in range(20):
            reporter.submit(observation)
        await until(lambda: len(got) == 21, 60, "every observation")
        assert with_traces == 1  # once refused, no more traces to it for a while
        assert stats.traces_dropped_total == {"refused": 5}
        assert sorted(got) == list(range(21))


async def test_the_journal_keeps_the_traces_as_sent(tmp_path: Path) -> None:
    svc = service(tmp_path / "mesh.db")
    b = batch("va", 1, 1.0, {"n0": True}, [failing_trace("va")])
    await svc.accept_batch(encode(b), b, 1.0)
    await svc.close()
    with sqlite3.connect(tmp_path / "mesh.db") as db:
        (payload,) = db.execute("SELECT payload FROM journal WHERE kind = 'batch'").fetchone()
    assert json.loads(payload)["traces"][0]["vantage"] == "va"

