"""Management-interface telemetry: parsers (incl. fuzz) and a real server's answers."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.checks.openvpn import KINDS, Level
from probes.checks.openvpn_telemetry import (
    TelemetryError,
    parse_load_stats,
    parse_management_output,
    parse_status_v3,
    read_management,
    read_management_socket,
    ssh_command,
)
from probes.checks.remote import NodeShell
from probes.lab import Lab
from probes.lab.topology import wait_for
from tests.openvpn.test_lab_openvpn import params_for, probe
from tests.sshd import command_server

pytestmark = pytest.mark.openvpn

HEADER = ("HEADER\tCLIENT_LIST\tCommon Name\tReal Address\tVirtual Address\tVirtual IPv6 Address"
          "\tBytes Received\tBytes Sent\tConnected Since\tConnected Since (time_t)\tUsername"
          "\tClient ID\tPeer ID\tData Channel Cipher")
SAMPLE = "\r\n".join([
    ">INFO:OpenVPN Management Interface Version 5 -- type 'help' for more info",
    "TITLE\tOpenVPN 2.6.14 x86_64-pc-linux-gnu",
    "TIME\t2026-11-26 05:38:04\t1795671484",
    HEADER,
    "CLIENT_LIST\tagent1\t10.77.2.2:40000\t10.8.0.2\t\t3000\t4000\t2026-11-26 05:38:00"
    "\t1795671480\tUNDEF\t0\t0\tAES-256-GCM",
    "HEADER\tROUTING_TABLE\tVirtual Address\tCommon Name\tReal Address\tLast Ref"
    "\tLast Ref (time_t)",
    "ROUTING_TABLE\t10.8.0.2\tagent1\t10.77.2.2:40000\t2026-11-26 05:38:03\t1795671483",
    "GLOBAL_STATS\tMax bcast/mcast queue length\t0",
    "GLOBAL_STATS\tdco_enabled\t0",
    "END",
    "SUCCESS: nclients=1,bytesin=3000,bytesout=4000",
]) + "\r\n"


def test_parse_sample_management_output() -> None:
    telemetry = parse_management_output(SAMPLE)
    status = telemetry.status
    assert status.time == 1795671484 and status.routes == 1
    (client,) = status.clients
    assert (client.common_name, client.virtual_address, client.bytes_received,
            client.bytes_sent, client.connected_since, client.cipher) == (
        "agent1", "10.8.0.2", 3000, 4000, 1795671480, "AES-256-GCM")
    assert status.clients_named("agent") == [client] and status.clients_named("x") == []
    assert status.global_stats["dco_enabled"] == "0"
    assert telemetry.load is not None and telemetry.load.clients == 1


@pytest.mark.parametrize("text", [
    "", "TITLE\tx\n", "TITLE\tx\nCLIENT_LIST\ta\nEND\n",
    "TITLE\tx\nTIME\tt\tnot-a-number\nEND\n",
    f"TITLE\tx\n{HEADER}\nCLIENT_LIST\ta\tb\tc\td\tNaN\t1\t-\t1\nEND\n",
    f"TITLE\tx\n{HEADER}\nCLIENT_LIST\ta\nEND\n",
])
def test_malformed_status_raises_telemetry_error(text: str) -> None:
    with pytest.raises(TelemetryError):
        parse_management_output(text)


def test_load_stats_and_ssh_command() -> None:
    assert parse_load_stats("SUCCESS: nclients=2,bytesin=5,bytesout=6").bytes_out == 6
    with pytest.raises(TelemetryError):
        parse_load_stats("ERROR: unknown command")
    assert "UNIX-CONNECT:'/run/a b.sock'" in ssh_command("/run/a b.sock")


def _fuzz(text: str) -> None:
    for parser in (parse_management_output, parse_status_v3, parse_load_stats):
        with contextlib.suppress(TelemetryError):
            parser(text)


LINES = st.lists(st.one_of(
    st.sampled_from(SAMPLE.splitlines()),
    st.builds(lambda head, rest: head + "\t" + rest,
              st.sampled_from(["TITLE", "TIME", "HEADER", "CLIENT_LIST", "GLOBAL_STATS", "END",
                               "ROUTING_TABLE", "SUCCESS: nclients=1"]),
              st.text(max_size=40))), max_size=12).map("\n".join)


@settings(max_examples=1000, deadline=None)
@given(text=st.one_of(st.text(max_size=300), LINES))
def test_fuzz_telemetry_parsers(text: str) -> None:
    _fuzz(text)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@settings(max_examples=100_000, deadline=None)
@given(text=st.one_of(st.text(max_size=300), LINES))
def test_fuzz_telemetry_parsers_long(text: str) -> None:
    _fuzz(text)


@pytest.mark.lab
def test_management_interface_of_a_real_server(lab: Lab) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    server = lab.start_openvpn(node, proto="udp", wrap="tls-crypt")
    agent.popen(server.client_argv(), name="client")
    log = lab.dir / "agent-client.log"
    wait_for(lambda: "Initialization Sequence Completed" in log.read_text(), 60, "client")
    telemetry = asyncio.run(read_management_socket(str(server.management_socket)))
    (client,) = telemetry.status.clients
    assert client.common_name == f"{server.name}-client"
    assert client.virtual_address.startswith("10.8.") and client.bytes_received > 0
    assert telemetry.load is not None and telemetry.load.clients == 1
    # a probe with the same certificate evicts the real client, then EXITs itself
    result = probe(agent, params_for(server), Level.SESSION)
    assert result.ok and KINDS[Level.SESSION].name == "openvpn.session"
    with pytest.raises(TelemetryError):
        asyncio.run(read_management_socket(str(lab.dir / "missing.sock"), timeout=1))


async def _ssh_round_trip(socket_path: str, key_file: str) -> Any:
    """An in-process SSH server (tests/sshd.py) runs the command with ``sh -c`` (no sshd
    here), so the SSH path is exercised end to end against the real management socket."""
    import asyncssh

    client_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key.write_private_key(key_file)
    async with command_server(client_key=client_key) as sshd:
        shell = NodeShell(host="127.0.0.1", port=sshd.port, username="probe", key_file=key_file,
                          verify_host_key=False)
        return await read_management(socket_path, shell, timeout=10)


@pytest.mark.lab
def test_management_over_ssh(lab: Lab) -> None:
    node = lab.add_host("node")
    server = lab.start_openvpn(node, proto="udp", wrap="tls-crypt")
    telemetry = asyncio.run(_ssh_round_trip(str(server.management_socket),
                                            str(lab.dir / "probe-ssh-key")))
    assert telemetry.status.title.startswith("OpenVPN 2.")
    assert telemetry.load is not None and telemetry.load.clients == 0
