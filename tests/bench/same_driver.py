"""One measuring script for two revisions: compare_revisions.py --shared runs this file, from
the tree that has it, once per revision and figure group (not collected by pytest).

    .venv/bin/python tests/bench/same_driver.py TREE GROUP

TREE's ``probes`` (and the responders and lab helpers under its ``tests``, which are not
timed) come first on ``sys.path``; the timing loops, counts and clocks are this file's, the
same for every revision. Where the sans-I/O signatures changed (the shared driver's
``datagrams_to_send(now)`` / ``receive_datagram(data, addr, now)``), the call is adapted by
signature, outside the timed span's logic. Prints ``FIGURE name value unit lower|higher``
lines (which direction is better).

Groups: ``wireguard`` (client CPU per in-memory handshake, us), ``ikev2`` (initiator thread CPU
per in-memory SA_INIT+IKE_AUTH per proposal, ms), ``openvpn`` (reset probes per second
sequential and client CPU per tls probe against a real OpenVPN server, in a lab namespace),
``ikev2_lab`` (auth probe wall time against strongSwan, ms), ``agent`` (TCP connect and UDP
request/response probes per CPU-second through ``checks.base.execute``).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

TREE = sys.argv[1]
sys.path.insert(0, TREE)
os.chdir(TREE)

PEER = ("192.0.2.1", 51820)
WALL = 1_800_000_000 * 10**9
PROPOSALS = ("aes256gcm16-prfsha256-curve25519", "aes256gcm16-prfsha256-ecp256",
             "aes256gcm16-prfsha384-ecp384", "aes256-sha256-modp2048")


def figure(name: str, value: float, unit: str, lower_is_better: bool = True) -> None:
    better = "lower" if lower_is_better else "higher"
    print(f"FIGURE {name} {value:.6g} {unit} {better}", flush=True)


def _takes_addr(method: Callable[..., Any]) -> bool:
    """The shared driver's ``receive_datagram(data, addr, now)`` (else the older forms)."""
    return "addr" in inspect.signature(method).parameters


def wireguard(rounds: int = 2000, repeats: int = 5) -> None:
    from probes.protocols import wireguard as wg
    from tests.wireguard.wg_responder import Responder

    server, client = os.urandom(32), os.urandom(32)
    responder = Responder(server, wg.public_key(client))
    conn: Any = wg.WireGuardInitiator(  # Any: two revisions' signatures
        wg.InitiatorConfig(client, wg.public_key(server)))
    shared = _takes_addr(conn.receive_datagram)
    totals = []
    for _ in range(repeats):
        spent = 0
        for i in range(rounds):
            t0 = time.thread_time_ns()
            conn.initiate(float(i), WALL)
            if shared:
                ((message, _),) = conn.datagrams_to_send(float(i))
            else:
                (message,) = conn.datagrams_to_send()
            t1 = time.thread_time_ns()
            reply = responder.handle(message)
            assert reply is not None
            t2 = time.thread_time_ns()
            if shared:
                conn.receive_datagram(reply, PEER, float(i))
            else:
                conn.receive_datagram(reply, float(i))
            event = conn.next_event()
            t3 = time.thread_time_ns()
            assert isinstance(event, wg.HandshakeCompleted)
            spent += (t1 - t0) + (t3 - t2)
        totals.append(spent / rounds / 1e3)
    figure("wireguard client CPU/handshake", statistics.median(totals), "us")


def ikev2(runs: int = 200) -> None:
    from probes.protocols.ikev2.initiator import AuthCompleted, Initiator, InitiatorConfig
    from probes.protocols.ikev2.proposals import parse_ike_proposals
    from tests.ikev2.fake_responder import FakeResponder

    shared = _takes_addr(Initiator.receive_datagram)

    def one(proposal: str) -> float:
        responder = FakeResponder(proposal=proposal)
        t = time.thread_time_ns()
        ini: Any = Initiator(InitiatorConfig(  # Any: two revisions' signatures
            local_address=("198.51.100.7", 40000), remote_address=("192.0.2.1", 500),
            proposals=parse_ike_proposals((proposal,)), psk=b"secret", remote_id="node.test"))
        ini.start(0.0)
        out = ini.datagrams_to_send(0.0)
        spent = time.thread_time_ns() - t
        events: list[object] = []
        for _ in range(2):
            reply = responder.handle(out[0][0])
            assert reply is not None
            t = time.thread_time_ns()
            if shared:
                ini.receive_datagram(reply, out[0][1], 0.0)
            else:
                ini.receive_datagram(reply, 0.0, nat_t=out[0][1] == 4500)
            out = ini.datagrams_to_send(0.0)
            events = list(iter(ini.next_event, None))
            spent += time.thread_time_ns() - t
        assert any(isinstance(e, AuthCompleted) for e in events)
        return spent / 1e6

    for proposal in PROPOSALS:
        for _ in range(20):  # warm-up
            one(proposal)
        figure(f"ikev2 initiator {proposal.split('-')[-1]}",
               statistics.median(one(proposal) for _ in range(runs)), "ms")


