"""A real WireGuard server for the lab: wireguard-go in a host namespace, configured with ``wg``.

wireguard-go's control sockets live in the global ``/var/run/wireguard``, so the interface name
carries the lab's run id (``tw<id>wg<n>``) to stay unique across parallel runs.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from probes.lab.keys import WgKeyPair, wg_keypair
from probes.lab.netns import LabError
from probes.lab.topology import wait_for

if TYPE_CHECKING:
    from probes.lab.topology import Host, Lab

_counter = itertools.count()


def uapi_accepts(path: Path | str) -> bool:
    """Whether wireguard-go accepts on its control socket. A plain connect, never `wg show`:
    `wg` unlinks a socket that refuses it (as it does between wireguard-go's bind() and
    listen()) and falls back to the kernel, so probing with it can destroy what it waits for."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


@dataclass(frozen=True, slots=True)
class WgPeer:
    public_key: str
    allowed_ip: str  # e.g. "10.201.0.2/32"
    psk: str | None = None  # base64 preshared key


class WireGuardServer:
    def __init__(self, lab: Lab, host: Host, *, port: int, tunnel_address: str,
                 keys: WgKeyPair | None = None) -> None:
        self.lab, self.host, self.port = lab, host, port
        self.keys = keys or wg_keypair()
        self.interface = f"tw{lab.run_id}wg{next(_counter)}"
        self.tunnel_interface = ipaddress.ip_interface(tunnel_address)
        self.proc: subprocess.Popen[bytes] | None = None
        self._key_file = lab.dir / f"{self.interface}.key"
        self.keys.write_private(self._key_file)
        self.peers: dict[str, WgPeer] = {}

    @property
    def public_key(self) -> str:
        return self.keys.public

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.host.address, self.port)

    @property
    def tunnel_address(self) -> str:
        return str(self.tunnel_interface.ip)

    @property
    def socket_path(self) -> Path:
        return Path("/var/run/wireguard") / f"{self.interface}.sock"

    def start(self, peers: Sequence[WgPeer] = ()) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise LabError(f"{self.interface} already running")
        self.socket_path.unlink(missing_ok=True)
        self.proc = self.host.popen(["wireguard-go", "-f", self.interface], name=self.interface,
                                    env={"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"})
        proc = self.proc
        # the socket file appears at bind(), a moment before wireguard-go accepts on it; `wg`
        # finding it not yet accepting falls back to the kernel ("Protocol not supported")
        wait_for(lambda: self._uapi_ready() or proc.poll() is not None, 60,
                 f"{self.interface} control socket")
        if proc.poll() is not None:
            raise LabError(f"wireguard-go exited with {proc.returncode} (see {self.lab.dir})")
        self.host.run(["wg", "set", self.interface, "listen-port", str(self.port),
                       "private-key", str(self._key_file)])
        self.host.run(["ip", "addr", "add", str(self.tunnel_interface), "dev", self.interface])
        self.host.run(["ip", "link", "set", self.interface, "up"])
        for peer in [*self.peers.values(), *peers]:
            self.add_peer(peer)

    def _uapi_ready(self) -> bool:
        return uapi_accepts(self.socket_path)

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.stop_process(self.proc)
            self.proc = None
        self.socket_path.unlink(missing_ok=True)

    def add_peer(self, peer: WgPeer) -> None:
        argv = ["wg", "set", self.interface, "peer", peer.public_key,
                "allowed-ips", peer.allowed_ip]
        if peer.psk is not None:
            psk_file = self.lab.dir / f"{self.interface}-{len(self.peers)}.psk"
            psk_file.write_text(peer.psk + "\n")
            psk_file.chmod(0o600)
            argv += ["preshared-key", str(psk_file)]
        self.host.run(argv)
        self.peers[peer.public_key] = peer

    def remove_peer(self, public_key: str) -> None:
        self.host.run(["wg", "set", self.interface, "peer", public_key, "remove"])
        self.peers.pop(public_key, None)

    def dump(self) -> str:
        return self.host.run(["wg", "show", self.interface, "dump"]).stdout
