"""Tiny TCP accept + UDP echo servers for L4 tests, run as ``python servers.py TCP_PORT UDP_PORT``.

The UDP server answers ``b"pong:" + request``, so a test can check the expected-reply prefix.
"""

from __future__ import annotations

import socket
import sys
import threading


def tcp_accept(port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1024)
    while True:
        conn, _ = srv.accept()
        conn.close()


def udp_echo(port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("0.0.0.0", port))
    while True:
        data, peer = srv.recvfrom(65535)
        srv.sendto(b"pong:" + data, peer)


if __name__ == "__main__":
    threading.Thread(target=tcp_accept, args=(int(sys.argv[1]),), daemon=True).start()
    udp_echo(int(sys.argv[2]))
