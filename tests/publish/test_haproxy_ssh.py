"""The HAProxy publisher's SSH transport: an SSH server (asyncssh's, in-process: no sshd on this
machine) forwards a direct-streamlocal channel to a real HAProxy's runtime socket."""

from __future__ import annotations

import time
from pathlib import Path

import asyncssh
import pytest

from probes.lab.haproxy import Backend
from probes.lab.topology import Lab
from probes.mesh.publish.base import RetryableError
from probes.mesh.publish.haproxy import HAProxyPublisher
from probes.mesh.publish.runtime_api import RuntimeAPI, SSHTarget, parse_servers_state
from probes.model import Verdict, VerdictState

pytestmark = [pytest.mark.publish, pytest.mark.lab]


class ForwardingServer(asyncssh.SSHServer):
    """Accepts the one client key and forwards only to the one allowed socket."""

    allowed_socket = ""

    def unix_connection_requested(self, dest_path: str) -> bool:
        return dest_path == self.allowed_socket


async def test_publisher_over_ssh(lab: Lab, tmp_path: Path) -> None:
    hap = lab.start_haproxy(lab.add_host("lb"), servers=[Backend("node1", "10.99.0.1", 1194)])
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key.write_private_key(str(tmp_path / "id"))
    (tmp_path / "authorized_keys").write_text(client_key.export_public_key().decode())
    ForwardingServer.allowed_socket = str(hap.runtime_socket)
    server = await asyncssh.create_server(
        ForwardingServer, "127.0.0.1", 0, server_host_keys=[host_key],
        authorized_client_keys=str(tmp_path / "authorized_keys"))
    port = server.sockets[0].getsockname()[1]
    (tmp_path / "known_hosts").write_text(
        f"[127.0.0.1]:{port} {host_key.export_public_key().decode()}")
    api = RuntimeAPI(ssh=SSHTarget("127.0.0.1", str(hap.runtime_socket), port, "tw",
                                   (str(tmp_path / "id"),), str(tmp_path / "known_hosts")))
    pub = HAProxyPublisher("ssh-lb", api)
    try:
        await pub.deliver(Verdict(node="node1", state=VerdictState.DRAINING,
                                  previous=VerdictState.UP, seq=1, decided_at=time.time()))
        rows = parse_servers_state(hap.command("show servers state vpn"))
        assert rows[("vpn", "node1")].admin == "drain"
        # a socket the server refuses to forward is an unreachable balancer: retryable
        bad = RuntimeAPI(ssh=SSHTarget("127.0.0.1", "/nonexistent.sock", port, "tw",
                                       (str(tmp_path / "id"),), str(tmp_path / "known_hosts")))
        with pytest.raises(RetryableError):
            await bad.command("show info")
        await bad.close()
        # a host key that is not the known one is refused
        (tmp_path / "other_hosts").write_text(
            f"[127.0.0.1]:{port} "
            f"{asyncssh.generate_private_key('ssh-ed25519').export_public_key().decode()}")
        spoofed = RuntimeAPI(ssh=SSHTarget("127.0.0.1", str(hap.runtime_socket), port, "tw",
                                           (str(tmp_path / "id"),),
                                           str(tmp_path / "other_hosts")))
        with pytest.raises(RetryableError):
            await spoofed.command("show info")
        await spoofed.close()
    finally:
        await pub.close()
        server.close()
        await server.wait_closed()
