"""The user-path checks against real servers (root; marker ``lab``): a node running wireguard-go,
OpenVPN 2.6 (UDP and TCP) and strongSwan (kernel-libipsec, a remote-access pool handing out
inner addresses and INTERNAL_IP4_DNS) that forwards and masquerades its clients to an
"internet" lab host holding a real resolver (unbound) and the reflector. Each fault of the
node's egress or of its resolver is found with its own reason while the older session checks
still pass.

One lab for the module (the servers take seconds to start); every test puts back what it broke.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from probes.agent.plan import PlannedCheck, plan_target
from probes.checks.base import CheckResult, execute
from probes.config import Target
from probes.lab import Host, Lab, WgPeer, wg_keypair, wg_psk
from probes.lab.egress import (
    REFLECTOR_PORT,
    Resolver,
    enable_egress,
    set_forwarding,
    set_masquerade,
    shape_uplink,
    start_https,
    start_reflector,
)
from probes.lab.openvpn import OpenVPNServer
from probes.model import Reason
from tests.conftest import lab_unavailable

pytestmark = [pytest.mark.lab, pytest.mark.wireguard, pytest.mark.openvpn, pytest.mark.ikev2]

AGENT_TUNNEL = "10.201.0.2/32"
IKE_POOL = "10.212.0.0/24"
NAME = "probe.user.lab"
WWW = "www.user.lab"  # the HTTPS server's certificate name (the transaction's server_name)


@dataclass
class World:
    lab: Lab
    node: Host
    agent: Host
    internet: Host
    resolver: Resolver
    subnets: list[str]
    checks: list[PlannedCheck]
    bursts: list[PlannedCheck]  # the throughput checks, run apart (they take a second each)
    planned: list[PlannedCheck]  # every planned check (the handshakes and TLS checks too)
    https: Callable[[bool], None]  # start (True) or stop (False) the HTTPS server


def _write(path: Path, text: str) -> str:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


def _targets(lab: Lab, node: Host, internet: Host) -> tuple[list[Target], list[str]]:
    keys, psk = wg_keypair(), wg_psk()
    wg = lab.start_wireguard(node, peers=[WgPeer(keys.public, AGENT_TUNNEL, psk)])
    push = ["--push", f"dhcp-option DNS {internet.address}"]
    udp = lab.start_openvpn(node, proto="udp", extra=push)
    tcp = lab.start_openvpn(node, proto="tcp", extra=push)
    # remote access: an inner address and the resolver out of a pool (CP), any destination
    ike = lab.start_strongswan(node, remote_id="%any", local_ts="0.0.0.0/0", pool=IKE_POOL,
                               pool_dns=[internet.address])
    user_path = {"egress": {"targets": [{"name": "internet", "address": internet.address,
                                         "udp_port": REFLECTOR_PORT}],
                            "echo_count": 3, "echo_interval": 0.02},
                 "dns": {"name": NAME, "expect": [internet.address], "attempt_timeout": 0.5},
                 "throughput": {"reflector": f"{internet.address}:{REFLECTOR_PORT}",
                                "rate": 1_000_000, "duration": 0.5, "min_rate": 400_000,
                                "max_queueing_delay": 0.2},
                 "transaction": {"address": internet.address, "server_name": WWW,
                                 "ca_file": str(lab.pki().ca_file), "expect_status": [200],
                                 "connect_timeout": 1.0}}

    def openvpn(server: OpenVPNServer) -> dict[str, object]:
        return {"port": server.port, "proto": server.proto, "level": "tunnel",
                "ca_file": str(server.ca_file), "cert_file": str(server.client.cert),
                "key_file": str(server.client.key), "tls_crypt_file": str(server.wrap_key_file),
                "echo_count": 3, "echo_interval": 0.02}

    wg_section = {"port": wg.port, "server_public_key": wg.public_key,
                  "private_key_file": _write(lab.dir / "agent.key", keys.private),
                  "preshared_key_file": _write(lab.dir / "agent.psk", psk),
                  "tunnel_address": AGENT_TUNNEL, "canary": wg.tunnel_address,
                  "echo_count": 3, "echo_interval": 0.02,
                  "dns_resolver": internet.address}
    ike_section = {"psk_file": str(ike.psk_file), "ping": ike.inner_address, "level": "tunnel",
                   "request_config": True, "echo_count": 3, "remote_id": "node.lab"}
    common = {"pool": "p", "pop": "lab", "region": "r", "address": node.address,
              "user_path": user_path}
    targets = [
        msgspec.convert({"id": "n-udp", **common, "wireguard": wg_section,
                         "openvpn": openvpn(udp), "ikev2": ike_section}, Target),
        msgspec.convert({"id": "n-tcp", **common, "openvpn": openvpn(tcp)}, Target),
    ]
    return targets, ["10.201.0.0/24", f"{udp.subnet}/24", f"{tcp.subnet}/24", IKE_POOL]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    with Lab("userpath") as lab:
        node, agent, internet = (lab.add_host(n) for n in ("node", "agent", "internet"))
        resolver = Resolver(lab, internet, "user.lab", {NAME: internet.address})
        resolver.start()
        start_reflector(internet)
        www = lab.pki().issue(WWW, server=True)
        running: list[subprocess.Popen[bytes]] = []

        def https(on: bool) -> None:
            for proc in running:
                lab.stop_process(proc)
            running.clear()
            if on:
                running.append(start_https(internet, str(www.cert), str(www.key)))

        https(True)
        targets, subnets = _targets(lab, node, internet)
        enable_egress(node, subnets)
        planned = [c for t in targets for c in plan_target(t, lab.dir, lab.dir / "state")]
        sessions = ("wireguard.session", "openvpn.tunnel", "ikev2.tunnel")
        checks = [c for c in planned if c.kind.name in sessions
                  or c.kind.name.endswith((".egress", ".dns", ".transaction"))]
        bursts = [c for c in planned if c.kind.name.endswith(".throughput")]
        yield World(lab, node, agent, internet, resolver, subnets, checks, bursts, planned,
                    https)


def _run_all(world: World, checks: list[PlannedCheck] | None = None) -> dict[str, CheckResult]:
    """Every check once, from the agent: each tunnel's checks one after the other (one client
    identity per server; WireGuard initiations at least 20 ms apart), the tunnels side by
    side."""
    groups: dict[tuple[str, str], list[PlannedCheck]] = {}
    for check in world.checks if checks is None else checks:
        groups.setdefault((check.node, check.kind.name.split(".")[0]), []).append(check)
    out: dict[str, CheckResult] = {}

    async def one_tunnel(group: list[PlannedCheck]) -> None:
        for check in group:
            out[check.key] = await execute(check.kind, check.params, 5.0)
            await asyncio.sleep(0.03)

    async def every_tunnel() -> None:
        await asyncio.gather(*(one_tunnel(g) for g in groups.values()))

    with world.agent.entered():
        asyncio.run(every_tunnel())
    return out


def _assert(results: dict[str, CheckResult],
            expect: Callable[[str], Reason]) -> None:
    assert len(results) == 16, sorted(results)  # 4 kinds x (WireGuard, OpenVPN x 2, IKEv2)
    wrong = {key: (r.reason.value, r.detail) for key, r in results.items()
             if r.reason is not expect(key.rsplit("/", 1)[-1])}
    assert not wrong, wrong


def _by_kind(egress: Reason, dns: Reason,
             transaction: Reason = Reason.OK) -> Callable[[str], Reason]:
    def expect(check: str) -> Reason:
        if check.endswith(".egress"):
            return egress
        if check.endswith(".transaction"):
            return transaction
        return dns if check.endswith(".dns") else Reason.OK  # the session checks still pass
    return expect


def test_a_healthy_node_passes_every_user_path_check(world: World) -> None:
    results = _run_all(world)
    _assert(results, _by_kind(Reason.OK, Reason.OK))
    egress = next(r for k, r in results.items() if k.endswith("openvpn.egress"))
    assert egress.quality is not None and egress.quality.received == 6  # 3 ICMP, 3 UDP
    assert egress.facts["egress_internet_loss_ratio"] == 0.0
    for pushed in ("openvpn.dns", "ikev2.dns"):  # dhcp-option DNS; INTERNAL_IP4_DNS
        dns = next(r for k, r in results.items() if k.endswith(pushed))
        assert dns.facts["dns_resolver"] == world.internet.address  # pushed, not configured
        assert dns.facts["dns_answer"] == world.internet.address
    for key, result in results.items():
        if key.endswith(".transaction"):  # TCP, TLS 1.3 verified against the lab CA, HEAD
            assert result.facts["transaction_http_status"] == 200, key
            assert result.facts["transaction_tls_version"] == "TLSv1.3", key
            assert {"connect", "tls", "http"} <= set(result.phases), key
    ike = next(r for k, r in results.items() if k.endswith("ikev2.egress"))
    assert ike.facts["inner_source"] == ike.facts["internal_address"]  # from the pool
    assert str(ike.facts["internal_address"]).startswith("10.212.0.")
    assert ike.quality is not None and ike.quality.received == 6


def test_forwarding_off_is_egress_failed(world: World) -> None:
    set_forwarding(world.node, False)
    try:
        results = _run_all(world)
    finally:
        set_forwarding(world.node, True)
    _assert(results, _by_kind(Reason.EGRESS_FAILED, Reason.DNS_TIMEOUT, Reason.TIMEOUT))
    egress = next(r for k, r in results.items() if k.endswith("wireguard.egress"))
    assert "the node answers in the tunnel (3/3)" in egress.detail
    assert "internet: 0/6 answered" in egress.detail


def test_a_missing_nat_rule_is_egress_failed(world: World) -> None:
    set_masquerade(world.node, world.subnets, False)
    try:
        results = _run_all(world)
    finally:
        set_masquerade(world.node, world.subnets, True)
    _assert(results, _by_kind(Reason.EGRESS_FAILED, Reason.DNS_TIMEOUT, Reason.TIMEOUT))


def test_a_black_hole_beyond_the_node_is_egress_failed(world: World) -> None:
    world.lab.partition(world.internet)
    try:
        results = _run_all(world)
    finally:
        world.lab.heal(world.internet)
    _assert(results, _by_kind(Reason.EGRESS_FAILED, Reason.DNS_TIMEOUT, Reason.TIMEOUT))


def test_a_stopped_resolver_is_dns_unreachable(world: World) -> None:
    world.resolver.stop()
    try:
        results = _run_all(world)
    finally:
        world.resolver.start()
    _assert(results, _by_kind(Reason.OK, Reason.DNS_UNREACHABLE))
    dns = next(r for k, r in results.items() if k.endswith("wireguard.dns"))
    assert "port unreachable" in dns.detail


def test_a_resolver_answering_servfail_is_dns_servfail(world: World) -> None:
    world.resolver.start(servfail=True)
    try:
        results = _run_all(world)
    finally:
        world.resolver.start()
    _assert(results, _by_kind(Reason.OK, Reason.DNS_SERVFAIL))


def test_transaction_faults_beyond_the_node_have_their_own_reasons(world: World) -> None:
    """The HTTPS server stopped: the target's kernel answers the SYN with a RST (refused); a
    certificate for another name: cert-verify-failed; the other checks are not this one's."""
    transactions = [c for c in world.checks if c.kind.name.endswith(".transaction")]
    assert len(transactions) == 4
    world.https(False)
    try:
        stopped = _run_all(world, transactions)
    finally:
        world.https(True)
    assert {k: r.reason for k, r in stopped.items()} == {
        c.key: Reason.REFUSED for c in transactions}, {k: r.detail for k, r in stopped.items()}
    assert all("nothing listens" in r.detail for r in stopped.values())
    other = [dataclasses.replace(c, params=msgspec.structs.replace(
        c.params, transaction=msgspec.structs.replace(c.params.transaction,
                                                      server_name="other.user.lab")))
             for c in transactions]
    wrong = _run_all(world, other)
    assert {r.reason for r in wrong.values()} == {Reason.CERT_VERIFY_FAILED}, {
        k: (r.reason, r.detail) for k, r in wrong.items()}


