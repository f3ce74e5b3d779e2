"""A multi-AS network in the lab: routers in namespaces speaking real eBGP (BIRD 2), stub hosts
behind them, and a management network on the side.

```
 host ── router(AS a) ══ link ══ router(AS b) ══ ... ══ router(AS z) ── host
```

* Every router runs its own ``bird`` and announces the prefixes its AS *owns*: its stub LANs and
  the links numbered from its space. A link between two ASes is numbered from the side closer to
  the destinations (the ``owner`` of :meth:`AsNet.connect`), as a provider numbers the ports
  it sells: the router on that side answers traceroutes from that link's address, so the
  address maps to its own AS in a table made from the routes;
* routes are learnt, never configured: the kernel's FIB is what ``bird`` exports
  (``merge paths``: equal eBGP paths become one ECMP route, hashed on L4 ports where a router
  sets ``ecmp``);
* routers answer every traceroute probe (``icmp_ratelimit`` 0) from the interface the probe
  came in on, so traces are exact; rate-limited routers are covered by recorded traces in
  the unit tests;
* the management network joins each stub host that needs it to a ``control`` namespace over
  its own veth, outside the AS network: reports from an agent reach the mesh whatever happens to
  the paths under test.

Faults act on one router: :meth:`AsNet.black_hole` (forwarding toward a prefix dropped, the
router itself still answers), :meth:`AsNet.drop_port` (forwarded UDP to one port dropped: a bad
branch), :meth:`AsNet.set_link_mtu`, and BGP sessions can be disabled (:meth:`AsNet.disable`:
the routes move).
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from probes.lab import netns
from probes.lab.netns import LabError
from probes.lab.topology import Host, Lab, wait_for

LINK_NET = "10.200"  # link L: 10.200.L.0/30, .1 on the first router, .2 on the second
LAN_NET = "10"  # stub LAN k: 10.(60 + k).0.0/24, router .1, host .2
MGMT_NET = "10.99"  # management link k: 10.99.k.0/30, control .1, host .2
HOLD = 3  # seconds: a dead session's routes are gone within this


@dataclass
class Interface:
    name: str
    address: str  # with prefix length
    peer: str  # the other end's address (no length)
    peer_router: str
    owned: bool  # the link's prefix is this AS's


@dataclass
class Router:
    net: AsNet
    name: str
    asn: int
    ns: str
    ecmp: bool = False
    interfaces: list[Interface] = field(default_factory=list)
    lans: list[str] = field(default_factory=list)  # owned stub prefixes
    disabled: set[str] = field(default_factory=set)  # peers whose session is off
    proc: subprocess.Popen[bytes] | None = None

    @property
    def router_id(self) -> str:
        first = self.interfaces[0].address if self.interfaces else self.lans[0]
        return str(ipaddress.ip_interface(first).ip)

    @property
    def socket(self) -> Path:
        return self.net.lab.dir / f"bird-{self.name}.ctl"

    def address_toward(self, other: str) -> str:
        """This router's address on its link to ``other``."""
        for i in self.interfaces:
            if i.peer_router == other:
                return str(ipaddress.ip_interface(i.address).ip)
        raise LabError(f"{self.name} has no link to {other}")

    def render(self) -> str:
        owned = [str(ipaddress.ip_interface(i.address).network)
                 for i in self.interfaces if i.owned] + self.lans
        lines = [
            f"router id {self.router_id};",
            "protocol device { scan time 1; }",
            # connected prefixes rank below BGP: for a link numbered by the neighbour's AS the
            # best route is then the neighbour's announcement, which is passed on (the kernel
            # keeps forwarding on its own connected route)
            'protocol direct { ipv4 { preference 50; }; interface "*"; }',
            "protocol kernel { merge paths on; ipv4 { export where source = RTS_BGP; }; }",
            "filter announce {",
            "  if source = RTS_BGP then accept;",
            f"  if source = RTS_DEVICE && net ~ [ {', '.join(owned)} ] then accept;",
            "  reject;",
            "}",
        ]
        for i in self.interfaces:
            peer = self.net.routers[i.peer_router]
            local = str(ipaddress.ip_interface(i.address).ip)
            state = "disabled; " if i.peer_router in self.disabled else ""
            lines.append(
                f"protocol bgp to_{peer.name} {{ {state}local {local} as {self.asn}; "
                f"neighbor {i.peer} as {peer.asn}; hold time {HOLD}; keepalive time 1; "
                "connect retry time 1; error wait time 1, 2; "
                "ipv4 { import all; export filter announce; }; }")
        if self.net.mrt_router == self.name:
            lines.append(f'protocol mrt {{ table "master4"; filename "{self.net.mrt_file}"; '
                         "period 1; }")
        return "\n".join(lines) + "\n"

    def birdc(self, *args: str) -> str:
        out = netns.run(netns.exec_argv(self.ns, ["birdc", "-s", str(self.socket), *args]),
                        check=False)
        return out.stdout

    def nft(self, ruleset: str) -> None:
        netns.run(netns.exec_argv(self.ns, ["nft", "-f", "-"]), input_text=ruleset)

    def sysctl(self, *settings: str) -> None:
        for setting in settings:
            netns.run(netns.exec_argv(self.ns, ["sysctl", "-qw", setting]))


