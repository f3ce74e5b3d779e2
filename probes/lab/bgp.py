"""BGP in the lab: a BIRD 2 router standing for the upstream network, and one ``gobgpd`` speaker
per anycast PoP peering with it over the lab network (eBGP multihop: the router namespace sits
between them). Tests read the upstream's RIB to see what the world would see.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

from probes.lab.netns import LabError
from probes.lab.topology import wait_for

if TYPE_CHECKING:
    from probes.lab.topology import Host, Lab

HOLD_TIME = 3  # seconds: a dead speaker's routes leave the peer's RIB within this


@dataclass(frozen=True, slots=True)
class PeerRoute:
    prefix: str
    neighbor: str  # protocol name on the peer, e.g. "pop1"
    as_path: tuple[int, ...]
    med: int | None


class BirdPeer:
    """The upstream router: imports everything its PoP neighbors announce, exports nothing."""

    def __init__(self, lab: Lab, host: Host, *, asn: int = 65000) -> None:
        self.lab, self.host, self.asn = lab, host, asn
        self.dir = lab.dir / "bird"
        self.dir.mkdir(exist_ok=True)
        self.config_file = self.dir / "bird.conf"
        self.control_socket = self.dir / "bird.ctl"
        self.neighbors: dict[str, tuple[str, int]] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    def render(self) -> str:
        lines = [f"router id {self.host.address};", "protocol device { }"]
        for name, (address, asn) in sorted(self.neighbors.items()):
            lines.append(
                f"protocol bgp {name} {{ local {self.host.address} as {self.asn}; "
                f"neighbor {address} as {asn}; multihop 4; hold time {HOLD_TIME}; "
                "connect retry time 1; error wait time 1, 2; "
                "ipv4 { import all; export none; }; }")
        return "\n".join(lines) + "\n"

    def add_neighbor(self, name: str, address: str, asn: int) -> None:
        self.neighbors[name] = (address, asn)
        if self.proc is not None:
            self.config_file.write_text(self.render())
            self.birdc("configure")

    def start(self) -> None:
        self.config_file.write_text(self.render())
        self.proc = self.host.popen(["bird", "-f", "-c", str(self.config_file), "-s",
                                     str(self.control_socket), "-P", str(self.dir / "pid")],
                                    name="bird")
        proc = self.proc
        wait_for(lambda: self.control_socket.exists() or proc.poll() is not None, 60,
                 "bird control socket")
        if proc.poll() is not None:
            raise LabError(f"bird exited with {proc.returncode}")

    def birdc(self, *args: str) -> str:
        out = self.host.run(["birdc", "-s", str(self.control_socket), *args], check=False)
        return out.stdout

    def established(self, name: str) -> bool:
        return "Established" in self.birdc("show", "protocols", name)

    def routes(self, prefix: str) -> list[PeerRoute]:
        """Every path the peer holds for ``prefix`` (one per PoP announcing it)."""
        text = self.birdc("show", "route", "for", prefix, "all")
        routes: list[PeerRoute] = []
        for block in re.split(r"\n(?=\S|\s{10,}\S)", text):
            head = re.search(r"\[(\w+) [\d:.]+ from ([\d.]+)\]", block)
            if not head:
                continue
            path = re.search(r"BGP\.as_path: ([\d ]*)", block)
            med = re.search(r"BGP\.med: (\d+)", block)
            routes.append(PeerRoute(
                prefix, head.group(1),
                tuple(int(a) for a in path.group(1).split()) if path else (),
                int(med.group(1)) if med else None))
        return routes


class GoBgpDaemon:
    """``gobgpd`` in a PoP namespace, API on the PoP's lab address so the mesh can reach it."""

    def __init__(self, lab: Lab, host: Host, *, asn: int, peer: BirdPeer,
                 api_port: int = 50051) -> None:
        self.lab, self.host, self.asn, self.peer, self.api_port = lab, host, asn, peer, api_port
        self.config_file = lab.dir / f"gobgpd-{host.name}.toml"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api_host(self) -> str:
        return self.host.address

    def start(self) -> None:
        self.config_file.write_text(
            "[global.config]\n"
            f"  as = {self.asn}\n"
            f'  router-id = "{self.host.address}"\n'
            f'  local-address-list = ["{self.host.address}"]\n'
            "[[neighbors]]\n"
            "  [neighbors.config]\n"
            f'    neighbor-address = "{self.peer.host.address}"\n'
            f"    peer-as = {self.peer.asn}\n"
            "  [neighbors.ebgp-multihop.config]\n"
            "    enabled = true\n"
            "    multihop-ttl = 4\n"
            "  [neighbors.timers.config]\n"
            f"    hold-time = {HOLD_TIME}\n"
            "    keepalive-interval = 1\n"
            "    connect-retry = 1\n")
        self.proc = self.host.popen(["gobgpd", "-f", str(self.config_file), "--api-hosts",
                                     f"{self.api_host}:{self.api_port}", "-l", "warn"],
                                    name="gobgpd")
        proc = self.proc
        wait_for(lambda: self._api_up() or proc.poll() is not None, 60, "gobgpd API")
        if proc.poll() is not None:
            raise LabError(f"gobgpd exited with {proc.returncode}")

    def _api_up(self) -> bool:
        out = self.host.run(["gobgp", "-u", self.api_host, "-p", str(self.api_port), "global"],
                            check=False)
        return out.returncode == 0

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.stop_process(self.proc)
            self.proc = None
