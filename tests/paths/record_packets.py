"""Record real traces packet by packet for the trace core's unit tests:
``python -m tests.paths.record_packets`` (root).

Runs the agent's trace shell (probes/checks/traceroute.py) from a namespace over a chain of
real Linux routers (tests/paths/chainnet.py: v -- r1 -- r2 -- r3 -- n), once per situation the
core must read right: the node answering (UDP port unreachable, TCP SYN-ACK and RST, ICMP echo
reply), a silent VPN port, a black hole, a smaller link with and without "fragmentation
needed", a rate-limited router, a router saying unreachable, a forwarding loop. The core in the
shell is wrapped so that every call the shell makes is written down with its ``now``, the
packets it got from the kernel and the probes it sent: ``data/real-traces.jsonl``, one
``{"name", "spec", "calls", "result"}`` per trace. test_trace_replay.py feeds the same calls to
a fresh core: the same probes must come out, byte for byte, and the same hops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from probes.checks import traceroute as shell
from probes.lab import netns
from probes.lab.topology import Lab
from probes.model import TraceProtocol
from probes.protocols.traceroute import TraceCore, TraceSpec
from tests.paths.chainnet import Chain

DATA = Path(__file__).parent / "data"
NAMES = ("v", "r1", "r2", "r3", "n")
NET = "10.82"
NODE = f"{NET}.4.2"
SILENT_PORT, CLOSED_PORT, TCP_OPEN, TCP_CLOSED = 51820, 33434, 443, 444


class RecordingCore(TraceCore):
    """The shell's core, writing down every call the shell makes (the spec as the shell
    completed it: source address, id base, big probe size)."""

    last: RecordingCore | None = None

    def __init__(self, spec: TraceSpec) -> None:
        super().__init__(spec)
        self.calls: list[list[Any]] = []
        RecordingCore.last = self

    def start(self, now: float) -> None:
        self.calls.append(["start", now])
        super().start(now)

    def handle_timer(self, now: float) -> None:
        self.calls.append(["timer", now])
        super().handle_timer(now)

    def datagrams_to_send(self, now: float) -> list[bytes]:
        out = super().datagrams_to_send(now)
        self.calls.append(["send", now, [p.hex() for p in out]])
        return out

    def receive_datagram(self, data: bytes, addr: object, now: float) -> None:
        self.calls.append(["recv", now, data.hex()])
        super().receive_datagram(data, addr, now)

    def local_error(self, packet: bytes, mtu: int | None = None) -> None:
        self.calls.append(["local-error", packet.hex(), mtu])
        super().local_error(packet, mtu)


Setup = Callable[[Chain], None]


def _nothing(chain: Chain) -> None:
    pass


def _ratelimit(chain: Chain, router: str, ms: int) -> None:
    chain.run(router, "sysctl", "-qw", f"net.ipv4.icmp_ratelimit={ms}")


def _drained_ratelimit(chain: Chain) -> None:
    """r2 answers v once every 250 ms, its saved-up answers spent just before the trace: the
    first probes to it go unanswered, a retry 300 ms later gets one answer."""
    _ratelimit(chain, "r2", 250)
    with netns.entered(chain.ns["v"]), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 2)
        for _ in range(12):
            s.sendto(b"x", (NODE, CLOSED_PORT))


def _unreachable_route(chain: Chain) -> None:
    chain.run("r3", "ip", "route", "add", "unreachable", f"{NODE}/32")


def _warm_unreachable_route(chain: Chain) -> None:
    _unreachable_route(chain)
    with netns.entered(chain.ns["v"]), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", (NODE, CLOSED_PORT))  # r3 notes us, tokens start to build
    time.sleep(3.0)


def _reachable_again(chain: Chain) -> None:
    chain.run("r3", "ip", "route", "del", "unreachable", f"{NODE}/32")


def _scenarios() -> list[tuple[str, dict[str, Any], Setup, Setup]]:
    udp = {"protocol": TraceProtocol.UDP, "port": SILENT_PORT}
    big = {**udp, "big_size": 1500}  # large DF probes only where the MTU is the point
    small_link = lambda c: c.run("r2", "ip", "link", "set", c.link("r2", "r3"),  # noqa: E731
                                 "mtu", "1280")
    big_link = lambda c: c.run("r2", "ip", "link", "set", c.link("r2", "r3"),  # noqa: E731
                               "mtu", "1500")
    return [
        ("udp-closed-port", {"protocol": TraceProtocol.UDP, "port": CLOSED_PORT,
                             "big_size": 1500},
         _nothing, _nothing),
        ("udp-silent-port", udp, _nothing, _nothing),
        ("tcp-syn-ack", {"protocol": TraceProtocol.TCP, "port": TCP_OPEN}, _nothing, _nothing),
        ("tcp-reset", {"protocol": TraceProtocol.TCP, "port": TCP_CLOSED}, _nothing, _nothing),
        ("icmp-echo", {"protocol": TraceProtocol.ICMP, "port": 0}, _nothing, _nothing),
        ("black-hole-after-r2", udp,
         lambda c: c.nft("r2", f"ip daddr {NODE} drop", "forward"),
         lambda c: c.clear_nft("r2", "forward")),
        ("frag-needed-at-r2", big, small_link, big_link),
        ("pmtu-black-hole-at-r2", big,
         lambda c: (small_link(c), c.nft("r2", "icmp type destination-unreachable icmp code "
                                         "frag-needed drop", "output")),
         lambda c: (big_link(c), c.clear_nft("r2", "output"))),
        # Linux limits the ICMP errors it sends per destination: one every icmp_ratelimit ms
        # (up to six saved up)
        ("rate-limited-r2", udp, _drained_ratelimit, lambda c: _ratelimit(c, "r2", 0)),
        ("silent-r2", udp, lambda c: _ratelimit(c, "r2", 60000),
         lambda c: _ratelimit(c, "r2", 0)),
        # an unreachable route: as first met, Linux answers nothing (route.error_cost: an
        # error's tokens build up from the first one); met again a while later, it answers
        ("unreachable-at-r3-first", udp, _unreachable_route, _reachable_again),
        ("unreachable-at-r3", udp, _warm_unreachable_route, _reachable_again),
        ("loop-r1-r2", udp,
         lambda c: c.run("r2", "ip", "route", "add", f"{NODE}/32", "via",
                         c.address("r1", "r2")),
         lambda c: c.run("r2", "ip", "route", "del", f"{NODE}/32")),
    ]


def _trace(chain: Chain, spec: TraceSpec) -> RecordingCore:
    with netns.entered(chain.ns["v"]):
        run = asyncio.run(shell.trace(spec))
    core = RecordingCore.last
    assert core is not None and core.result() == run.flows
    return core


def main() -> None:
    shell.TraceCore = RecordingCore  # type: ignore[misc]  # the recorder's only patch
    out = []
    with Lab("pktrec") as lab:
        chain = Chain(lab, NAMES, NET)
        chain.nft("n", f"udp dport {SILENT_PORT} drop", "input")  # silent, as WireGuard is
        with netns.entered(chain.ns["n"]):
            listener = socket.create_server(("0.0.0.0", TCP_OPEN))
        try:
            for name, how, setup, undo in _scenarios():
                setup(chain)
                try:
                    spec = TraceSpec(source="", target=NODE, flows=(61000, 61001), attempts=2,
                                     probe_timeout=0.3, gap_limit=2,
                                     packets_per_second=200, **how)
                    core = _trace(chain, spec)
                finally:
                    undo(chain)
                out.append({"name": name, "spec": msgspec.to_builtins(
                    dataclasses.asdict(core.spec)), "calls": core.calls,
                    "result": msgspec.to_builtins(core.result())})
                hops = [[h.addr or "*" for h in f.hops] + [str(f.stop)] for f in core.result()]
                print(name, hops)
        finally:
            listener.close()
    DATA.mkdir(exist_ok=True)
    (DATA / "real-traces.jsonl").write_text("".join(json.dumps(o) + "\n" for o in out))
    print(f"{len(out)} traces recorded")


if __name__ == "__main__":
    main()