class StubHost(Host):
    """A host on a router's LAN (and, when it has one, the management network)."""

    def __init__(self, lab: Lab, name: str, ns: str, address: str, gateway: str, *,
                 mgmt: str = "") -> None:
        super().__init__(lab, name, 0, ns, "")
        self._address, self._gateway, self.mgmt = address, gateway, mgmt

    @property
    def address(self) -> str:
        return self._address

    @property
    def gateway(self) -> str:
        return self._gateway


@dataclass
class AsNet:
    lab: Lab
    routers: dict[str, Router] = field(default_factory=dict)
    hosts: dict[str, StubHost] = field(default_factory=dict)
    control: StubHost | None = None
    mrt_router: str = ""  # the router that dumps its RIB as MRT (an ASN table for the mesh)
    _links: int = 0
    _lans: int = 0
    _mgmt: int = 0

    @property
    def mrt_file(self) -> Path:
        return self.lab.dir / "rib.mrt"

    def router(self, name: str, asn: int, *, ecmp: bool = False) -> Router:
        ns = f"{self.lab.prefix}{name}"
        netns.create(ns)
        router = Router(self, name, asn, ns, ecmp)
        self.routers[name] = router
        router.sysctl("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                      "net.ipv4.icmp_ratelimit=0", "net.ipv4.icmp_msgs_per_sec=100000",
                      "net.ipv4.icmp_errors_use_inbound_ifaddr=1")
        if ecmp:  # per-flow (L4) hashing across equal paths
            router.sysctl("net.ipv4.fib_multipath_hash_policy=1")
        return router

    def connect(self, a: str, b: str, *, owner: str) -> str:
        """A link between two routers, numbered from ``owner``'s AS. Returns its name."""
        self._links += 1
        n = self._links
        name = f"l{n}"
        ra, rb = self.routers[a], self.routers[b]
        netns.run(["ip", "link", "add", name, "netns", ra.ns, "type", "veth", "peer", "name",
                   name, "netns", rb.ns])
        for router, own, peer, peer_name in ((ra, 1, 2, b), (rb, 2, 1, a)):
            address = f"{LINK_NET}.{n}.{own}/30"
            netns.run(["ip", "-n", router.ns, "addr", "add", address, "dev", name])
            netns.run(["ip", "-n", router.ns, "link", "set", name, "up"])
            router.interfaces.append(Interface(name, address, f"{LINK_NET}.{n}.{peer}",
                                               peer_name, owned=router.name == owner))
        return name

    def host(self, name: str, router: str, *, mgmt: bool = False) -> StubHost:
        """A host on its own LAN behind ``router`` (that AS announces the LAN)."""
        self._lans += 1
        k = self._lans
        ns = f"{self.lab.prefix}{name}"
        netns.create(ns)
        r = self.routers[router]
        prefix = f"{LAN_NET}.{60 + k}.0"
        netns.run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name",
                   f"h{k}", "netns", r.ns])
        netns.run(["ip", "-n", r.ns, "addr", "add", f"{prefix}.1/24", "dev", f"h{k}"])
        netns.run(["ip", "-n", r.ns, "link", "set", f"h{k}", "up"])
        netns.run(["ip", "-n", ns, "addr", "add", f"{prefix}.2/24", "dev", "eth0"])
        netns.run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        netns.run(["ip", "-n", ns, "route", "add", "default", "via", f"{prefix}.1"])
        r.lans.append(f"{prefix}.0/24")
        host = StubHost(self.lab, name, ns, f"{prefix}.2", f"{prefix}.1")
        self.hosts[name] = host
        self.lab.hosts[name] = host
        if mgmt:
            self._management(host)
        return host

    def _management(self, host: StubHost) -> None:
        if self.control is None:
            ns = f"{self.lab.prefix}control"
            netns.create(ns)
            self.control = StubHost(self.lab, "control", ns, f"{MGMT_NET}.1.1", "")
            self.lab.hosts["control"] = self.control
        self._mgmt += 1
        k = self._mgmt
        netns.run(["ip", "link", "add", "mg0", "netns", host.ns, "type", "veth", "peer",
                   "name", f"mg{k}", "netns", self.control.ns])
        netns.run(["ip", "-n", self.control.ns, "addr", "add", f"{MGMT_NET}.{k}.1/30", "dev",
                   f"mg{k}"])
        netns.run(["ip", "-n", self.control.ns, "link", "set", f"mg{k}", "up"])
        netns.run(["ip", "-n", host.ns, "addr", "add", f"{MGMT_NET}.{k}.2/30", "dev", "mg0"])
        netns.run(["ip", "-n", host.ns, "link", "set", "mg0", "up"])
        host.mgmt = f"{MGMT_NET}.{k}.1"  # where this host reaches the control namespace

    # ------------------------------------------------------------------ BGP

    def start(self, timeout: float = 60.0) -> None:
        """Start every router's bird and wait until every session is up and every router has
        a route to every announced prefix."""
        for router in self.routers.values():
            path = self.lab.dir / f"bird-{router.name}.conf"
            path.write_text(router.render())
            router.proc = netns.popen(router.ns, ["bird", "-f", "-c", str(path), "-s",
                                                  str(router.socket)],
                                      log_path=self.lab.dir / f"bird-{router.name}.log")
            self.lab.track(router.proc.pid, f"{router.name}:bird")
        for router in self.routers.values():
            proc = router.proc
            assert proc is not None
            wait_for(lambda r=router, p=proc: r.socket.exists() or p.poll() is not None,
                     60, f"bird control socket of {router.name}")
            if proc.poll() is not None:
                raise LabError(f"bird on {router.name} exited with {proc.returncode} "
                               f"(logs in {self.lab.dir})")
        self.wait_converged(timeout)

    def prefixes(self, asn: int | None = None) -> set[str]:
        """Every announced prefix (but those of AS ``asn``: its routers in other places
        refuse paths with their own AS in them, as BGP does)."""
        out: set[str] = set()
        for r in self.routers.values():
            if r.asn == asn:
                continue
            out.update(r.lans)
            out.update(str(ipaddress.ip_interface(i.address).network)
                       for i in r.interfaces if i.owned)
        return out

    def established(self, router: Router) -> bool:
        text = router.birdc("show", "protocols")
        wanted = {f"to_{i.peer_router}" for i in router.interfaces
                  if i.peer_router not in router.disabled}
        up = {m.group(1) for m in re.finditer(r"^(to_\S+)\s+BGP\s+.*\bEstablished\b", text,
                                              re.MULTILINE)}
        return wanted <= up

    def routes(self, router: Router) -> set[str]:
        text = netns.run(netns.exec_argv(router.ns, ["ip", "-4", "route", "show"])).stdout
        return {line.split()[0] for line in text.splitlines() if line and line[0].isdigit()}

    def wait_converged(self, timeout: float = 60.0) -> None:
        def done() -> bool:
            return all(self.established(r) and self.prefixes(r.asn) <= self.routes(r)
                       for r in self.routers.values())

        wait_for(done, timeout, "BGP to converge", interval=0.2)

    def disable(self, router: str, peer: str) -> None:
        """Shut the BGP session between two routers (both ends): the routes move."""
        for a, b in ((router, peer), (peer, router)):
            self.routers[a].disabled.add(b)
            self.routers[a].birdc("disable", f"to_{b}")

    def enable(self, router: str, peer: str) -> None:
        for a, b in ((router, peer), (peer, router)):
            self.routers[a].disabled.discard(b)
            self.routers[a].birdc("enable", f"to_{b}")

    def path(self, router: str, prefix: str) -> list[int]:
        """The AS path of ``router``'s best route to ``prefix``."""
        text = self.routers[router].birdc("show", "route", "for", prefix, "all")
        found = re.search(r"BGP\.as_path: ([\d ]*)", text)
        return [int(a) for a in found.group(1).split()] if found else []

    def next_hops(self, router: str, prefix: str) -> set[str]:
        """The kernel's next hops from ``router`` toward ``prefix`` (several: ECMP)."""
        text = netns.run(netns.exec_argv(self.routers[router].ns,
                                         ["ip", "-4", "route", "show", prefix])).stdout
        return set(re.findall(r"via (\S+)", text))

    # ------------------------------------------------------------------ faults

    def black_hole(self, router: str, prefix: str) -> None:
        """``router`` drops everything it would forward to ``prefix`` (it still answers probes
        that expire on it: a black hole you can see in a trace)."""
        self.routers[router].nft(_forward_drop(f"ip daddr {prefix} drop"))

    def drop_port(self, router: str, prefix: str, port: int) -> None:
        """``router`` drops forwarded UDP to ``prefix``:``port`` only."""
        self.routers[router].nft(_forward_drop(f"ip daddr {prefix} udp dport {port} drop"))

    def clear_faults(self, router: str) -> None:
        netns.run(netns.exec_argv(self.routers[router].ns,
                                  ["nft", "delete", "table", "ip", "tw_fault"]), check=False)

    def set_link_mtu(self, router: str, peer: str, mtu: int) -> None:
        """The MTU of ``router``'s interface toward ``peer`` (it answers frag-needed)."""
        r = self.routers[router]
        for i in r.interfaces:
            if i.peer_router == peer:
                netns.run(["ip", "-n", r.ns, "link", "set", i.name, "mtu", str(mtu)])
                return
        raise LabError(f"{router} has no link to {peer}")


def _forward_drop(rule: str) -> str:
    """An nftables table ``tw_fault`` whose forward chain holds ``rule``."""
    return ("table ip tw_fault {\n  chain faults {\n"
            "    type filter hook forward priority 0; policy accept;\n"
            f"    {rule}\n  }}\n}}\n")
