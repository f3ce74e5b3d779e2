"""Flood a WireGuard server with mac1-valid initiations from an unknown key (lab load test).

Each initiation passes mac1, so wireguard-go queues it and spends a DH on it before finding that
the key is unknown; at >= 128 queued handshakes it goes "under load" and answers with cookie
replies. Run as: python -m tests.wireguard.wg_flood HOST PORT SERVER_PUBLIC_KEY SECONDS
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from probes.protocols import wireguard as wg


def main(argv: list[str]) -> int:
    host, port, server_key, seconds = argv[0], int(argv[1]), argv[2], float(argv[3])
    config = wg.InitiatorConfig(os.urandom(32), wg.decode_key(server_key))
    conn = wg.WireGuardInitiator(config)
    base = time.time_ns()
    messages = [conn.initiate(0.0, base + i) for i in range(256)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, port))
    sock.setblocking(False)
    end = time.monotonic() + seconds
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the test stops us early: still report
    try:
        _flood(sock, messages, end, counts := [0, 0])
    finally:
        sent, cookies = counts
        print(f"sent {sent} initiations, got {cookies} cookie replies", flush=True)
    return 0


def _flood(sock: socket.socket, messages: list[bytes], end: float, counts: list[int]) -> None:
    while time.monotonic() < end:
        for message in messages:
            try:
                sock.send(message)
                counts[0] += 1
            except OSError:
                pass
        try:
            while True:
                if sock.recv(256)[0] == wg.MESSAGE_COOKIE_REPLY:
                    counts[1] += 1
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