def test_a_throttled_uplink_is_low_throughput_while_everything_else_passes(world: World) -> None:
    assert len(world.bursts) == 4

    def bursts_one_by_one() -> dict[str, CheckResult]:  # side by side they share the uplink
        return {k: r for burst in world.bursts for k, r in _run_all(world, [burst]).items()}

    idle = bursts_one_by_one()
    assert all(r.ok for r in idle.values()), {k: (r.reason, r.detail) for k, r in idle.items()}
    for result in idle.values():
        q = result.quality
        assert q is not None and q.throughput_bytes_per_second is not None
        assert q.throughput_bytes_per_second * 8 > 400_000
        assert q.queueing_delay_seconds is not None
    shape_uplink(world.node, 150)
    try:
        shaped = {**bursts_one_by_one(), **_run_all(world)}
    finally:
        shape_uplink(world.node, None)
    low = {k: r for k, r in shaped.items() if k.endswith(".throughput")}
    assert {r.reason for r in low.values()} == {Reason.THROUGHPUT_LOW}, {
        k: (r.reason, r.detail) for k, r in low.items()}
    for result in low.values():
        q = result.quality
        assert q is not None and q.throughput_bytes_per_second is not None
        assert q.throughput_bytes_per_second * 8 < 300_000, result.detail
    rest = {k: r for k, r in shaped.items() if k not in low}
    assert all(r.ok for r in rest.values()), {k: (r.reason, r.detail) for k, r in rest.items()}


