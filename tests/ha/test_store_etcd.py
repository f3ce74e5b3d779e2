"""The etcd store: a shared, revision-ordered verdict log written by compare-and-swap, shared
admin states, and publisher positions only the lease holder can move."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from probes.lab.etcd import LoopbackEtcd
from probes.mesh.service import MeshService
from probes.mesh.store import AdminAction, EntryKind, JournalEntry
from probes.mesh.store_etcd import EtcdClient, EtcdError, EtcdStore, Fenced, FenceToken, req_put
from probes.model import Verdict, VerdictState
from tests.mesh.helpers import fleet

pytestmark = pytest.mark.ha

_now = itertools.count(1)


def verdict(node: str, seq: int, state: VerdictState = VerdictState.DOWN) -> Verdict:
    return Verdict(node=node, state=state, previous=VerdictState.UNKNOWN, seq=seq,
                   decided_at=float(seq))


def replica(etcd: LoopbackEtcd, tmp_path: Path, name: str) -> EtcdStore:
    return EtcdStore(EtcdClient([etcd.endpoint]), "/tw/test", tmp_path / f"{name}.db")


def tick(store: EtcdStore, *verdicts: Verdict) -> None:
    store.commit(JournalEntry(EntryKind.TICK, float(next(_now))), list(verdicts))


def test_two_replicas_deciding_the_same_change_log_it_once(
        etcd: LoopbackEtcd, tmp_path: Path) -> None:
    a, b = replica(etcd, tmp_path, "a"), replica(etcd, tmp_path, "b")
    tick(a, verdict("n1", 1), verdict("n2", 1))
    tick(b, verdict("n1", 1), verdict("n2", 1), verdict("n1", 2, VerdictState.UP))
    tick(a, verdict("n1", 2, VerdictState.UP))
    log = a.verdicts()
    assert [(s.verdict.node, s.verdict.seq) for s in log] == [("n1", 1), ("n2", 1), ("n1", 2)]
    ids = [s.id for s in log]
    assert ids == sorted(ids) and len(set(ids)) == 3  # etcd revisions: one per verdict
    assert b.verdicts(after=ids[0]) == log[1:]
    assert [s.verdict.seq for s in b.verdicts(node="n1")] == [1, 2]
    assert b.node_verdicts()["n1"].state == VerdictState.UP
    assert a.unsynced == 0 and b.unsynced == 0


def test_a_late_replica_never_rewrites_an_older_seq(etcd: LoopbackEtcd, tmp_path: Path) -> None:
    a, b = replica(etcd, tmp_path, "a"), replica(etcd, tmp_path, "b")
    tick(a, verdict("n1", 1), verdict("n1", 2, VerdictState.UP))
    assert b.append(verdict("n1", 1, VerdictState.DEGRADED)) is None
    assert [s.verdict.state for s in b.verdicts()] == [VerdictState.DOWN, VerdictState.UP]


def test_verdicts_wait_locally_while_etcd_is_down_and_go_out_in_order(
        etcd: LoopbackEtcd, tmp_path: Path) -> None:
    a = replica(etcd, tmp_path, "a")
    a.client = EtcdClient(["http://127.0.0.1:1"], timeout=0.2)  # nothing listens there
    a.sync_backoff = 0.0  # retry on every commit (the mesh waits a second between attempts)
    tick(a, verdict("n1", 1))
    tick(a, verdict("n1", 2, VerdictState.UP))
    assert a.unsynced == 2
    with pytest.raises(EtcdError):
        a.verdicts()
    a.client = EtcdClient(["http://127.0.0.1:1", etcd.endpoint], timeout=0.2)  # failover
    tick(a)
    assert a.unsynced == 0
    assert [s.verdict.seq for s in a.verdicts()] == [1, 2]


def test_admin_states_are_shared(etcd: LoopbackEtcd, tmp_path: Path) -> None:
    a, b = replica(etcd, tmp_path, "a"), replica(etcd, tmp_path, "b")
    action = AdminAction("n1", VerdictState.DRAINING, "ops")
    a.commit(JournalEntry(EntryKind.ADMIN, 5.0), [], admin=action, at=5.0)
    record = b.admin_states()["n1"]
    assert (record.state, record.actor, record.at) == (VerdictState.DRAINING, "ops", 5.0)
    a.commit(JournalEntry(EntryKind.ADMIN, 6.0), [], admin=AdminAction("n1", None), at=6.0)
    assert b.admin_states() == {}


def test_only_the_lease_holder_moves_a_publisher_position(
        etcd: LoopbackEtcd, tmp_path: Path) -> None:
    a, b = replica(etcd, tmp_path, "a"), replica(etcd, tmp_path, "b")
    with pytest.raises(Fenced):
        a.ack("hook", 5)  # no fence token: not the leader
    client = a.client
    lease, _ = client.lease_grant(30)
    client.put("/tw/test/leader", b"a", lease)
    a.fence = FenceToken("/tw/test/leader", "a", lease)
    a.ack("hook", 5)
    a.ack("hook", 3)  # never backwards
    assert b.position("hook") == 5
    b.fence = FenceToken("/tw/test/leader", "b", lease)  # right lease, wrong holder
    with pytest.raises(Fenced):
        b.ack("hook", 9)
    client.lease_revoke(lease)  # the key goes with the lease
    with pytest.raises(Fenced):
        a.ack("hook", 9)
    assert a.position("hook") == 5
    new_lease, _ = client.lease_grant(30)
    client.txn([], [req_put("/tw/test/leader", b"b", new_lease)])
    b.fence = FenceToken("/tw/test/leader", "b", new_lease)
    b.ack("hook", 9)
    assert a.outbox("hook") == [s for s in a.verdicts() if s.id > 9]


async def test_a_mesh_service_runs_on_the_etcd_store(etcd: LoopbackEtcd, tmp_path: Path) -> None:
    from probes.mesh.policy import DecisionPolicy

    store = replica(etcd, tmp_path, "svc")
    svc = MeshService(store, DecisionPolicy(), fleet(2))
    await svc.set_admin("n0", VerdictState.MAINTENANCE, "ops", 10.0)
    log = store.verdicts()
    assert [(s.verdict.node, s.verdict.state) for s in log] == [("n0", VerdictState.MAINTENANCE)]
    await svc.close()
    # a second replica starting empty takes the node's seq from etcd
    other = MeshService(replica(etcd, tmp_path, "svc2"), DecisionPolicy(), fleet(2))
    assert other.engine.nodes["n0"].seq == log[0].verdict.seq
    await other.close()


def test_a_client_fails_fast_for_a_while_after_every_endpoint_failed(
        etcd: LoopbackEtcd) -> None:
    client = EtcdClient(["http://127.0.0.1:1"], timeout=0.2, fail_fast_seconds=60.0)
    with pytest.raises(EtcdError, match=r"127\.0\.0\.1:1"):
        client.get("/k")
    client.endpoints = [etcd.endpoint]
    with pytest.raises(EtcdError, match="moments ago"):
        client.get("/k")  # not even tried
    client.fail_fast_seconds = 0.0
    assert client.get("/k") is None


def test_endpoints_must_be_http_urls() -> None:
    with pytest.raises(ValueError, match="http"):
        EtcdClient(["etcd:2379"])
