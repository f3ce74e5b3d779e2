"""HA benchmark: failover time over repeated leader kills.

Run with ``pytest -m slow tests/bench/test_ha_bench.py -s``. The lab of tests/ha: 3 etcd members
(raft heartbeat 100 ms, election 1 s), 3 ``tunnelwatch mesh`` replicas with a 3 s lease and a
1 s clock margin, each on its own lab host. 12 times: SIGKILL the leader, time until another
replica reports ``leading`` (it may publish), then restart the killed one (it follows). Printed:
median and p99 of the failover time and their ratio to the lease TTL (the floor: nobody may take
over before the dead leader's lease expires), and the same for a clean stop (SIGTERM: the leader
revokes its lease, so followers need not wait). Asserted: correctness only (one leader at a
time, every verdict delivered), never timing.
"""

from __future__ import annotations

import os
import signal
import statistics
import time

import pytest

from probes.lab.ha import LEASE_TTL, HACluster, Recorder, check_deliveries
from probes.lab.topology import Lab
from tests.conftest import lab_unavailable

pytestmark = [pytest.mark.ha, pytest.mark.lab, pytest.mark.slow]

KILLS = 12
STOPS = 5


def _figures(label: str, samples: list[float]) -> None:
    median = statistics.median(samples)
    p99 = statistics.quantiles(samples, n=100, method="inclusive")[98]
    print(f"{label}: n={len(samples)} median {median:.2f} s, p99 {p99:.2f} s, "
          f"min {min(samples):.2f} s, max {max(samples):.2f} s; "
          f"median/TTL {median / LEASE_TTL:.2f}, p99/TTL {p99 / LEASE_TTL:.2f}")


def test_failover_time_over_repeated_leader_kills() -> None:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    with Lab("habench") as lab:
        cluster = HACluster.build(lab, replicas=3)
        Recorder.delay = 0.0
        kills: list[float] = []
        stops: list[float] = []
        for i in range(KILLS + STOPS):
            leader = cluster.wait_leader()
            followers = [x for x in cluster.alive() if x is not leader]
            cluster.post_round(i)  # verdicts keep moving across the failovers
            started = time.monotonic()
            if i < KILLS:
                cluster.kill(leader)
            else:
                assert leader.proc is not None
                os.kill(leader.proc.pid, signal.SIGTERM)
            successor = cluster.wait_leader(followers)
            (kills if i < KILLS else stops).append(time.monotonic() - started)
            assert successor is not leader
            if leader.proc is not None and leader.proc.poll() is None:
                leader.proc.wait(15)
            assert leader.proc is not None
            lab.untrack(leader.proc.pid)
            cluster.start(leader)
        print()
        _figures("failover after SIGKILL of the leader", kills)
        _figures("failover after SIGTERM of the leader (lease revoked)", stops)
        final = cluster.wait_leader()
        cluster.wait_delivered(final)
        time.sleep(0.3)
        check_deliveries(cluster.log(final), list(Recorder.deliveries))