def _planned(world: World, name: str, target: str = "n-udp") -> PlannedCheck:
    return next(c for c in world.planned if c.kind.name == name and c.node == target)


@pytest.mark.parametrize(("tunnel", "other"), [("wireguard.egress", "wireguard.handshake"),
                                               ("openvpn.egress", "openvpn.tls"),
                                               ("ikev2.egress", "ikev2.tunnel")])
def test_a_check_with_the_same_identity_does_not_cut_a_tunnel_in_use(
        world: World, tunnel: str, other: str) -> None:
    """One agent, one identity per server: a second handshake with it while a tunnel carries
    echoes took the tunnel away (wireguard-go sends to the newest endpoint with the newest
    keys; OpenVPN drops the older session of a common name), and the echoes were lost: the
    user-path e2e's one-vantage fault showed another vantage's egress as lossy when the mesh's
    re-probe request ran it across that vantage's handshake check."""
    egress = _planned(world, tunnel)
    assert egress.params.egress is not None
    long = msgspec.structs.replace(egress.params, egress=msgspec.structs.replace(
        egress.params.egress, echo_count=12, echo_interval=0.05))  # 24 echoes over 1.2 s

    async def overlapping() -> tuple[CheckResult, CheckResult]:
        first = asyncio.create_task(execute(egress.kind, long, 8.0))
        await asyncio.sleep(0.4)
        second = await execute(_planned(world, other).kind, _planned(world, other).params, 8.0)
        return await first, second

    with world.agent.entered():
        echoes, handshake = asyncio.run(overlapping())
    assert handshake.ok, (handshake.reason, handshake.detail)
    assert echoes.ok and echoes.quality is not None, (echoes.reason, echoes.detail)
    assert echoes.quality.received == echoes.quality.sent == 24, echoes.quality
