"""A real OpenVPN 2.6 server for the lab (UDP or TCP; tls-crypt, tls-auth or tls-crypt-v2).

The server runs in ``--server`` mode on a TUN device inside the host namespace, pushes
``10.8.<n>.0/24`` addresses, writes ``status 3`` to a file every second and listens on a
management unix socket. Client material (CA, a client certificate per agent, the wrapping key)
is generated fresh for every run.
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from probes.lab.netns import LabError, run
from probes.lab.pki import CertFiles
from probes.lab.topology import wait_for

if TYPE_CHECKING:
    from probes.lab.topology import Host, Lab

Wrap = Literal["none", "tls-crypt", "tls-auth", "tls-crypt-v2"]
_counter = itertools.count()


class OpenVPNServer:
    def __init__(self, lab: Lab, host: Host, *, proto: Literal["udp", "tcp"] = "udp",
                 wrap: Wrap = "tls-crypt", port: int = 1194, expired_cert: bool = False,
                 not_yet_valid_cert: bool = False, server_rsa_bits: int | None = None,
                 crl: bool = False,
                 extra: Sequence[str] = ()) -> None:
        self.lab, self.host, self.proto, self.wrap, self.port = lab, host, proto, wrap, port
        self.n = next(_counter)
        self.name = f"ovpn{self.n}"
        self.dir = lab.dir / self.name
        self.dir.mkdir()
        self.subnet = f"10.8.{self.n % 250}.0"
        self.extra = list(extra)
        pki = lab.pki()
        self.ca_file = pki.ca_file
        self.server_cert: CertFiles = pki.issue(f"{self.name}-server", server=True,
                                                expired=expired_cert,
                                                not_yet_valid=not_yet_valid_cert,
                                                rsa_bits=server_rsa_bits)
        self.client = pki.issue(f"{self.name}-client", server=False)
        self.crl_file: Path | None = pki.write_crl() if crl else None
        self.wrap_key_file: Path | None = None  # what a client needs: static or tls-crypt-v2 key
        self._server_wrap_args: list[str] = []
        self._make_wrap_keys()
        self.status_file = self.dir / "status.log"
        self.management_socket = self.dir / "mgmt.sock"
        self.log_file = lab.dir / f"{host.name}-{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.host.address, self.port)

    @property
    def tunnel_address(self) -> str:
        """The server's own address inside the tunnel (``--server`` takes .1)."""
        return self.subnet.rsplit(".", 1)[0] + ".1"

    def issue_client(self, name: str, *, revoked: bool = False) -> CertFiles:
        pki = self.lab.pki()
        files = pki.issue(f"{self.name}-{name}", server=False)
        if revoked:
            pki.revoke(files)
            self.crl_file = pki.write_crl()
        return files

    def _make_wrap_keys(self) -> None:
        if self.wrap == "tls-crypt":
            key = self.dir / "tls-crypt.key"
            run(["openvpn", "--genkey", "tls-crypt", str(key)])
            self.wrap_key_file, self._server_wrap_args = key, ["--tls-crypt", str(key)]
        elif self.wrap == "tls-auth":
            key = self.dir / "tls-auth.key"
            run(["openvpn", "--genkey", "secret", str(key)])
            self.wrap_key_file, self._server_wrap_args = key, ["--tls-auth", str(key), "0"]
        elif self.wrap == "tls-crypt-v2":
            server_key = self.dir / "tls-crypt-v2-server.key"
            client_key = self.dir / "tls-crypt-v2-client.key"
            run(["openvpn", "--genkey", "tls-crypt-v2-server", str(server_key)])
            run(["openvpn", "--tls-crypt-v2", str(server_key), "--genkey", "tls-crypt-v2-client",
                 str(client_key)])
            self.wrap_key_file = client_key
            self._server_wrap_args = ["--tls-crypt-v2", str(server_key)]

    def argv(self) -> list[str]:
        argv = [
            "openvpn", "--server", self.subnet, "255.255.255.0",
            "--dev", f"tun-{self.name}", "--dev-type", "tun", "--topology", "subnet",
            "--proto", "udp" if self.proto == "udp" else "tcp-server",
            "--local", self.host.address, "--port", str(self.port),
            "--ca", str(self.ca_file), "--cert", str(self.server_cert.cert),
            "--key", str(self.server_cert.key), "--dh", "none",
            "--keepalive", "2", "10", "--disable-dco",
            "--status", str(self.status_file), "1", "--status-version", "3",
            "--management", str(self.management_socket), "unix",
            "--verb", "3", "--writepid", str(self.dir / "pid"),
            *self._server_wrap_args,
        ]
        if self.crl_file is not None:
            argv += ["--crl-verify", str(self.crl_file)]
        return argv + self.extra

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise LabError(f"{self.name} already running")
        self.management_socket.unlink(missing_ok=True)
        self.log_file.write_text("")
        self.proc = self.host.popen(self.argv(), name=self.name)
        proc = self.proc
        wait_for(lambda: "Initialization Sequence Completed" in self.log()
                 or proc.poll() is not None, 60, f"{self.name} to start")
        if proc.poll() is not None:
            raise LabError(f"openvpn exited with {proc.returncode}:\n{self.log()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.stop_process(self.proc)
            self.proc = None

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def status(self) -> str:
        try:
            return self.status_file.read_text()
        except OSError:
            return ""

    def client_argv(self, *, cert: CertFiles | None = None,
                    ca_file: Path | None = None) -> list[str]:
        """A real ``openvpn`` client command for this server (tun-less: ``--dev null``)."""
        c = cert or self.client
        argv = [
            "openvpn", "--client", "--dev", "null", "--ifconfig-noexec", "--route-noexec",
            "--proto", "udp" if self.proto == "udp" else "tcp-client",
            "--remote", self.host.address, str(self.port), "--nobind",
            "--ca", str(ca_file or self.ca_file), "--cert", str(c.cert), "--key", str(c.key),
            "--remote-cert-tls", "server", "--disable-dco", "--connect-retry", "1",
            "--verb", "3",
        ]
        if self.wrap == "tls-crypt":
            argv += ["--tls-crypt", str(self.wrap_key_file)]
        elif self.wrap == "tls-auth":
            argv += ["--tls-auth", str(self.wrap_key_file), "1"]
        elif self.wrap == "tls-crypt-v2":
            argv += ["--tls-crypt-v2", str(self.wrap_key_file)]
        return argv
