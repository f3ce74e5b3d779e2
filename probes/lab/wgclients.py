"""Real WireGuard clients for the lab: many wireguard-go tunnels in one client host.

Each :class:`WgClient` is its own wireguard-go interface with its own key, listen port and
tunnel address ``10.201.0.<100 + n>``; every client talks to the same inner address
``10.201.0.1`` (each node of a pool has it), so policy routing picks the tunnel by source address:
``ip rule from 10.201.0.<100+n> lookup <table n>``, with a route to ``10.201.0.1`` through that
client's interface. The endpoint is a pool's virtual address (through the balancer) or one node
(to load that node on purpose). A client is a flow to the balancer: its (address, listen port)
5-tuple, kept in conntrack by persistent keepalives.
"""

from __future__ import annotations

import itertools
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from probes.lab.keys import WgKeyPair, wg_keypair
from probes.lab.netns import LabError
from probes.lab.topology import wait_for
from probes.lab.wireguard import uapi_accepts

if TYPE_CHECKING:
    from probes.lab.topology import Host, Lab

INNER_SERVER = "10.201.0.1"
FIRST_CLIENT = 100
_ports = itertools.count(52000)


@dataclass
class WgClient:
    lab: Lab
    host: Host
    index: int
    server_key: str  # the pool's shared server public key
    endpoint: str  # "address:port": a virtual address or one node
    keys: WgKeyPair = field(default_factory=wg_keypair)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def interface(self) -> str:
        return f"tw{self.lab.run_id}c{self.index}"

    @property
    def address(self) -> str:
        return f"10.201.0.{FIRST_CLIENT + self.index}"

    @property
    def table(self) -> str:
        return str(1000 + self.index)

    @property
    def socket_path(self) -> str:
        return f"/var/run/wireguard/{self.interface}.sock"

    def start(self) -> None:
        """Bring the tunnel up on a new listen port: a new flow for the balancer."""
        if self.proc is not None:
            raise LabError(f"client {self.index} already running")
        self.port = next(_ports)
        Path(self.socket_path).unlink(missing_ok=True)  # a killed client's socket stays behind
        key_file = self.lab.dir / f"{self.interface}.key"
        self.keys.write_private(key_file)
        self.proc = self.host.popen(["wireguard-go", "-f", self.interface], name=self.interface,
                                    env={"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"})
        proc = self.proc
        wait_for(lambda: Path(self.socket_path).exists() or proc.poll() is not None, 60,
                 f"{self.interface} control socket")
        if proc.poll() is not None:
            raise LabError(f"wireguard-go client exited with {proc.returncode}")
        # the socket file appears before wireguard-go answers on it (seen under heavy load:
        # "wg set" then fell back to netlink, which this kernel does not have)
        wait_for(lambda: uapi_accepts(self.socket_path) or proc.poll() is not None, 60,
                 f"{self.interface} answering")
        run = self.host.run
        run(["wg", "set", self.interface, "listen-port", str(self.port), "private-key",
             str(key_file), "peer", self.server_key, "allowed-ips", f"{INNER_SERVER}/32",
             "endpoint", self.endpoint, "persistent-keepalive", "5"])
        run(["ip", "addr", "add", f"{self.address}/32", "dev", self.interface])
        run(["ip", "link", "set", self.interface, "up"])
        run(["ip", "route", "replace", INNER_SERVER, "dev", self.interface, "table", self.table])
        run(["ip", "rule", "add", "from", self.address, "lookup", self.table, "pref",
             self.table])

    def stop(self) -> None:
        """Tear the tunnel down (the client leaves; its flow goes idle in conntrack)."""
        if self.proc is None:
            return
        self.host.run(["ip", "rule", "del", "pref", self.table], check=False)
        self.lab.stop_process(self.proc)
        self.proc = None
        Path(self.socket_path).unlink(missing_ok=True)

    def ping(self, count: int = 3) -> bool:
        """Whether the tunnel carries traffic: pings to the inner server address from it."""
        done = self.host.run(["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "2",
                              "-I", self.address, INNER_SERVER], check=False, timeout=30)
        return done.returncode == 0

    def handshake_age(self) -> float | None:
        out = self.host.run(["wg", "show", self.interface, "latest-handshakes"],
                            check=False).stdout.split()
        if len(out) < 2 or out[1] == "0":
            return None
        return time.time() - int(out[1])
