"""IKEv2 probe cost: client CPU per exchange (in memory) and wall time against strongSwan.

Prints figures only (no timing assertions). Initiator CPU is the thread CPU clock around the
initiator's own calls (the in-memory responder's work between them is excluded). The peer
figure for the ratio is the WireGuard initiator's client CPU per handshake, measured in the same
run the same way (tests/bench/test_wireguard_bench.py), never a constant.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any

import pytest

from probes.checks.ikev2 import Ikev2Params, run_level
from probes.protocols.ikev2.initiator import AuthCompleted, Initiator, InitiatorConfig
from probes.protocols.ikev2.proposals import parse_ike_proposals
from tests.bench.figures import record
from tests.bench.test_wireguard_bench import client_cpu_per_handshake
from tests.ikev2.fake_responder import FakeResponder

pytestmark = [pytest.mark.ikev2, pytest.mark.slow]


@pytest.fixture(scope="module")
def wireguard_handshake_seconds() -> float:
    """The WireGuard initiator's thread CPU per completed handshake, measured now."""
    return client_cpu_per_handshake()[2] / 1e6


def _one_auth(proposal: str) -> float:
    """Initiator thread CPU seconds for SA_INIT+IKE_AUTH (the responder's work excluded)."""
    responder = FakeResponder(proposal=proposal)
    ours = 0
    t = time.thread_time_ns()
    ini = Initiator(InitiatorConfig(local_address=("198.51.100.7", 40000),
                                    remote_address=("192.0.2.1", 500),
                                    proposals=parse_ike_proposals((proposal,)), psk=b"secret",
                                    remote_id="node.test"))
    ini.start(0.0)
    out = ini.datagrams_to_send(0.0)
    ours += time.thread_time_ns() - t
    for _ in range(2):
        reply = responder.handle(out[0][0])
        assert reply is not None
        t = time.thread_time_ns()
        ini.receive_datagram(reply, out[0][1], 0.0)
        out = ini.datagrams_to_send(0.0)
        events = list(iter(ini.next_event, None))
        ours += time.thread_time_ns() - t
    assert any(isinstance(e, AuthCompleted) for e in events)
    return ours / 1e9


@pytest.mark.parametrize("proposal", ["aes256gcm16-prfsha256-curve25519",
                                      "aes256gcm16-prfsha256-ecp256",
                                      "aes256gcm16-prfsha384-ecp384",
                                      "aes256-sha256-modp2048"])
def test_initiator_cpu_per_auth(proposal: str, wireguard_handshake_seconds: float) -> None:
    ours = statistics.median(_one_auth(proposal) for _ in range(200))
    print(f"\n{proposal}: initiator CPU per SA_INIT+IKE_AUTH {ours * 1e3:.3f} ms "
          f"({1 / ours:.0f}/s per core); WireGuard handshake measured now "
          f"{wireguard_handshake_seconds * 1e3:.3f} ms; ratio "
          f"{ours / wireguard_handshake_seconds:.2f}x  (load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    record(f"IKEv2 initiator CPU per auth, {proposal.rsplit('-', 1)[-1]}", ours * 1e3, "ms",
           peer=wireguard_handshake_seconds * 1e3, peer_name="WireGuard handshake")


@pytest.mark.lab
def test_probe_wall_time_against_strongswan(lab: Any) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    ike = lab.start_strongswan(node)
    p = Ikev2Params(host=node.address, psk=ike.psk, local_id=ike.remote_id,
                    remote_id=ike.local_id, proposals=("aes256gcm16-prfsha256-ecp256",),
                    inner_address="10.211.0.7", echo_count=20, echo_interval=0.01)

    async def measure() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"init": [], "auth": [], "tunnel_rtt": []}
        for _ in range(3):  # init leaves half-open SAs: at most 3 (see checks/ikev2.py)
            out["init"].append((await run_level(p, 5.0, "init")).phases["sa_init"])
        for _ in range(50):
            out["auth"].append((await run_level(p, 5.0, "auth")).duration_seconds)
        for _ in range(5):
            r = await run_level(p, 10.0, "tunnel")
            assert r.quality is not None and r.quality.rtt_p50_seconds is not None
            out["tunnel_rtt"].append(r.quality.rtt_p50_seconds)
        return out

    with agent.entered():
        figures = asyncio.run(measure())
    for name, values in figures.items():
        print(f"\n{name}: median {statistics.median(values) * 1e3:.2f} ms, "
              f"min {min(values) * 1e3:.2f} ms over {len(values)}")
