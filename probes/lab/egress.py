"""The lab's "internet" beyond a VPN node, for the user-path checks (docs/probes/user-path.md):
forwarding and NAT on the node; a real resolver (unbound), ``tunnelwatch reflector`` and an
HTTPS server (Python's http.server behind OpenSSL) in another lab host.

The lab is a star around its router; a node that forwards a tunnel client's packets out of its
``eth0`` and masquerades them reaches every other lab host, and the answers come back to the
node's own address. Without the NAT rule the answers are addressed to the client's tunnel
address, which the router has no route to: they are lost, as on a node whose NAT rule is gone.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from probes.lab.netns import LabError
from probes.lab.topology import wait_for
from probes.protocols import dns, reflector

if TYPE_CHECKING:
    from probes.lab.topology import Host, Lab

NAT_TABLE = "tw_egress"
REFLECTOR_PORT = 7447
HTTPS_PORT = 443
# an HTTPS server answering HEAD and GET (a directory listing of its folder)
_HTTPS_SERVER = (
    "import http.server, ssl, sys\n"
    "server = http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])),\n"
    "                                         http.server.SimpleHTTPRequestHandler)\n"
    "context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n"
    "context.load_cert_chain(sys.argv[3], sys.argv[4])\n"
    # the handshake in the request's thread, not in accept(): one stalled client stalls no other
    "server.socket = context.wrap_socket(server.socket, server_side=True,\n"
    "                                    do_handshake_on_connect=False)\n"
    "server.serve_forever()\n")


def set_forwarding(node: Host, on: bool) -> None:
    """IPv4 forwarding on the node (what a VPN node needs to carry its users anywhere)."""
    node.run(["sysctl", "-qw", f"net.ipv4.ip_forward={int(on)}"])


def set_masquerade(node: Host, subnets: Sequence[str], on: bool) -> None:
    """Masquerade the tunnel ``subnets`` out of the node's eth0 (on), or drop the rule (off)."""
    node.run(["nft", "delete", "table", "ip", NAT_TABLE], check=False)
    if not on:
        return
    rules = "\n".join(f'    ip saddr {subnet} oifname "eth0" masquerade' for subnet in subnets)
    node.run(["nft", "-f", "-"], input_text=(
        f"table ip {NAT_TABLE} {{\n  chain post {{\n"
        f"    type nat hook postrouting priority srcnat; policy accept;\n{rules}\n  }}\n}}\n"))


def shape_uplink(node: Host, rate_kbit: int | None) -> None:
    """A tbf qdisc on the node's eth0 (everything it sends: to its clients and beyond), or
    none (``rate_kbit`` None): a saturated or throttled uplink."""
    node.run(["tc", "qdisc", "del", "dev", "eth0", "root"], check=False)
    if rate_kbit is not None:
        node.run(["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate",
                  f"{rate_kbit}kbit", "burst", "4kb", "latency", "50ms"])


def enable_egress(node: Host, subnets: Sequence[str]) -> None:
    """A node that carries its users: forwarding on, their subnets masqueraded."""
    set_forwarding(node, True)
    set_masquerade(node, subnets, True)


class Resolver:
    """unbound on ``host``:53 answering ``records`` (name -> IPv4 address) from a local zone;
    :meth:`start` with ``servfail=True`` forwards the zone to a port where nothing listens
    instead, so every query in it is answered SERVFAIL at once."""

    def __init__(self, lab: Lab, host: Host, zone: str, records: dict[str, str]) -> None:
        self.lab, self.host, self.zone, self.records = lab, host, zone.rstrip("."), records
        self.config = lab.dir / f"unbound-{host.name}.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return self.host.address

    def _config_text(self, servfail: bool) -> str:
        lines = [
            "server:", f"  interface: {self.host.address}", "  port: 53",
            "  do-daemonize: no", "  use-syslog: no", '  logfile: ""', '  username: ""',
            '  chroot: ""', f'  directory: "{self.lab.dir}"', '  pidfile: ""',
            "  access-control: 0.0.0.0/0 allow", "  do-ip6: no",
            '  module-config: "iterator"', "  verbosity: 0",
        ]
        if servfail:
            lines += ["forward-zone:", f'  name: "{self.zone}."', "  forward-addr: 127.0.0.1@9"]
        else:
            lines.append(f'  local-zone: "{self.zone}." static')
            lines += [f'  local-data: "{name}. 60 IN A {address}"'
                      for name, address in self.records.items()]
        return "\n".join(lines) + "\n"

    def start(self, *, servfail: bool = False) -> None:
        self.stop()
        self.config.write_text(self._config_text(servfail))
        self.proc = self.host.popen(["unbound", "-d", "-c", str(self.config)], name="unbound")
        proc = self.proc
        wait_for(lambda: self._answers() or proc.poll() is not None, 60, "unbound to answer")
        if proc.poll() is not None:
            raise LabError(f"unbound exited with {proc.returncode} (see {self.lab.dir})")

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.stop_process(self.proc)
            self.proc = None

    def _answers(self) -> bool:
        """A query for the zone's first name gets any answer (a SERVFAIL included)."""
        name = next(iter(self.records), self.zone)
        with self.host.entered(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            with contextlib.suppress(OSError):
                s.sendto(dns.build_query(name, dns.RecordType.A, 1), (self.address, 53))
                return dns.response_ident(s.recv(1500)) == 1
        return False


def start_reflector(host: Host, port: int = REFLECTOR_PORT) -> subprocess.Popen[bytes]:
    """``tunnelwatch reflector`` on ``host``:``port``, answering once :func:`start` returns."""
    proc = host.popen([sys.executable, "-m", "probes.cli", "reflector", "--listen",
                       f"{host.address}:{port}"], name="reflector")
    request = reflector.build_request(reflector.Kind.ECHO, b"labprobe", 0)

    def answers() -> bool:
        with host.entered(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            with contextlib.suppress(OSError):
                s.sendto(request, (host.address, port))
                return reflector.parse_reply(s.recv(1500)) is not None
        return False

    wait_for(lambda: answers() or proc.poll() is not None, 60, "the reflector to answer")
    if proc.poll() is not None:
        raise LabError(f"the reflector exited with {proc.returncode}")
    return proc


def start_https(host: Host, cert: str, key: str,
                port: int = HTTPS_PORT) -> subprocess.Popen[bytes]:
    """An HTTPS server on ``host``:``port`` with ``cert``/``key``, accepting connections once
    this returns."""
    proc = host.popen([sys.executable, "-c", _HTTPS_SERVER, host.address, str(port), cert, key],
                      name="https")

    def accepts() -> bool:
        with host.entered(), socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex((host.address, port)) == 0

    wait_for(lambda: accepts() or proc.poll() is not None, 60, "the HTTPS server to accept")
    if proc.poll() is not None:
        raise LabError(f"the HTTPS server exited with {proc.returncode}")
    return proc
