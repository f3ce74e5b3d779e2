"""A real nftlb for the lab: the nftables L4 balancer, in the router namespace, so that every
packet between lab hosts passes it and a farm's virtual address works from any host.

nftlb keeps its farms in memory and writes the ``ip nftlb`` table; its REST API listens on the
router's address on one host's link (``api_host``'s gateway), where the mesh in that host reaches
it. :class:`NftlbServer` starts it, creates farms through the API (the same API the publisher
uses: nothing is written to nftables by hand), reads backends back, and reads the ruleset nftlb
generated (``nft list table ip nftlb``) so a test can see a weight reach the kernel.

A second, lab-only table (``ip twlab``) counts new flows to a farm's virtual address per backend
address after nftlb's DNAT: a nat-type postrouting chain (it sees only the first packet of each
connection), one counter per backend. That is how tests see which node a new client landed on
without asking nftlb.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from probes.lab import netns
from probes.lab.netns import LabError
from probes.lab.topology import wait_for

if TYPE_CHECKING:
    from probes.lab.topology import Host, Lab

_NUMGEN = re.compile(r"numgen random mod (\d+) map \{ ([^}]*) \}")


@dataclass(frozen=True, slots=True)
class FarmBackend:
    name: str
    address: str
    weight: int = 100
    state: str = "up"


class NftlbServer:
    def __init__(self, lab: Lab, api_host: Host, *, port: int = 5555) -> None:
        self.lab = lab
        self.api_host = api_host
        self.port = port
        self.key = secrets.token_hex(16)
        self.key_file = lab.dir / "nftlb.key"
        self.key_file.write_text(self.key + "\n")
        self.key_file.chmod(0o600)
        self.proc: subprocess.Popen[bytes] | None = None
        self.counted: dict[str, str] = {}  # backend address -> counter name
        self.farms: list[dict[str, Any]] = []  # as configured: what a restart comes back with

    @property
    def url(self) -> str:
        return f"http://{self.api_host.gateway}:{self.port}"

    def start(self) -> None:
        log = self.lab.dir / "router-nftlb.log"
        self.proc = netns.popen(self.lab.router_ns,
                                ["nftlb", "-k", self.key, "-H", self.api_host.gateway,
                                 "-P", str(self.port), "-L", "2", "-l", "5"], log_path=log)
        self.lab.track(self.proc.pid, "router:nftlb")
        proc = self.proc

        def answering() -> bool:
            if proc.poll() is not None:
                return True
            try:
                self.request("GET", "/farms")
            except (OSError, LabError):
                return False
            return True

        wait_for(answering, 60, "nftlb API", interval=0.05)
        if proc.poll() is not None:
            raise LabError(f"nftlb exited with {proc.returncode} (see {log})")

    def stop(self) -> None:
        """Stop nftlb; its nftables table stays until a new nftlb replaces it."""
        if self.proc is not None:
            self.lab.stop_process(self.proc)
            self.proc = None

    def restart(self) -> None:
        """A balancer restart: nftlb comes back with its configured farms (nominal weights,
        every backend up), whatever was set through the API before is gone."""
        self.stop()
        self.start()
        for farm in self.farms:
            self._post_farm(farm)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data,  # noqa: S310 - a lab URL
                                     method=method, headers={"Key": self.key})
        with self.api_host.entered():
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - lab URL
                    return json.loads(resp.read() or b"{}")
            except urllib.error.HTTPError as exc:
                raise LabError(f"nftlb {method} {path}: HTTP {exc.code} "
                               f"{exc.read()[:200]!r}") from None

    def add_farm(self, name: str, vip: str, ports: str, backends: Sequence[FarmBackend], *,
                 persistence: str = "none") -> None:
        farm = {"name": name, "family": "ipv4", "virtual-addr": vip, "virtual-ports": ports,
                "mode": "dnat", "protocol": "udp", "scheduler": "weight", "state": "up",
                "persistence": persistence,
                "backends": [{"name": b.name, "ip-addr": b.address, "weight": str(b.weight),
                              "state": b.state} for b in backends]}
        self._post_farm(farm)
        self.farms.append(farm)

    def _post_farm(self, farm: dict[str, Any]) -> None:
        answer = self.request("POST", "/farms", {"farms": [farm]})
        if answer.get("response") != "success":
            raise LabError(f"nftlb refused farm {farm['name']}: {answer}")

    def backends(self, farm: str) -> dict[str, dict[str, str]]:
        """``name -> {weight, state, ip-addr, ...}`` as nftlb's API reports them."""
        got = self.request("GET", f"/farms/{farm}")
        (found,) = [f for f in got["farms"] if f["name"] == farm]
        return {b["name"]: b for b in found["backends"]}

    def ruleset(self) -> str:
        return netns.run(netns.exec_argv(self.lab.router_ns,
                                         ["nft", "list", "table", "ip", "nftlb"])).stdout

    def numgen(self, farm: str) -> dict[str, int]:
        """The kernel's view of a farm: backend mark -> its share of the ``numgen`` draw (what
        nftlb made of the weights); marks are mapped back to backend names."""
        chain = netns.run(netns.exec_argv(
            self.lab.router_ns, ["nft", "list", "chain", "ip", "nftlb", f"filter-{farm}"]),
            check=False).stdout
        match = _NUMGEN.search(chain)
        if match is None:
            return {}
        marks = {int(b["mark"], 16): name for name, b in self.backends(farm).items()}
        shares: dict[str, int] = {}
        for item in match.group(2).split(","):
            span, _, mark = item.strip().partition(" : ")
            low, _, high = span.partition("-")
            shares[marks.get(int(mark, 16), mark)] = int(high or low) - int(low) + 1
        return shares

    # ---- new flows per backend (lab-only counters) ------------------------------------------

    def count_new_flows(self, vip: str, addresses: Sequence[str]) -> None:
        """Count new flows to ``vip`` by the backend nftlb sent them to (other traffic to the
        backends, an agent's probes say, is not counted)."""
        lines = ["table ip twlab {"]
        for i, address in enumerate(addresses):
            self.counted[address] = f"new{i}"
            lines.append(f"  counter new{i} {{ }}")
        # a nat chain sees the first packet of each connection only: one count per flow
        lines.append("  chain post { type nat hook postrouting priority 200; policy accept;")
        for address, counter in self.counted.items():
            lines.append(f"    ct original ip daddr {vip} ip daddr {address} "
                         f"counter name {counter}")
        lines += ["  }", "}"]
        netns.run(netns.exec_argv(self.lab.router_ns, ["nft", "-f", "-"]),
                  input_text="\n".join(lines) + "\n")

    def new_flows(self) -> dict[str, int]:
        """Backend address -> new flows DNATed to it since :meth:`count_new_flows`."""
        out = netns.run(netns.exec_argv(self.lab.router_ns,
                                        ["nft", "-j", "list", "counters", "table", "ip",
                                         "twlab"])).stdout
        packets = {item["counter"]["name"]: int(item["counter"]["packets"])
                   for item in json.loads(out)["nftables"] if "counter" in item}
        return {address: packets.get(name, 0) for address, name in self.counted.items()}
