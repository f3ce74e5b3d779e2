"""Shared fixtures for anycast tests: gobgpd speakers per PoP and a BIRD upstream in the lab."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from probes.lab import Host, Lab
from probes.lab.bgp import BirdPeer, GoBgpDaemon
from probes.lab.topology import wait_for
from probes.mesh.bgp.controller import AnycastConfig, AnycastController, PopSpeakerConfig
from probes.mesh.bgp.pop import PopPolicy
from probes.mesh.bgp.speaker import Announcement, GoBgpSpeaker
from tests.conftest import lab_unavailable

PREFIX = "192.0.2.0/24"  # documentation range: lives only in the lab's BGP RIBs
POPS = ("pop1", "pop2", "pop3")


@dataclass
class Anycast:
    lab: Lab
    control: Host  # where the controller (the mesh) runs; it reaches the speakers' APIs
    peer: BirdPeer
    daemons: dict[str, GoBgpDaemon]
    config: AnycastConfig

    def members(self) -> list[tuple[str, str, str]]:
        return [(f"{p}-n{j}", p, "node") for p in POPS for j in (1, 2)]

    def controller(self) -> AnycastController:
        speakers = {p: CountingSpeaker(GoBgpSpeaker(d.api_host, d.api_port, local_asn=d.asn))
                    for p, d in self.daemons.items()}
        return AnycastController(self.config, self.members(), speakers)  # type: ignore[arg-type]

    def paths(self) -> dict[str, int | None]:
        return {r.neighbor: r.med for r in self.peer.routes(PREFIX)}

    def wait_paths(self, expected: dict[str, int | None], timeout: float = 10.0) -> float:
        start = time.monotonic()
        wait_for(lambda: self.paths() == expected, timeout, f"peer RIB {expected}", 0.02)
        return time.monotonic() - start


class CountingSpeaker:
    """Wraps a real speaker and counts the changes it was asked to make."""

    def __init__(self, inner: GoBgpSpeaker) -> None:
        self.inner, self.changes = inner, 0

    async def announced(self) -> dict[str, Announcement]:
        return await self.inner.announced()

    async def announce(self, route: Announcement) -> None:
        self.changes += 1
        await self.inner.announce(route)

    async def withdraw(self, prefix: str) -> None:
        self.changes += 1
        await self.inner.withdraw(prefix)


@pytest.fixture
def anycast() -> Iterator[Anycast]:
    if reason := lab_unavailable():
        pytest.skip(reason)
    if not (shutil.which("gobgpd") and shutil.which("bird")):
        pytest.skip("gobgpd or bird missing (make test installs them)")
    with Lab("anycast") as lab:
        control = lab.add_host("control")
        upstream = lab.add_host("upstream")
        peer = BirdPeer(lab, upstream)
        hosts = {p: lab.add_host(p) for p in POPS}
        for i, p in enumerate(POPS):
            peer.add_neighbor(p, hosts[p].address, 65101 + i)
        peer.start()
        daemons = {p: GoBgpDaemon(lab, hosts[p], asn=65101 + i, peer=peer)
                   for i, p in enumerate(POPS)}
        for d in daemons.values():
            d.start()
        wait_for(lambda: all(peer.established(p) for p in POPS), 60, "BGP sessions")
        config = AnycastConfig(
            pops=[PopSpeakerConfig(pop=p, api_host=d.api_host, asn=d.asn, prefixes=[PREFIX])
                  for p, d in daemons.items()],
            policy=PopPolicy(up_after_seconds=1.0, max_withdrawn=1),
            reconcile_interval_seconds=3600)
        yield Anycast(lab, control, peer, daemons, config)
