"""BGP speakers the anycast controller drives. GoBGP is the primary one.

Why GoBGP: ``gobgpd`` keeps the routes it was given in its own RIB, independent of whoever
added them — if the controller or the whole mesh dies, nothing is withdrawn unless the BGP
session itself drops (the safe failure mode for anycast). It takes imperative announce/withdraw
calls over gRPC (here through the ``gobgp`` CLI, which speaks that API, locally or to a remote
``--api-hosts`` address), reports what it announces as JSON for reconciliation, and carries
MED and AS-path attributes for soft drains. ExaBGP needs its process API wired to a child
process it owns; BIRD needs a configuration rewrite per change. Both fit the same
:class:`Speaker` protocol if a deployment prefers them.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Protocol


class SpeakerError(RuntimeError):
    """The speaker could not be reached or refused a change."""


@dataclass(frozen=True, slots=True)
class Announcement:
    prefix: str
    med: int | None = None
    prepend: int = 0  # extra copies of our own ASN (soft drain by AS-path length)
    next_hop: str | None = None


class Speaker(Protocol):
    async def announced(self) -> dict[str, Announcement]: ...

    async def announce(self, route: Announcement) -> None: ...

    async def withdraw(self, prefix: str) -> None: ...


# BGP path attribute type codes in GoBGP's JSON
_AS_PATH = 2
_NEXT_HOP = 3
_MED = 4


class GoBgpSpeaker:
    """One ``gobgpd`` reached through its gRPC API with the ``gobgp`` CLI."""

    def __init__(self, api_host: str, api_port: int = 50051, *, local_asn: int,
                 gobgp: str = "gobgp", timeout: float = 5.0) -> None:
        self.api_host, self.api_port, self.local_asn = api_host, api_port, local_asn
        self.gobgp, self.timeout = gobgp, timeout

    async def _run(self, *args: str) -> str:
        argv = [self.gobgp, "-u", self.api_host, "-p", str(self.api_port), *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except (OSError, TimeoutError) as exc:
            raise SpeakerError(f"gobgp at {self.api_host}:{self.api_port}: {exc}") from exc
        if proc.returncode != 0:
            raise SpeakerError(f"gobgp {' '.join(args[:4])}: {err.decode().strip()}")
        return out.decode()

    async def announced(self) -> dict[str, Announcement]:
        text = await self._run("global", "rib", "-a", "ipv4", "-j")
        return parse_rib(text, self.local_asn)

    async def announce(self, route: Announcement) -> None:
        args = ["global", "rib", "add", "-a", "ipv4", route.prefix]
        if route.next_hop:
            args += ["nexthop", route.next_hop]
        if route.med is not None:
            args += ["med", str(route.med)]
        if route.prepend:
            args += ["aspath", " ".join([str(self.local_asn)] * route.prepend)]
        # gobgpd replaces its own earlier path for the same prefix: a re-announce with new
        # attributes is one UPDATE, never a withdraw-then-announce
        await self._run(*args)

    async def withdraw(self, prefix: str) -> None:
        await self._run("global", "rib", "del", "-a", "ipv4", prefix)


def parse_rib(text: str, local_asn: int) -> dict[str, Announcement]:
    """GoBGP ``global rib -j`` output -> the routes it originates, keyed by prefix."""
    text = text.strip()
    if not text:
        return {}
    try:
        data: Any = json.loads(text)
    except ValueError as exc:
        raise SpeakerError(f"gobgp printed something that is not JSON: {text[:80]!r}") from exc
    routes: dict[str, Announcement] = {}
    if not isinstance(data, dict):
        raise SpeakerError("gobgp rib JSON is not an object")
    for prefix, paths in data.items():
        for path in paths if isinstance(paths, list) else []:
            if not isinstance(path, dict):
                continue
            med: int | None = None
            prepend = 0
            next_hop: str | None = None
            for attr in path.get("attrs", []):
                kind = attr.get("type")
                if kind == _MED:
                    med = int(attr.get("metric", 0))
                elif kind == _AS_PATH:
                    for segment in attr.get("as_paths", []):
                        prepend += sum(1 for asn in segment.get("asns", []) if asn == local_asn)
                elif kind == _NEXT_HOP:
                    hop = attr.get("nexthop")
                    next_hop = None if hop in (None, "0.0.0.0") else str(hop)  # noqa: S104
            routes[prefix] = Announcement(prefix, med=med, prepend=prepend, next_hop=next_hop)
    return routes
