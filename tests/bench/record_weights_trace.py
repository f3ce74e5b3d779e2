"""Record a load trace on the real lab pool, for the byte-for-byte replay test.

``sudo .venv/bin/python -m tests.bench.record_weights_trace tests/mesh/data/weights-trace.jsonl``

Builds :class:`probes.lab.udp_pool.UdpPool` (three wireguard-go nodes behind nftlb, a real agent
reading each node's load every second), runs a short script — idle, node1 made hot by three
heavy clients, light clients through the balancer, node3's WireGuard stopped and started again,
everyone leaving — and writes every observation the agent sent the mesh (the mesh's journal, as
received: check results and load reads) as JSON lines. ``tests/mesh/test_weights_replay.py``
replays them through the decision and weight engines; regenerate its expected output with
``TW_REGENERATE=1`` after a deliberate change of the policy.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path

from probes.lab.topology import Lab
from probes.lab.udp_pool import PoolOptions, UdpPool
from probes.model import decode_batch, encode


def script(pool: UdpPool) -> None:
    pool.wait_all_up()
    time.sleep(5)
    for i in range(3):
        pool.add_client(i, via="node1")
        pool.set_rate(i, 300_000)
    for i in range(3, 6):
        pool.add_client(i)
        pool.set_rate(i, 20_000)
    time.sleep(20)
    node3 = pool.nodes["node3"].wireguard
    node3.stop()
    time.sleep(8)
    node3.start()
    time.sleep(15)
    for index in list(pool.clients):
        pool.remove_client(index)
    time.sleep(15)


def journal(db: Path) -> list[bytes]:
    """Every observation the mesh accepted, in order (read while the mesh still runs: a clean
    shutdown snapshots and drops the journal)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT payload FROM journal WHERE kind = 'batch' ORDER BY id")
        return [encode(obs) for (payload,) in rows
                for obs in decode_batch(bytes(payload)).observations]


def main(out: Path) -> None:
    with Lab("trace") as lab:
        pool = UdpPool(lab, PoolOptions(openvpn_tcp=False)).build()
        script(pool)
        lines = journal(pool.dir / "mesh.db")
    out.write_bytes(b"".join(line + b"\n" for line in lines))
    print(f"{out}: {len(lines)} observations")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
