"""A chain of Linux routers in lab namespaces, for path tests and benchmarks that need real
routers answering real probes without BGP: ``first -- r1 -- ... -- rN -- last``.

Link ``i`` (1-based, between the ``i-1``-th and ``i``-th namespace) is ``<net>.i.0/30``: the
left side ``.1``, the right side ``.2``. Every namespace routes the links to its left via its
left neighbour and those to its right via its right neighbour, so any address on the chain is
reachable from anywhere on it; ICMP rate limiting is off on the routers (a test turns it on).
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Sequence

from probes.lab import netns
from probes.lab.topology import Lab


class Chain:
    def __init__(self, lab: Lab, names: Sequence[str], net: str) -> None:
        self.lab = lab
        self.names = list(names)
        self.net = net
        self.ns = {n: f"{lab.prefix}{n}" for n in self.names}
        for ns in self.ns.values():
            netns.create(ns)
            netns.run(["ip", "-n", ns, "link", "set", "lo", "up"])
        for i, (a, b) in enumerate(itertools.pairwise(self.names), start=1):
            netns.run(["ip", "link", "add", "x", "netns", self.ns[a], "type", "veth", "peer",
                       "name", "y", "netns", self.ns[b]])
            for ns, side, host in ((self.ns[a], "x", 1), (self.ns[b], "y", 2)):
                netns.run(["ip", "-n", ns, "link", "set", side, "name", f"l{i}"])
                netns.run(["ip", "-n", ns, "addr", "add", f"{net}.{i}.{host}/30", "dev",
                           f"l{i}"])
                netns.run(["ip", "-n", ns, "link", "set", f"l{i}", "up"])
        links = len(self.names) - 1
        for index, name in enumerate(self.names):
            if 0 < index < links:
                self.run(name, "sysctl", "-qw", "net.ipv4.ip_forward=1")
                self.run(name, "sysctl", "-qw", "net.ipv4.icmp_ratelimit=0")
            for link in range(1, links + 1):
                if link < index:  # behind the link on our left (link ``index``)
                    self.run(name, "ip", "route", "add", f"{net}.{link}.0/30", "via",
                             f"{net}.{index}.1")
                elif link > index + 1:  # beyond the link on our right (link ``index + 1``)
                    self.run(name, "ip", "route", "add", f"{net}.{link}.0/30", "via",
                             f"{net}.{index + 1}.2")

    def address(self, name: str, toward: str) -> str:
        """``name``'s address on its link to the neighbour ``toward``."""
        a, b = self.names.index(name), self.names.index(toward)
        link = max(a, b)
        return f"{self.net}.{link}.{1 if a < b else 2}"

    def link(self, name: str, toward: str) -> str:
        """The interface of ``name`` toward the neighbour ``toward``."""
        return f"l{max(self.names.index(name), self.names.index(toward))}"

    def run(self, name: str, *argv: str) -> None:
        netns.run(netns.exec_argv(self.ns[name], list(argv)))

    def nft(self, name: str, rule: str, hook: str) -> None:
        """One rule in its own table ``tw_<hook>`` (``clear_nft`` removes it)."""
        netns.run(netns.exec_argv(self.ns[name], ["nft", "-f", "-"]), input_text=(
            f"table ip tw_{hook} {{\n  chain c {{\n    type filter hook {hook} priority 0; "
            f"policy accept;\n    {rule}\n  }}\n}}\n"))

    def clear_nft(self, name: str, hook: str) -> None:
        self.run(name, "nft", "delete", "table", "ip", f"tw_{hook}")

    def popen(self, name: str, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        proc = netns.popen(self.ns[name], argv, log_path=self.lab.dir / log)
        self.lab.track(proc.pid, log)
        return proc
