"""SQLite store, the engine+store service (restart from journal) and replay."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from probes.mesh.decision import DecisionEngine, NodeInfo
from probes.mesh.policy import DampingPolicy, DecisionPolicy
from probes.mesh.replay import parse_lines, replay
from probes.mesh.service import MeshService
from probes.mesh.snapshot import close_sockets, dump_engine, load_engine
from probes.mesh.store import AgentPosition, EntryKind, JournalEntry, StoreError
from probes.mesh.store_sqlite import SQLiteStore
from probes.model import (
    ObservationBatch,
    SchemaError,
    Verdict,
    VerdictState,
    encode,
)
from tests.mesh.helpers import fleet, obs

pytestmark = pytest.mark.mesh

POLICY = DecisionPolicy(damping=DampingPolicy(enabled=False))
V3 = ("va", "vb", "vc")


def unstamped(verdicts: list[Verdict]) -> list[Verdict]:
    return [msgspec.structs.replace(v, epoch=0) for v in verdicts]


def batch(
    agent: str, seq: int, results: dict[str, bool], at: float
) -> tuple[bytes, ObservationBatch]:
    b = ObservationBatch(
        version=1,
        agent=agent,
        batch_seq=seq,
        sent_at=at,
        observations=[obs(n, agent, ok, at=at) for n, ok in results.items()],
    )
    return encode(b), b


async def feed(
    svc: MeshService, rounds: list[dict[str, bool]], start: float = 0.0, seq0: int = 1
) -> list[Verdict]:
    out: list[Verdict] = []
    for i, results in enumerate(rounds):
        for agent in V3:
            body, b = batch(agent, seq0 + i, results, start + i)
            out += await svc.accept_batch(body, b, start + i)
        out += await svc.tick(start + i + 0.5)
        await svc.housekeeping()
    return out


async def settle_snapshots(svc: MeshService) -> None:
    """Wait for a background snapshot child and finish pruning the journal it covers."""
    deadline = time.monotonic() + 30
    while svc.snapshotter.busy and time.monotonic() < deadline:
        await svc.housekeeping()
        await asyncio.sleep(0.01)
    assert not svc.snapshotter.running


def test_commit_is_atomic(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "m.db")
    v = Verdict(
        node="n0", state=VerdictState.UP, previous=VerdictState.UNKNOWN, seq=1, decided_at=1.0
    )
    store.commit(JournalEntry(EntryKind.TICK, 1.0), [v], AgentPosition("va", 1))
    with pytest.raises(StoreError):  # (node, seq) already logged: the whole commit must vanish
        store.commit(JournalEntry(EntryKind.TICK, 2.0), [v], AgentPosition("va", 2))
    rec = store.recover()
    assert len(rec.entries) == 1 and rec.agents == {"va": (0, 1)}
    assert [s.verdict for s in store.verdicts()] == [v]
    assert store.node_verdicts() == {"n0": v}
    store.close()


def test_outbox_positions_per_publisher(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "m.db")
    verdicts = [
        Verdict(
            node=f"n{i}", state=VerdictState.UP, previous=VerdictState.UNKNOWN, seq=1, decided_at=i
        )
        for i in range(5)
    ]
    for v in verdicts:
        store.commit(JournalEntry(EntryKind.TICK, v.decided_at), [v])
    assert [s.verdict.node for s in store.outbox("webhook")] == [f"n{i}" for i in range(5)]
    store.ack("webhook", store.outbox("webhook", limit=2)[-1].id)
    assert [s.verdict.node for s in store.outbox("webhook")] == ["n2", "n3", "n4"]
    assert len(store.outbox("haproxy")) == 5
    store.ack("webhook", 1)  # never moves backwards
    assert store.position("webhook") == 2
    assert [s.verdict.node for s in store.verdicts(node="n3")] == ["n3"]
    store.close()


@pytest.mark.parametrize(
    ("snapshot_every", "background"),
    [(1, False), (3, False), (10_000, False), (2, True), (5, True)],
)
async def test_restart_resumes_without_reannouncing(
    tmp_path: Path, snapshot_every: int, background: bool
) -> None:
    nodes = fleet(4)
    rounds_a = [{f"n{i}": True for i in range(4)}] * 2 + [
        {"n0": False, "n1": True, "n2": True, "n3": True}
    ] * 2
    rounds_b = [{"n0": False, "n1": True, "n2": True, "n3": False}] * 3 + [
        {f"n{i}": True for i in range(4)}
    ] * 3

    # reference: one process sees everything
    ref = MeshService(
        SQLiteStore(tmp_path / "ref.db"),
        POLICY,
        nodes,
        snapshot_every=snapshot_every,
        background_snapshots=background,
    )
    expected = await feed(ref, rounds_a) + await feed(ref, rounds_b, start=100, seq0=10)
    await ref.close()

    db = tmp_path / "m.db"
    first = MeshService(
        SQLiteStore(db),
        POLICY,
        nodes,
        snapshot_every=snapshot_every,
        background_snapshots=background,
    )
    before = await feed(first, rounds_a)
    if background:
        await settle_snapshots(first)
        assert first.snapshots_background_total >= 1
        assert first.store.journal_length() < len(rounds_a) * 4  # the child's snapshot pruned it
    first.store.close()  # no clean shutdown: no final snapshot (a crash)
    second = MeshService(
        SQLiteStore(db),
        POLICY,
        nodes,
        snapshot_every=snapshot_every,
        background_snapshots=background,
    )
    assert second.agent_seq == {a: len(rounds_a) for a in V3}
    assert {n: x.seq for n, x in second.engine.nodes.items()} == {
        n: x.seq for n, x in first.engine.nodes.items()
    }
    after = await feed(second, rounds_b, start=100, seq0=10)
    # every start of a store begins a new epoch: compare what was decided, epochs aside
    assert encode(unstamped(before + after)) == encode(unstamped(expected))
    logged = [s.verdict for s in second.store.verdicts()]
    assert encode(logged) == encode(before + after)
    assert max(v.epoch for v in before) < min(v.epoch for v in after)
    assert len({(v.node, v.seq) for v in logged}) == len(logged)
    await second.close()
    third = MeshService(
        SQLiteStore(db),
        POLICY,
        nodes,
        snapshot_every=snapshot_every,
        background_snapshots=background,
    )
    assert third.replayed_entries == 0  # clean close left a snapshot covering everything
    await third.close()


async def test_admin_actions_are_journaled_and_audited(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    svc = MeshService(SQLiteStore(db), POLICY, fleet(2))
    await feed(svc, [{"n0": True, "n1": True}])
    changes = await svc.set_admin("n0", VerdictState.DRAINING, "alice", 10.0)
    assert [c.state for c in changes] == [VerdictState.DRAINING]
    assert svc.store.admin_states()["n0"].actor == "alice"
    with pytest.raises(KeyError):
        await svc.set_admin("nope", VerdictState.DRAINING, "alice", 11.0)
    svc.store.close()
    again = MeshService(SQLiteStore(db), POLICY, fleet(2))
    assert again.engine.nodes["n0"].state == VerdictState.DRAINING
    await again.set_admin("n0", None, "bob", 12.0)
    assert again.store.admin_states() == {}
    log = [s.verdict for s in again.store.verdicts(node="n0")]
    assert [
        (v.state, v.reasons[0].what if v.state != VerdictState.UP or v.seq > 1 else "") for v in log
    ][1:] == [
        (VerdictState.DRAINING, "admin"),
        (VerdictState.UP, "admin"),
    ]
    await again.close()


def test_replay_from_jsonl_is_deterministic_and_ticks() -> None:
    nodes = fleet(2)
    lines = []
    for t in range(7):  # n1 fails at 102..104 (DOWN at 104) and passes again from 105
        for v in V3:
            for n in ("n0", "n1"):
                lines.append(encode(obs(n, v, not (n == "n1" and 2 <= t <= 4), at=100.0 + t)))
    # then only va keeps reporting n0: vb and vc go stale, the nodes lose quorum
    for t in range(7, 50):
        lines.append(encode(obs("n0", "va", True, at=100.0 + t)))
    policy = DecisionPolicy(stale_after_seconds=10, damping=DampingPolicy(enabled=False))
    first = list(replay(policy, nodes, parse_lines(lines)))
    second = list(replay(policy, nodes, parse_lines(lines)))
    assert encode(first) == encode(second)
    summary = [(v.node, v.state.value, v.decided_at) for v in first]
    # n1 passes twice (rise 2) at 106, but went DOWN at 104: the dwell (4 s) holds the UP
    # until 108, and only a tick can release it (no observation of n1 arrives then); the loss
    # of quorum later (vb, vc stale after 116) changes no state: no record
    assert summary == [
        ("n0", "UP", 100.0),
        ("n1", "UP", 100.0),
        ("n1", "DOWN", 104.0),
        ("n1", "UP", 108.0),
    ]


def test_replay_input_errors_name_the_line() -> None:
    with pytest.raises(SchemaError) as info:
        list(parse_lines([b"", encode(obs("n0", "va", True)), b'{"node": 1}']))
    assert info.value.path.startswith("line 3")
    batch_line = encode(batch("va", 1, {"n0": True, "n1": False}, 5.0)[1])
    [recorded] = parse_lines([batch_line])  # a batch stays whole: applied at its sent_at
    assert isinstance(recorded, ObservationBatch)
    assert [o.node for o in recorded.observations] == ["n0", "n1"]


def test_engine_pickles_compactly() -> None:
    eng = DecisionEngine(POLICY, fleet(3))
    eng.observe([obs(f"n{i}", v, True) for i in range(3) for v in V3], 0.0)
    assert msgspec.json.encode(eng.node_view("n0", 0.0))


async def test_an_engine_failure_leaves_nothing_half_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = MeshService(SQLiteStore(tmp_path / "m.db"), POLICY, fleet(2))
    await feed(svc, [{"n0": True, "n1": True}])
    before = svc.engine.observations_total

    original = DecisionEngine.observe_rows  # what every batch goes through, JSON or columnar
    calls = []

    def explode(self: DecisionEngine, rows: Any, now: float) -> list[Verdict]:
        calls.append(now)
        if len(calls) > 1:  # the replay during recovery works
            return original(self, rows, now)
        self.observations_total += 1000  # some damage before failing
        raise RuntimeError("bug")

    body, b = batch("va", 99, {"n0": False}, 5.0)
    with monkeypatch.context() as m:
        m.setattr(DecisionEngine, "observe_rows", explode)
        with pytest.raises(RuntimeError):
            await svc.accept_batch(body, b, 5.0)
    assert svc.engine.observations_total == before  # rebuilt from the store
    assert svc.agent_seq["va"] == 1
    await svc.close()


def test_an_older_snapshot_never_replaces_a_newer_one(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "m.db")
    store.save_snapshot(10, b"new")
    store.write_snapshot_detached(7, b"old")  # a late child from before a crash
    rec = store.recover()
    assert (rec.snapshot, rec.snapshot_journal_id) == (b"new", 10)
    store.write_snapshot_detached(12, b"newer")
    assert store.recover().snapshot == b"newer"
    store.close()


async def test_config_changes_apply_at_restart(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    svc = MeshService(SQLiteStore(db), POLICY, fleet(4))
    up = {f"n{i}": True for i in range(4)}
    await feed(svc, [up, {**up, "n3": False}, {**up, "n3": False}, {**up, "n3": False}])
    assert svc.engine.nodes["n3"].state == VerdictState.DOWN
    await svc.close()

    # n2 is decommissioned, n1 moves to another pool, n4 is new
    nodes = [
        NodeInfo("n0", "p0"),
        NodeInfo("n1", "p9", pop="ams"),
        NodeInfo("n3", "p0"),
        NodeInfo("n4", "p0"),
    ]
    again = MeshService(SQLiteStore(db), POLICY, nodes)
    eng = again.engine
    assert list(eng.nodes) == ["n0", "n1", "n3", "n4"]
    assert eng.nodes["n1"].pool.name == "p9" and eng.nodes["n1"].info.pop == "ams"
    assert [n.info.node for n in eng.pools["p0"].nodes] == ["n0", "n3", "n4"]
    assert eng.pools["p0"].down == 1 and eng.nodes["n3"].seq == 2
    assert {v.name: (v.decided, v.down) for v in eng.vantages.values()} == {a: (3, 1) for a in V3}
    assert load_engine(dump_engine(eng)).nodes.keys() == eng.nodes.keys()
    # n3 went DOWN at t=3: it may come back once the dwell (4 s) has passed
    changes = await feed(again, [{**up, "n4": True}] * 2, start=7, seq0=10)
    assert [(c.node, c.state.value, c.seq) for c in changes] == [
        ("n4", "UP", 1),
        ("n3", "UP", 3),
    ]
    assert again.engine.unknown_node_total == 6  # n2's observations: no longer a node
    await again.close()


def test_a_snapshot_child_lets_go_of_sockets(tmp_path: Path) -> None:
    """A snapshot child must not keep the mesh's listening port (nor any other socket) open."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    db = tmp_path / "m.db"
    pid = os.fork()
    if pid == 0:  # the child: same call as a snapshot child makes first
        code = 1
        try:
            close_sockets()
            try:
                os.fstat(listener.fileno())
            except OSError:
                code = 0  # closed, as it should be
            SQLiteStore(db).close()  # files still work
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    listener.close()
    assert os.waitstatus_to_exitcode(status) == 0


