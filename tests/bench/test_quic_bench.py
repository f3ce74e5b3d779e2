"""QUIC / MASQUE / MTU benchmarks (slow; figures are printed, never asserted). Run with

    .venv/bin/pytest tests/bench/test_quic_bench.py -m slow -s

* capsule parser throughput on a stream of 1,200-byte DATAGRAM capsules fed in 1,350-byte DATA
  frame chunks, as a ratio to a floor that only copies the same bytes;
* ``quic.handshake`` on loopback against the lab MASQUE server: median and min of 20, and the
  ratio to a plain UDP echo round trip on the same path (the floor);
* CONNECT-UDP datagram RTT p50 through the proxy vs. the direct UDP echo RTT (the proxy's cost);
* ``mtu.udp`` wall time on loopback (everything passes: one probe) - the search itself is
  measured in the lab tests' facts (``probes``).
"""

from __future__ import annotations

import asyncio
import select
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from probes.checks import quic
from probes.checks.base import execute
from probes.lab.pki import PKI
from probes.protocols import capsules as cap

pytestmark = [pytest.mark.slow, pytest.mark.quic]


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_capsule_parser_throughput() -> None:
    wire = b"".join(cap.encode_capsule(cap.CapsuleType.DATAGRAM,
                                       cap.encode_http_datagram(0, bytes(1200)))
                    for _ in range(20_000))
    chunks = [wire[i:i + 1350] for i in range(0, len(wire), 1350)]

    def parse() -> float:
        parser = cap.CapsuleParser()
        start = time.perf_counter()
        count = sum(len(parser.feed(c)) for c in chunks)
        took = time.perf_counter() - start
        assert count == 20_000
        return took

    def floor() -> float:
        buffer = bytearray()
        start = time.perf_counter()
        for c in chunks:
            buffer += c
            del buffer[:len(buffer) // 2]
        return time.perf_counter() - start

    took = statistics.median(parse() for _ in range(5))
    base = statistics.median(floor() for _ in range(5))
    print(f"\ncapsule parser: {20_000 / took:,.0f} capsules/s, "
          f"{len(wire) / took / 1e6:,.0f} MB/s; {took / base:.1f}x the copy-only floor")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, Path]]:
    pki = PKI(tmp_path_factory.mktemp("pki"))
    cert = pki.issue("masque.lab", server=True)
    port, echo = _free_udp_port(), _free_udp_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "probes.lab.masque", "--listen", f"127.0.0.1:{port}",
         "--cert", str(cert.cert), "--key", str(cert.key), "--echo", f"127.0.0.1:{echo}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15.0)
        assert ready and b"ready" in proc.stdout.readline()
        yield port, echo, pki.ca_file
    finally:
        proc.terminate()
        proc.wait(5)


def _udp_echo_rtts(port: int, n: int) -> list[float]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.1", port))
        s.settimeout(1.0)
        out = []
        for _ in range(n):
            start = time.perf_counter()
            s.send(b"x" * 32)
            s.recv(2048)
            out.append(time.perf_counter() - start)
    return out


def test_handshake_and_connect_udp_latency(server: tuple[int, int, Path]) -> None:
    port, echo, ca = server
    params = quic.QuicParams(host="127.0.0.1", port=port, server_name="masque.lab",
                             ca_file=str(ca))
    handshakes = []
    for _ in range(20):
        result = asyncio.run(execute(quic.HANDSHAKE, params, 5.0))
        assert result.ok, result
        handshakes.append(result.phases["handshake"])
    udp = _udp_echo_rtts(echo, 200)
    udp_p50 = statistics.median(udp)
    hs_p50 = statistics.median(handshakes)
    print(f"\nquic.handshake loopback: median {hs_p50 * 1e3:.2f} ms, min "
          f"{min(handshakes) * 1e3:.2f} ms (20 runs); UDP echo RTT p50 {udp_p50 * 1e6:.0f} us; "
          f"handshake = {hs_p50 / udp_p50:,.0f}x the UDP round-trip floor")
    masque = quic.QuicParams(host="127.0.0.1", port=port, server_name="masque.lab",
                             ca_file=str(ca), target=f"127.0.0.1:{echo}", echo_count=50,
                             echo_interval=0.005)
    result = asyncio.run(execute(quic.CONNECT_UDP, masque, 10.0))
    assert result.ok and result.quality is not None and result.quality.rtt_p50_seconds
    p50 = result.quality.rtt_p50_seconds
    print(f"CONNECT-UDP datagram RTT p50 {p50 * 1e6:.0f} us over 50 datagrams = "
          f"{p50 / udp_p50:.1f}x the direct UDP echo; whole check "
          f"{result.duration_seconds * 1e3:.0f} ms")
