"""Record the path lab's traces for the unit tests: ``python -m tests.paths.record`` (root).

Runs probes/lab/pathlab.py through a healthy spell and each fault, then writes what the agents
sent, as the mesh journaled it: ``data/lab-traces.jsonl`` (one ``{"phase", "now", "trace"}``
per trace, ``now`` the mesh time it was applied) and the PoP router's MRT RIB dump
(``data/lab-rib.mrt``) with the AS names (``data/lab-asnames.txt``). The unit tests replay
them through the path engine offline.
"""

from __future__ import annotations

import json
import sqlite3
import struct
import time
from pathlib import Path

import msgspec

from probes.lab.pathlab import AS_NAMES, PathLab
from probes.lab.topology import Lab
from probes.model import decode_batch

DATA = Path(__file__).parent / "data"


def _healthy(pl: PathLab) -> bool:
    v = pl.api("/v1/verdicts?vantages=1")["nodes"][0]
    return (v["state"] == "UP" and set(v["vantages"].values()) == {"UP"}
            and pl.node_view()["paths"]["localisation"] is None)


def main() -> None:
    phases: list[tuple[str, float]] = []
    with Lab("record") as lab:
        pl = PathLab(lab).build()
        pl.wait_for(lambda: _healthy(pl) and len(pl.node_view()["paths"]["vantages"]) == 3, 90,
                    "healthy")
        phases.append(("healthy", time.time()))
        time.sleep(14)  # two more baseline rounds
        for name, fault in (("black-hole-t1", pl.black_hole_t1),
                            ("ecmp-t2b", pl.drop_vpn_port_on_t2b),
                            ("mtu-t1", pl.mtu_drop_at_t1),
                            ("route-vb", pl.longer_route_for_vb)):
            phases.append((name, time.time()))
            fault()
            time.sleep(12)
            phases.append((f"heal-{name}", time.time()))
            pl.heal()
            pl.wait_for(lambda: _healthy(pl), 90, "healed")
        time.sleep(2)
        db = sqlite3.connect(pl.dir / "mesh.db")
        rows = db.execute("SELECT now, payload FROM journal WHERE kind = 'batch' ORDER BY id")
        out = []
        for now, payload in rows:
            batch = decode_batch(payload)
            phase = [p for p, at in phases if at <= now]
            for trace in batch.traces:
                out.append({"phase": phase[-1] if phase else "start", "now": now,
                            "trace": msgspec.to_builtins(trace)})
        DATA.mkdir(exist_ok=True)
        (DATA / "lab-traces.jsonl").write_text("".join(json.dumps(o) + "\n" for o in out))
        (DATA / "lab-rib.mrt").write_bytes(_last_dump(pl.net.mrt_file.read_bytes()))
        (DATA / "lab-asnames.txt").write_text(
            "".join(f"{asn} {name}\n" for asn, name in AS_NAMES.items()))
        print(f"{len(out)} traces over {len(phases)} phases")


def _last_dump(data: bytes) -> bytes:
    """BIRD appends a whole RIB dump every period: keep the last one (from its peer index)."""
    offset = last = 0
    while offset < len(data):
        _ts, kind, subtype, length = struct.unpack_from("!IHHI", data, offset)
        if (kind, subtype) == (13, 1):
            last = offset
        offset += 12 + length
    return data[last:]


if __name__ == "__main__":
    main()