def test_journal_ids_never_go_back_below_a_snapshot(tmp_path: Path) -> None:
    """Pruned empty, the journal must not hand out ids the snapshot already covers: a restart
    would skip those entries (SQLite's rowid restarts at 1 in an empty table)."""
    store = SQLiteStore(tmp_path / "m.db")
    ids = [store.commit(JournalEntry(EntryKind.TICK, float(t)), []) for t in range(3)]
    store.save_snapshot(ids[-1], b"snap")
    while store.prune_journal(ids[-1], limit=1):
        pass
    assert store.journal_length() == 0
    later = store.commit(JournalEntry(EntryKind.TICK, 9.0), [])
    store.close()
    again = SQLiteStore(tmp_path / "m.db")
    assert later > ids[-1]
    assert [e.now for e in again.recover().entries] == [9.0]
    assert again.commit(JournalEntry(EntryKind.TICK, 10.0), []) == later + 1
    again.close()


def test_checkpoints_happen_beside_the_commits(tmp_path: Path) -> None:
    """The WAL is copied into the database by the checkpointer thread once it holds 16 MiB,
    not by whichever commit crossed SQLite's threshold (that commit stalled for the copy)."""
    db = tmp_path / "m.db"
    store = SQLiteStore(db)
    payload = b"x" * (1 << 20)
    for t in range(20):
        store.commit(JournalEntry(EntryKind.BATCH, float(t), payload), [])
    deadline = time.monotonic() + 30
    while db.stat().st_size < 16 * (1 << 20) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert db.stat().st_size >= 16 * (1 << 20)  # the journal's pages are in the database file
    store.close()
