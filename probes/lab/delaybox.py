"""A userspace delay line for the lab: ``python -m probes.lab.delaybox TUN DELAY_MS [LOSS_PCT]``.

The kernel here has no netem. The router sends a host's packets into this TUN device by policy
routing; this program holds each packet for DELAY_MS (optionally dropping LOSS_PCT of them) and
writes it back into the TUN, where the kernel routes it on normally (its input interface is now
the TUN, so the policy rule does not match again and there is no loop).
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import os
import random
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


# wake this long before a packet is due and spin the rest: select() timeouts overshoot by tens
# of microseconds, more under load, and the box exists to add an exact delay
SPIN_SECONDS = 0.0002


def serve(fd: int, delay: float, loss: float, rng: random.Random) -> None:
    pending: list[tuple[float, int, bytes]] = []
    counter = 0
    while True:
        timeout = max(0.0, pending[0][0] - time.monotonic() - SPIN_SECONDS) if pending else None
        readable, _, _ = select.select([fd], [], [], timeout)
        if readable:
            # drain everything queued, each packet stamped as it is read
            while True:
                try:
                    packet = os.read(fd, 65535)
                except BlockingIOError:
                    break
                if rng.random() >= loss:
                    counter += 1
                    heapq.heappush(pending, (time.monotonic() + delay, counter, packet))
        if pending and pending[0][0] - time.monotonic() <= SPIN_SECONDS:
            while time.monotonic() < pending[0][0]:
                pass
        while pending and pending[0][0] <= time.monotonic():
            os.write(fd, heapq.heappop(pending)[2])


def _realtime() -> None:
    """Run ahead of the processes under test when the machine is busy (best effort)."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    name, delay_ms = argv[0], float(argv[1])
    loss = float(argv[2]) / 100 if len(argv) == 3 else 0.0
    fd = open_tun(name)
    os.set_blocking(fd, False)
    _realtime()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"delaybox {name}: delay {delay_ms} ms, loss {loss:.0%}", flush=True)
    serve(fd, delay_ms / 1000.0, loss, random.Random())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
