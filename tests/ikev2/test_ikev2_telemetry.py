"""SA counts from ``swanctl --list-sas``: parser, fuzz, and the real thing in the lab."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.checks.ikev2 import Ikev2Params, run_level
from probes.checks.ikev2_telemetry import TelemetryError, collect, parse_list_sas
from probes.protocols.ikev2.initiator import AuthCompleted, ChildRequest, Initiator, InitiatorConfig
from probes.protocols.ikev2.proposals import parse_ike_proposals
from tests.sshd import command_server

pytestmark = pytest.mark.ikev2

SAMPLE = """\
lab: #6, ESTABLISHED, IKEv2, 818e1e172aa1c550_i cb9c752afdeb270b_r*
  local  'node.lab' @ 10.77.1.2[4500]
  remote 'agent.lab' @ 10.77.2.2[59795]
  AES_GCM_16-256/PRF_HMAC_SHA2_256/ECP_256
  established 2s ago, rekeying in 14145s
  net: #1, reqid 1, INSTALLED, TUNNEL-in-UDP, ESP:AES_GCM_16-256
    installed 0s ago, rekeying in 3300s, expires in 3960s
    in  c7b1e2a3 (-|0x00000000),    600 bytes,    10 packets
    local  10.210.0.1/32
    remote 10.211.0.0/16
(unnamed): #2, CONNECTING, IKEv2, 82f21de0e399aea2_i aa35e38738a70e61_r*
  local  '%any' @ 10.77.1.2[500]
  remote '%any' @ 10.77.2.2[38630]
  passive: IKE_INIT IKE_CERT_PRE IKE_AUTH
"""


def test_parse_list_sas() -> None:
    counts = parse_list_sas(SAMPLE)
    assert counts.ike_by_state == {"ESTABLISHED": 1, "CONNECTING": 1}
    assert (counts.ike_sas, counts.half_open, counts.child_sas) == (2, 1, 1)
    assert counts.summary()["child_by_state"] == {"INSTALLED": 1}
    assert parse_list_sas("").ike_sas == 0
    with pytest.raises(TelemetryError):
        parse_list_sas("no sas here\n")
    with pytest.raises(TelemetryError):
        parse_list_sas("  net: #1, reqid 1, INSTALLED, TUNNEL, ESP\n")


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab: #1,ESTABLISHEDIKEv2\n reqid_")), max_size=200))
def test_parser_raises_only_telemetry_error(text: str) -> None:
    with contextlib.suppress(TelemetryError):
        parse_list_sas(text)


def _establish(host: str, ike: Any) -> tuple[Initiator, socket.socket, socket.socket]:
    """An IKE SA + CHILD_SA held open (the checks always delete theirs)."""
    s500 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s500.connect((host, 500))
    s4500 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s4500.connect((host, 4500))
    ini = Initiator(InitiatorConfig(
        local_address=s500.getsockname(), remote_address=(host, 500),
        proposals=parse_ike_proposals(("aes256gcm16-prfsha256-ecp256",)),
        psk=ike.psk.encode(), local_id=ike.remote_id, child=ChildRequest(), force_nat_t=True))
    ini.start(time.monotonic())
    _pump(ini, s500, s4500, until=lambda e: isinstance(e, AuthCompleted))
    return ini, s500, s4500


def _pump(ini: Initiator, s500: socket.socket, s4500: socket.socket, until: Any) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for data, (_, port) in ini.datagrams_to_send(time.monotonic()):
            (s4500 if port == 4500 else s500).send(data)
        while (event := ini.next_event()) is not None:
            if until(event):
                return
        for sock in (s500, s4500):
            sock.settimeout(0.02)
            with contextlib.suppress(TimeoutError):
                ini.receive_datagram(sock.recv(65535), sock.getpeername(), time.monotonic())
        ini.handle_timer(time.monotonic())
    raise AssertionError("exchange did not finish")


@pytest.mark.lab
def test_counts_follow_the_responder(lab: Any) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    ike = lab.start_strongswan(node)
    uri = f"unix://{ike.vici_socket}"
    assert asyncio.run(collect(uri)).ike_sas == 0
    with agent.entered():
        ini, s500, s4500 = _establish(node.address, ike)
    try:
        held = asyncio.run(collect(uri))
        assert held.ike_by_state == {"ESTABLISHED": 1} and held.child_by_state == {"INSTALLED": 1}
        with agent.entered():
            ini.close(time.monotonic())
            _pump(ini, s500, s4500, until=lambda e: True)
        for _ in range(60):  # charon destroys the SA just after answering the Delete
            if asyncio.run(collect(uri)).ike_sas == 0:
                break
            time.sleep(0.05)
        assert asyncio.run(collect(uri)).ike_sas == 0
        with agent.entered():
            init = asyncio.run(run_level(Ikev2Params(host=node.address), 3.0, "init"))
        assert init.ok
        assert asyncio.run(collect(uri)).half_open == 1
    finally:
        s500.close()
        s4500.close()
    with pytest.raises(TelemetryError):
        asyncio.run(collect(f"unix://{lab.dir}/no-such.vici"))


@pytest.mark.lab
def test_counts_over_ssh(lab: Any) -> None:
    """asyncssh client against an in-process asyncssh server (sshd is not installed here) that
    runs the command for real: ``swanctl --list-sas --uri ...`` against the lab's charon."""
    from probes.checks.remote import NodeShell

    node = lab.add_host("node")
    ike = lab.start_strongswan(node)

    async def scenario() -> tuple[int, str, list[str]]:
        async with command_server() as sshd:
            shell = NodeShell(host="127.0.0.1", username="probe", port=sshd.port,
                              verify_host_key=False)
            counts = await collect(f"unix://{ike.vici_socket}", shell)
            try:
                await collect("unix:///nonexistent.vici", shell)
            except TelemetryError as exc:
                return counts.ike_sas, str(exc), sshd.commands
            return counts.ike_sas, "", sshd.commands

    ike_sas, error, commands = asyncio.run(scenario())
    assert ike_sas == 0 and commands[0].startswith("swanctl --list-sas --uri unix://")
    assert "exited" in error
