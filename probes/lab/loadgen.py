"""A UDP traffic generator for the lab: ``python -m probes.lab.loadgen RATES_FILE``.

It runs in a client host and sends datagrams through the clients' WireGuard tunnels: one flow
per entry of the rates file, from the tunnel address it names (the policy routing of
:mod:`probes.lab.wgclients` picks that client's tunnel) to a target behind the tunnel, at a
byte rate. The file is re-read whenever it changes, so a test or benchmark steers the load
while the generator runs::

    {"flows": [{"source": "10.201.0.101", "target": "10.201.0.1:9", "bytes_per_second": 250000}]}

Rate 0 (or a flow left out) stops a flow. Sending is paced in 5 ms ticks with a token bucket per
flow; a send that fails (a tunnel being torn down) is skipped, never fatal.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from probes.config import parse_host_port

TICK = 0.005
PACKET = 1200
BURST_SECONDS = 0.05  # a flow may catch up at most this much after a stall


@dataclass
class Flow:
    sock: socket.socket
    rate: float  # bytes per second
    credit: float = 0.0


def _open(source: str, target: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.bind((source, 0))
    s.connect(parse_host_port(target))
    return s


def _load(path: Path, flows: dict[tuple[str, str], Flow]) -> None:
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # being written: the next tick reads it whole
    wanted = {(f["source"], f["target"]): float(f["bytes_per_second"])
              for f in spec.get("flows", []) if float(f["bytes_per_second"]) > 0}
    for key in [k for k in flows if k not in wanted]:
        flows.pop(key).sock.close()
    for key, rate in wanted.items():
        if key in flows:
            flows[key].rate = rate
            continue
        try:
            flows[key] = Flow(_open(*key), rate)
        except OSError:
            continue  # the tunnel address is not up yet: the next change retries


def run(path: Path) -> None:
    flows: dict[tuple[str, str], Flow] = {}
    payload = b"\0" * PACKET
    seen = -1.0
    last = time.monotonic()
    while True:
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = seen
        if mtime != seen:
            seen = mtime
            _load(path, flows)
        now = time.monotonic()
        elapsed, last = now - last, now
        for flow in flows.values():
            flow.credit = min(flow.credit + flow.rate * elapsed, flow.rate * BURST_SECONDS
                              + PACKET)
            while flow.credit >= PACKET:
                flow.credit -= PACKET
                try:
                    flow.sock.send(payload)
                except OSError:
                    flow.credit = 0.0
                    break
        time.sleep(TICK)


if __name__ == "__main__":
    run(Path(sys.argv[1]))
