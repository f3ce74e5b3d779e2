"""A real HAProxy for the lab, with its runtime API on a unix socket (``level admin``)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from probes.lab.netns import LabError, run
from probes.lab.topology import wait_for

if TYPE_CHECKING:
    from probes.lab.topology import Host, Lab


@dataclass(frozen=True, slots=True)
class Backend:
    name: str  # server name inside the backend
    address: str
    port: int
    check: str = ""  # e.g. "check inter 2s fall 3 rise 2" for HAProxy's own health checks


class HAProxyServer:
    def __init__(self, lab: Lab, host: Host, *, servers: Sequence[Backend] = (),
                 backend: str = "vpn", bind_port: int = 8443, mode: str = "tcp") -> None:
        self.lab, self.host = lab, host
        self.backend, self.servers = backend, list(servers)
        self.bind_port, self.mode = bind_port, mode
        self.dir = lab.dir / "haproxy"
        self.dir.mkdir(exist_ok=True)
        self.runtime_socket = self.dir / "admin.sock"
        self.config_file = self.dir / "haproxy.cfg"
        self.proc: subprocess.Popen[bytes] | None = None

    def render(self) -> str:
        lines = [
            "global",
            f"    stats socket {self.runtime_socket} mode 600 level admin",
            "defaults",
            f"    mode {self.mode}",
            "    timeout connect 2s",
            "    timeout client 30s",
            "    timeout server 30s",
            "frontend fe",
            f"    bind {self.host.address}:{self.bind_port}",
            f"    default_backend {self.backend}",
            f"backend {self.backend}",
        ]
        lines += [f"    server {s.name} {s.address}:{s.port} {s.check}".rstrip()
                  for s in self.servers]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        self.config_file.write_text(self.render())
        run(["haproxy", "-c", "-q", "-f", str(self.config_file)])
        self.runtime_socket.unlink(missing_ok=True)
        self.proc = self.host.popen(["haproxy", "-f", str(self.config_file), "-db"], name="haproxy")
        proc = self.proc
        wait_for(lambda: self.runtime_socket.exists() or proc.poll() is not None, 60,
                 "haproxy runtime socket")
        if proc.poll() is not None:
            raise LabError(f"haproxy exited with {proc.returncode}")

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.stop_process(self.proc)
            self.proc = None

    def command(self, line: str, timeout: float = 5.0) -> str:
        """Send one runtime API command and return the whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.runtime_socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()
