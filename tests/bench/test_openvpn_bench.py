"""OpenVPN probe throughput and CPU against a real OpenVPN 2.6 server over loopback.

The probe runs in the server's own namespace and targets the server's address there, so packets
go over the kernel's local path (loopback), not the lab's veth links. The server is started with
``--connect-freq-initial 1000000 10``: its default (100 stateless reset answers per 10 s) would
otherwise cap ``reset`` probes at 10/s, which measures the server's rate limit, not the probe;
how many of 150 back-to-back probes such a default server answers is printed too.

Figures:
* ``reset`` probes per second, sequential and 25 in flight, each a complete check (socket,
  reset, answer, close);
* client CPU (process time) per ``tls`` probe (reset, TLS 1.3, key-method 2, EXIT) and its wall
  time, beside a floor: the CPU of a bare in-memory TLS 1.3 handshake with the same certificates,
  client and server both in this process, so the floor includes server work and the ratio is
  conservative.
Asserts only that every probe succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import statistics
import time

import pytest

from probes.checks.openvpn import Level, OpenVPNParams, run_level
from probes.lab import Lab
from tests.openvpn.test_lab_openvpn import params_for

pytestmark = [pytest.mark.slow, pytest.mark.openvpn, pytest.mark.lab]

RESETS = 500
TLS_PROBES = 60


async def _sequential(params: OpenVPNParams, level: Level, count: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for ``count`` sequential probes; all must pass."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(count):
        result = await run_level(params, 5.0, level)
        assert result.ok, (result.reason, result.detail)
    return time.perf_counter() - wall0, time.process_time() - cpu0


async def _concurrent(params: OpenVPNParams, count: int, width: int) -> float:
    """Wall seconds for ``count`` reset probes, ``width`` in flight at a time."""
    wall0 = time.perf_counter()
    for _ in range(count // width):
        results = await asyncio.gather(*(run_level(params, 5.0, Level.RESET)
                                         for _ in range(width)))
        assert all(r.ok for r in results), [(r.reason, r.detail) for r in results if not r.ok]
    return time.perf_counter() - wall0


async def _answered(params: OpenVPNParams, count: int) -> int:
    results = [await run_level(params, 0.3, Level.RESET) for _ in range(count)]
    return sum(r.ok for r in results)


def _bare_tls_cpu(params: OpenVPNParams, server_cert: str, server_key: str, rounds: int) -> float:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(params.ca_file)
    client.load_cert_chain(str(params.cert_file), params.key_file)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(params.ca_file)
    server.load_cert_chain(server_cert, server_key)
    cpu0 = time.process_time()
    for _ in range(rounds):
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        c = client.wrap_bio(c_in, c_out)
        s = server.wrap_bio(s_in, s_out, server_side=True)
        for _ in range(10):
            for side in (c, s):
                with contextlib.suppress(ssl.SSLWantReadError):
                    side.do_handshake()
            s_in.write(c_out.read())
            c_in.write(s_out.read())
    return (time.process_time() - cpu0) / rounds


def test_openvpn_probe_bench(lab: Lab) -> None:
    node = lab.add_host("node")
    fast = lab.start_openvpn(node, proto="udp", wrap="tls-crypt", port=1194,
                             extra=["--connect-freq-initial", "1000000", "10"])
    default = lab.start_openvpn(node, proto="udp", wrap="tls-crypt", port=1195)
    fast_params, default_params = params_for(fast), params_for(default)
    with node.entered():
        asyncio.run(_sequential(fast_params, Level.RESET, 20))  # warm-up
        runs = [asyncio.run(_sequential(fast_params, Level.RESET, RESETS)) for _ in range(3)]
        concurrent = [asyncio.run(_concurrent(fast_params, RESETS, 25)) for _ in range(3)]
        limited = asyncio.run(_answered(default_params, 150))
        tls_runs = [asyncio.run(_sequential(fast_params, Level.TLS, TLS_PROBES))
                    for _ in range(3)]
    reset_rate = statistics.median(RESETS / wall for wall, _ in runs)
    reset_cpu = statistics.median(cpu / RESETS for _, cpu in runs)
    tls_wall = statistics.median(wall / TLS_PROBES for wall, _ in tls_runs)
    tls_cpu = statistics.median(cpu / TLS_PROBES for _, cpu in tls_runs)
    floor = _bare_tls_cpu(fast_params, str(fast.server_cert.cert), str(fast.server_cert.key), 200)
    print(f"\nopenvpn reset probes: {reset_rate:,.0f}/s sequential (median of 3 x {RESETS}), "
          f"client CPU {reset_cpu * 1e6:,.0f} us/probe")
    print(f"openvpn reset probes, 25 in flight: "
          f"{statistics.median(RESETS / wall for wall in concurrent):,.0f}/s")
    print(f"against the default connect-freq-initial (100 per 10 s): {limited} of 150 "
          "back-to-back reset probes answered")
    print(f"openvpn tls probe: client CPU {tls_cpu * 1e3:.2f} ms, wall {tls_wall * 1e3:.2f} ms "
          f"(median of 3 x {TLS_PROBES})")
    print(f"bare in-memory TLS 1.3 handshake (client+server CPU): {floor * 1e3:.2f} ms; "
          f"tls probe / floor = {tls_cpu / floor:.2f}x")
