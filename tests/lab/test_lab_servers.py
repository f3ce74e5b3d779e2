"""Lab self-tests: every real server works with its real client, impairments do what they say,
and teardown leaves nothing behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from probes.lab import Lab, WgPeer, leftovers, wg_keypair
from probes.lab.haproxy import Backend
from probes.lab.strongswan import StrongSwanServer, render_connection
from probes.lab.topology import wait_for
from probes.lab.wireguard import WireGuardServer

pytestmark = pytest.mark.lab


def _ping_loss(host, address: str, count: int, interval: float = 0.005) -> float:
    out = host.run(["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "1", address],
                   check=False, timeout=60).stdout
    match = re.search(r"(\d+(?:\.\d+)?)% packet loss", out)
    assert match, out
    return float(match.group(1)) / 100


def test_wireguard_go_client_pings_through_the_tunnel(lab: Lab) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    client_keys = wg_keypair()
    server = lab.start_wireguard(node, peers=[WgPeer(client_keys.public, "10.201.0.2/32")])
    client = WireGuardServer(lab, agent, port=51821, tunnel_address="10.201.0.2/24",
                             keys=client_keys)
    client.start([WgPeer(server.public_key, "10.201.0.0/24")])
    agent.run(["wg", "set", client.interface, "peer", server.public_key,
               "endpoint", f"{node.address}:{server.port}"])
    assert _ping_loss(agent, server.tunnel_address, 5, 0.1) < 1.0
    dump = server.dump().splitlines()
    peer_line = dump[1].split("\t")
    assert peer_line[0] == client_keys.public
    assert int(peer_line[4]) > 0, "server saw no handshake"


@pytest.mark.parametrize(("proto", "wrap"), [("udp", "tls-crypt"), ("udp", "tls-auth"),
                                             ("udp", "tls-crypt-v2"), ("tcp", "tls-crypt")])
def test_openvpn_client_connects(lab: Lab, proto: str, wrap: str) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    server = lab.start_openvpn(node, proto=proto, wrap=wrap)
    agent.popen(server.client_argv(), name="client")
    log = lab.dir / "agent-client.log"
    wait_for(lambda: "Initialization Sequence Completed" in log.read_text(), 60, "client")
    pushed = re.search(r"PUSH: Received control message: '(PUSH_REPLY[^']*)'", log.read_text())
    assert pushed and "ifconfig 10.8." in pushed.group(1)
    wait_for(lambda: "CLIENT_LIST" in server.status(), 30, "server status")


def test_strongswan_establishes_an_ike_sa(lab: Lab) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    responder = lab.start_strongswan(node)
    conf = render_connection("lab", local_addrs=agent.address, remote_addrs=node.address,
                             local_id="agent.lab", remote_id="node.lab",
                             proposals=responder.proposals, local_ts="10.211.0.2/32",
                             remote_ts=responder.local_ts, esp_proposals=["aes256gcm16"],
                             psk=responder.psk)
    initiator = StrongSwanServer(lab, agent, swanctl_conf=conf)
    initiator.start()
    result = initiator.swanctl(["--initiate", "--ike", "lab", "--timeout", "10"])
    assert "IKE_SA lab[1] established" in result.stdout
    sas = responder.list_sas()
    assert "ESTABLISHED" in sas and "agent.lab" in sas


def test_haproxy_answers_its_runtime_api(lab: Lab) -> None:
    node = lab.add_host("node")
    hap = lab.start_haproxy(node, servers=[Backend("n1", "10.77.9.2", 51820),
                                           Backend("n2", "10.77.9.3", 51820)])
    state = hap.command("show servers state vpn")
    rows = [line.split() for line in state.splitlines() if line[:1].isdigit() and " vpn " in line]
    assert [r[3] for r in rows] == ["n1", "n2"]
    assert hap.command("set server vpn/n1 state drain").strip() == ""
    drained = [line.split() for line in hap.command("show servers state vpn").splitlines()
               if " n1 " in line]
    assert drained[0][6] == "8", "srv_admin_state should be 8 (drain)"


def test_loss_injection_is_measured_within_bounds_and_partition_drops_all(lab: Lab) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    assert _ping_loss(agent, node.address, 50) == 0.0
    lab.set_loss(agent, 20)
    loss = _ping_loss(agent, node.address, 400)
    assert 0.10 <= loss <= 0.30, loss
    lab.partition(agent)
    assert _ping_loss(agent, node.address, 30) == 1.0
    lab.heal(agent)
    assert _ping_loss(agent, node.address, 50) == 0.0


def test_delay_box_adds_delay(lab: Lab) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    lab.set_delay(agent, 40)
    out = agent.run(["ping", "-n", "-q", "-c", "5", "-i", "0.05", node.address]).stdout
    rtt_min = float(re.search(r"= ([\d.]+)/", out).group(1))  # type: ignore[union-attr]
    assert rtt_min >= 40.0, out  # a lower bound proves the box is in the path
    lab.set_delay(agent, 0)
    out = agent.run(["ping", "-n", "-q", "-c", "3", "-i", "0.05", node.address]).stdout
    assert float(re.search(r"= ([\d.]+)/", out).group(1)) < 40.0  # type: ignore[union-attr]


def test_teardown_leaves_no_namespace_interface_or_process() -> None:
    from tests.conftest import lab_unavailable

    if reason := lab_unavailable():
        pytest.skip(reason)
    lab = Lab("teardown")
    node = lab.add_host("node")
    server = lab.start_wireguard(node)
    lab.set_delay(node, 5)
    pid = server.proc.pid if server.proc else 0
    lab_dir = lab.dir
    assert list(leftovers(lab.run_id)), "a running lab should be visible"
    lab.close()
    assert list(leftovers(lab.run_id)) == []
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert not server.socket_path.exists()
    assert not lab_dir.exists()


def test_teardown_happens_when_the_test_body_raises() -> None:
    from tests.conftest import lab_unavailable

    if reason := lab_unavailable():
        pytest.skip(reason)
    run_id = ""
    with pytest.raises(RuntimeError, match="boom"), Lab("raises") as lab:
        run_id = lab.run_id
        lab.add_host("node")
        raise RuntimeError("boom")
    assert list(leftovers(run_id)) == []
