"""Leader election on a real etcd lease, and the fencing deadline (a fake monotonic clock)."""

from __future__ import annotations

import asyncio
import time

import pytest

from probes.lab.etcd import LoopbackEtcd
from probes.mesh.leader import LeaderElector
from probes.mesh.store_etcd import EtcdClient

pytestmark = pytest.mark.ha

KEY = "/tw/test/leader"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def elector(etcd: LoopbackEtcd, name: str, clock: FakeClock | None = None,
            endpoints: list[str] | None = None) -> LeaderElector:
    client = EtcdClient(endpoints or [etcd.endpoint], timeout=0.3)
    return LeaderElector(client, KEY, name, ttl=3, margin=1.0,
                         clock=clock or time.monotonic)


def test_one_leader_and_followers_see_it(etcd: LoopbackEtcd) -> None:
    a, b = elector(etcd, "a"), elector(etcd, "b")
    a.step()
    b.step()
    assert a.leading and a.may_publish()
    assert not b.leading and not b.may_publish() and b.leader == "a"
    a.step()  # keepalive
    assert a.may_publish()
    a.resign()
    assert not a.may_publish()
    b.step()
    assert b.leading and b.leader == "b" and b.terms == 1


def test_fencing_deadline_is_ttl_minus_margin_from_the_last_keepalive_sent(
        etcd: LoopbackEtcd) -> None:
    clock = FakeClock()
    a = elector(etcd, "a", clock)
    a.step()
    assert a.leading
    assert a.valid_until == pytest.approx(clock.now + 3 - 1.0)
    clock.now += 1.9
    assert a.may_publish()
    clock.now += 0.2  # 2.1 s after the keepalive was sent: past ttl - margin
    assert not a.may_publish()
    a.step()  # a keepalive that succeeds restores the window, counted from its own send
    assert a.may_publish() and a.valid_until == pytest.approx(clock.now + 2.0)


def test_a_leader_cut_from_etcd_stops_before_anyone_else_can_start(etcd: LoopbackEtcd) -> None:
    a, b = elector(etcd, "a"), elector(etcd, "b")
    a.step()
    assert a.leading
    a.client.endpoints = ["http://127.0.0.1:1"]  # partitioned: keepalives fail
    # a's window ends at its own deadline: its last keepalive sent + ttl - margin (failed
    # keepalives do not move it)
    a_until = a.valid_until
    deadline = time.monotonic() + 60  # generous: it comes; load only slows it
    while not b.may_publish():
        assert time.monotonic() < deadline, "b never took over"
        a.step()
        b.step()
        time.sleep(0.05)
    took_over_at = time.monotonic()  # after b's grant, which etcd made only once a's lease
    # (kept from the keepalive's arrival, after it was sent) had expired: the windows never
    # overlap, with the margin between them. Read from the electors' own clocks, not from
    # when a loop under load happened to sample them.
    assert a.valid_until == a_until and a_until + a.margin <= took_over_at
    assert not a.may_publish()
    assert b.leader == "b"
    a.client.endpoints = [etcd.endpoint]  # healed: the old leader learns it lost
    a.step()
    assert not a.leading and not a.may_publish()
    a.step()
    assert a.leader == "b"


async def test_run_reports_publishing_on_and_off(etcd: LoopbackEtcd) -> None:
    a = elector(etcd, "a")
    flips: list[bool] = []
    task = asyncio.create_task(a.run(flips.append))

    async def until(count: int, what: str) -> None:
        deadline = time.monotonic() + 60  # generous: it comes; load only slows it
        while len(flips) < count:
            assert time.monotonic() < deadline, f"{what}: flips {flips}"
            await asyncio.sleep(0.05)

    await until(1, "never reported publishing on")
    a.client.endpoints = ["http://127.0.0.1:1"]
    await until(2, "cut from etcd, never reported publishing off")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert flips == [True, False]


def test_margin_must_fit_in_the_ttl(etcd: LoopbackEtcd) -> None:
    with pytest.raises(ValueError, match="margin"):
        LeaderElector(EtcdClient([etcd.endpoint]), KEY, "a", ttl=2, margin=2.0)


def test_the_collector_says_who_may_publish(etcd: LoopbackEtcd) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from probes.mesh.leader import LeaderCollector

    a = elector(etcd, "a")
    registry = CollectorRegistry()
    registry.register(LeaderCollector(a, lambda: 7))
    assert b"tunnelwatch_mesh_leader 0.0" in generate_latest(registry)
    a.step()
    text = generate_latest(registry)
    assert b"tunnelwatch_mesh_leader 1.0" in text
    assert b"tunnelwatch_mesh_leader_terms_total 1.0" in text
    assert b"tunnelwatch_mesh_etcd_unsynced_verdicts 7.0" in text


def test_a_lost_race_keeps_no_lease_and_a_later_attempt_wins(etcd: LoopbackEtcd) -> None:
    a, b = elector(etcd, "a"), elector(etcd, "b")
    a.step()
    real_get = b.client.get
    b.client.get = lambda key: None  # type: ignore[method-assign] # b saw the key absent
    b.step()  # ... and lost the txn to a
    b.client.get = real_get  # type: ignore[method-assign]
    assert not b.leading and b.lease == 0
    granted = b.client.call("/v3/lease/leases", {}).get("leases", [])
    assert [int(x["ID"]) for x in granted] == [a.lease]  # b's lease was revoked
    a.resign()
    b.step()
    assert b.leading and b.may_publish()
