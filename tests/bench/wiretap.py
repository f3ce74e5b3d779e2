"""Kernel-stamped wire times of UDP request/reply pairs, to tell the agent's own timing error
from the lab's (the delay box is a Python process; under load its delay drifts).

``SCRIPT`` runs in a lab namespace (``python -c SCRIPT IFACE PORT OUT``): an AF_PACKET socket on
the interface with ``SO_TIMESTAMPNS`` records, for every datagram to or from ``PORT``, the kernel's
timestamp as the packet passed the interface (outgoing at transmit, incoming at receive) and a
key from its payload. The capture's own lateness does not matter: the stamps are the kernel's.
:func:`wire_rtts` pairs requests with replies: key -> RTT on the wire.
"""

from __future__ import annotations

import struct
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import signal, socket, struct, sys
    iface, port, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    # ETH_P_ALL: a protocol-specific packet socket does not see outgoing packets
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))
    s.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)  # SO_RCVBUFFORCE: never drop a stamp
    s.setsockopt(socket.SOL_SOCKET, 35, 1)  # SO_TIMESTAMPNS
    s.bind((iface, 0))
    out = open(out_path, "wb", buffering=1 << 20)
    def stop(*_):
        out.close()
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while True:
        data, anc, _, _ = s.recvmsg(2048, 64)
        if len(data) < 28 or data[0] >> 4 != 4 or data[9] != 17:  # IPv4 UDP only
            continue
        ihl = (data[0] & 15) * 4
        sport, dport = struct.unpack_from("!HH", data, ihl)
        if dport == port:
            direction = 0
        elif sport == port:
            direction = 1
        else:
            continue
        stamp = 0
        for level, kind, value in anc:
            if level == socket.SOL_SOCKET and kind == 35:
                sec, nsec = struct.unpack("qq", value[:16])
                stamp = sec * 1_000_000_000 + nsec
        payload = data[ihl + 8:]
        key = payload[:2] + payload[4:]  # the reply differs from the query only in the flags
        out.write(struct.pack("!BqH", direction, stamp, len(key)) + key)
""")


def payload_key(payload: bytes) -> bytes:
    return payload[:2] + payload[4:]


def wire_rtts(path: Path) -> dict[bytes, float]:
    """key -> seconds between the request leaving and the reply arriving at the interface."""
    sent: dict[bytes, int] = {}
    rtts: dict[bytes, float] = {}
    data = path.read_bytes()
    at = 0
    while at + 11 <= len(data):
        direction, stamp, size = struct.unpack_from("!BqH", data, at)
        key = data[at + 11:at + 11 + size]
        at += 11 + size
        if direction == 0:
            sent[key] = stamp
        elif key in sent:
            rtts[key] = (stamp - sent.pop(key)) / 1e9
    return rtts
