"""``tunnelwatch demo --ha``: three mesh replicas on a 3-member etcd, one leader publishing.

A synthetic observation stream (signed batches from three agents, to every replica) keeps
verdicts changing while the script kills the leader mid-delivery, kills an etcd member, and
brings the old leader back. The summary says how long failover took and whether every verdict
reached the webhook receiver once, in order, with duplicates only under the same key.
"""

from __future__ import annotations

import time
from typing import TextIO

from probes.lab.ha import LEASE_TTL, HACluster, Recorder, Replica, delivery_problems
from probes.lab.topology import Lab

ROUND_SECONDS = 0.2


def _leading(cluster: HACluster) -> str:
    leader = cluster.leader()
    return leader.name if leader else "none"


def run(out: TextIO, rounds: int = 75) -> bool:
    started = time.monotonic()
    print("tunnelwatch demo --ha: 3-member etcd, 3 mesh replicas, a webhook receiver...",
          file=out, flush=True)
    with Lab("demo-ha") as lab:
        cluster = HACluster.build(lab)
        first = cluster.wait_leader()
        print(f"  lab {lab.run_id}: etcd {', '.join(m.name for m in cluster.etcd.members)}; "
              f"replicas "
              f"{', '.join(r.name for r in cluster.replicas)}; {first.name} leads "
              f"(lease {LEASE_TTL} s) - built in {time.monotonic() - started:.1f} s",
              file=out, flush=True)
        failover = None
        old: Replica | None = None
        t0 = time.monotonic()
        for r in range(rounds):
            cluster.post_round(r)
            if r == 15:
                old = cluster.leader() or first
                print(f"  [{time.monotonic() - t0:4.1f} s] SIGKILL the leader {old.name} "
                      "mid-delivery", file=out, flush=True)
                killed = time.monotonic()
                cluster.kill(old)
                new = cluster.wait_leader(cluster.alive(), timeout=4 * LEASE_TTL)
                failover = time.monotonic() - killed
                print(f"           {new.name} leads after {failover:.2f} s "
                      f"(bound: 2 x lease = {2 * LEASE_TTL} s)", file=out, flush=True)
            elif r == 35:
                print(f"  [{time.monotonic() - t0:4.1f} s] kill etcd member e3; replicas keep "
                      "deciding and the leader keeps publishing", file=out, flush=True)
                cluster.etcd.kill("e3")
            elif r == 50 and old is not None:
                cluster.start(old)
                print(f"  [{time.monotonic() - t0:4.1f} s] {old.name} is back: leader is "
                      f"{_leading(cluster)} (the old leader does not publish)", file=out,
                      flush=True)
            elif r == 60:
                cluster.etcd.restart("e3")
                print(f"  [{time.monotonic() - t0:4.1f} s] e3 restarted", file=out, flush=True)
            time.sleep(ROUND_SECONDS)
        leader = cluster.wait_leader()
        want = cluster.wait_delivered(leader)
        log = cluster.log(leader)
        deliveries = list(Recorder.deliveries)
        problems = delivery_problems(log, deliveries)
        duplicates = len(deliveries) - len({d.key for d in deliveries})
        took = f"{failover:.2f} s" if failover is not None else "not measured"
        print(f"\nsummary: {len(want)} verdicts in the shared log, {len(deliveries)} deliveries "
              f"({duplicates} repeated under the same idempotency key); failover {took}",
              file=out)
        for problem in problems:
            print(f"  PROBLEM: {problem}", file=out)
        if not problems:
            print("  nothing lost, nothing out of order, no duplicate under another key",
                  file=out)
    print(f"lab torn down; demo took {time.monotonic() - started:.1f} s", file=out)
    return not problems