async def _sequential(run: Callable[[], Awaitable[Any]], count: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for ``count`` sequential probes; all must pass."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(count):
        result = await run()
        assert result.ok, (result.reason, result.detail)
    return time.perf_counter() - wall0, time.process_time() - cpu0


def openvpn(resets: int = 500, tls_probes: int = 60) -> None:
    from probes.checks.openvpn import Level, run_level
    from probes.lab import Lab
    from tests.openvpn.test_lab_openvpn import params_for

    with Lab("samedrv") as lab:
        node = lab.add_host("node")
        server = lab.start_openvpn(node, proto="udp", wrap="tls-crypt", port=1194,
                                   extra=["--connect-freq-initial", "1000000", "10"])
        params = params_for(server)
        with node.entered():
            asyncio.run(_sequential(lambda: run_level(params, 5.0, Level.RESET), 20))
            reset = [asyncio.run(_sequential(lambda: run_level(params, 5.0, Level.RESET),
                                             resets)) for _ in range(3)]
            tls = [asyncio.run(_sequential(lambda: run_level(params, 5.0, Level.TLS),
                                           tls_probes)) for _ in range(3)]
    figure("openvpn reset probes/s", statistics.median(resets / wall for wall, _ in reset),
           "/s", lower_is_better=False)
    figure("openvpn tls probe client CPU",
           statistics.median(cpu / tls_probes for _, cpu in tls) * 1e3, "ms")


def ikev2_lab(probes: int = 50) -> None:
    from probes.checks.ikev2 import Ikev2Params, run_level
    from probes.lab import Lab

    with Lab("samedrvike") as lab:
        node, agent = lab.add_host("node"), lab.add_host("agent")
        ike = lab.start_strongswan(node)
        p = Ikev2Params(host=node.address, psk=ike.psk, local_id=ike.remote_id,
                        remote_id=ike.local_id, proposals=("aes256gcm16-prfsha256-ecp256",))

        async def walls() -> list[float]:
            return [(await run_level(p, 5.0, "auth")).duration_seconds for _ in range(probes)]

        with agent.entered():
            figure("ikev2 auth probe wall (strongSwan)",
                   statistics.median(asyncio.run(walls())) * 1e3, "ms")


def agent(seconds: float = 5.0, concurrency: int = 64) -> None:
    import uvloop

    from probes.checks import l4
    from probes.checks.base import execute
    from tests.bench.test_agent_bench import DNS_QUERY, TARGETS

    ports = []
    for sock_type in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, sock_type) as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    targets = subprocess.Popen([sys.executable, "-c", TARGETS, *map(str, ports)])
    try:
        time.sleep(0.5)
        tcp = l4.TcpParams(host="127.0.0.1", port=ports[0])
        udp = l4.UdpParams(host="127.0.0.1", port=ports[1], send=DNS_QUERY,
                           expect_prefix=DNS_QUERY[:2] + b"\x81\x80")
        for name, kind, params in (("tcp", l4.TCP, tcp), ("udp", l4.UDP, udp)):
            async def closed_loop(kind: Any = kind, params: Any = params) -> tuple[int, float]:
                done = 0
                loop = asyncio.get_running_loop()
                end = loop.time() + seconds

                async def worker() -> None:
                    nonlocal done
                    while loop.time() < end:
                        result = await execute(kind, params, 1.0)
                        assert result.ok, result.reason
                        done += 1

                cpu0 = time.process_time()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                return done, time.process_time() - cpu0

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                done, cpu = runner.run(closed_loop())
            figure(f"agent {name} probes/CPU-s", done / cpu, "/CPU-s", lower_is_better=False)
    finally:
        targets.terminate()
        targets.wait(5)


GROUPS: dict[str, Callable[[], None]] = {
    "wireguard": wireguard, "ikev2": ikev2, "openvpn": openvpn, "ikev2_lab": ikev2_lab,
    "agent": agent}

if __name__ == "__main__":
    import probes

    # the revision measured, never this file's own tree by accident
    assert os.path.realpath(probes.__file__).startswith(os.path.realpath(TREE) + os.sep)
    GROUPS[sys.argv[2]]()
