"""Reading path traces: where a failing trace stops, which ECMP branch loses a flow, where big
packets vanish, whether a route changed. Pure functions of annotated traces (no state, no
clock), so the localisation engine (:mod:`probes.mesh.paths`) is replayable.

Vocabulary:

* a trace's *flows* share addresses, protocol and destination port; small flows differ by
  source port (so per-flow load balancing may send them down different branches), the big flow
  repeats the first small flow's port with large DF probes;
* a flow's *extent* is its last answering hop; a flow *reached* the node when the node itself
  answered. A node that is silent on its port (every UDP VPN port) never answers, so a healthy
  flow ends with the last router before it;
* a vantage's *reference* is its last trace taken while it saw the node passing: where a
  failing trace stops is judged against where the reference went on.

Silent hops are wildcards everywhere: a router that rate-limits its ICMP answers some probes and
not others, which must never read as a route change or as a loss.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from probes.model import HopReply, TraceProtocol, TraceStop, TraceTrigger
from probes.paths.asn import Network

NOWHERE = Network(None)  # a silent hop's network: none
_NODE_REPLIES = frozenset({HopReply.PORT_UNREACHABLE, HopReply.ECHO_REPLY, HopReply.TCP_SYN_ACK,
                           HopReply.TCP_RESET})


@dataclass(frozen=True, slots=True)
class Hop:
    ttl: int
    addr: str = ""  # "" = nothing answered
    network: Network = NOWHERE
    reply: HopReply | None = None
    rtt: float | None = None
    mtu: int | None = None

    def where(self) -> str:
        """``10.0.3.2 (AS64510 transit-1)``, for notes."""
        return f"{self.addr} ({self.network.describe()})" if self.addr else "no answer"


@dataclass(frozen=True, slots=True)
class Flow:
    sport: int
    size: int
    stop: TraceStop
    hops: tuple[Hop, ...]

    @property
    def answered(self) -> tuple[Hop, ...]:
        return tuple(h for h in self.hops if h.addr)

    @property
    def last(self) -> Hop | None:
        answered = self.answered
        return answered[-1] if answered else None

    @property
    def extent(self) -> int:
        """TTL of the last answer (0: nothing answered)."""
        last = self.last
        return last.ttl if last is not None else 0

    @property
    def reached(self) -> bool:
        last = self.last
        return last is not None and last.reply in _NODE_REPLIES

    def at(self, ttl: int) -> Hop | None:
        for hop in self.hops:
            if hop.ttl == ttl:
                return hop
        return None


@dataclass(frozen=True, slots=True)
class Trace:
    """A :class:`probes.model.PathTrace` with every hop's network looked up."""

    node: str
    vantage: str
    wall_time: float
    received: float  # mesh time it arrived (freshness is judged on this clock)
    trigger: TraceTrigger
    failing: bool
    target: str
    protocol: TraceProtocol
    port: int
    flows: tuple[Flow, ...]

    @property
    def small(self) -> tuple[Flow, ...]:
        smallest = min((f.size for f in self.flows), default=0)
        return tuple(f for f in self.flows if f.size == smallest)

    @property
    def main(self) -> Flow | None:
        """The first small flow: the same source port in every trace of this (vantage, node)."""
        small = self.small
        return small[0] if small else None

    @property
    def big(self) -> Flow | None:
        main = self.main
        for f in self.flows:
            if main is not None and f.sport == main.sport and f.size > main.size:
                return f
        return None

    def comparable(self, other: Trace) -> bool:
        main, theirs = self.main, other.main
        return (self.target == other.target and self.protocol == other.protocol
                and self.port == other.port and main is not None and theirs is not None
                and main.sport == theirs.sport)


# ------------------------------------------------------------------------------ findings

STOP, ECMP, MTU, NODE_NETWORK, LOOP, UNREACHABLE, NO_ANSWER = (
    "stop", "ecmp-branch", "mtu", "node-network", "loop", "unreachable", "no-answer")


@dataclass(frozen=True, slots=True)
class Finding:
    """Where one failing trace loses the node.

    ``kind``: ``stop`` (every flow stops after ``hop``), ``ecmp-branch`` (the flows through
    ``hop``, one branch of a load-balanced pair, stop; the flows through ``other`` go on),
    ``mtu`` (big probes stop after ``hop`` while small ones go on; ``mtu`` when a router said
    how big), ``unreachable`` (``hop`` answered unreachable), ``loop``, ``node-network`` (the
    trace gets as far as passing traces do: the path is intact to the node's own network),
    ``no-answer`` (not even the first hop answered)."""

    kind: str
    hop: Hop | None = None  # the last hop that answered before the loss (the branch for ECMP)
    other: Hop | None = None  # ECMP: the branch that works
    mtu: int | None = None
    size: int | None = None  # MTU: the size of the probes that vanished
    flows_lost: int = 0
    flows: int = 0
    next_hop: Hop | None = None  # from the reference: where the path used to go on

    @property
    def ttl(self) -> int:
        return self.hop.ttl if self.hop is not None else 0

    @property
    def network(self) -> Network:
        return self.hop.network if self.hop is not None else NOWHERE

    def key(self) -> tuple[str, str, str, int | None]:
        """What identifies the finding for "did the localisation change?"."""
        return (self.kind, self.network.label, self.hop.addr if self.hop else "", self.mtu)

    def sentence(self, vantage: str, node: str) -> str:
        hop = self.hop.where() if self.hop else ""
        if self.kind == NODE_NETWORK:
            text = (f"{vantage} reaches the last hop before {node} ({hop}) as its passing "
                    "traces do: the path is intact to the node's own network")
        elif self.kind == ECMP:
            other = self.other.where() if self.other else "the other branch"
            text = (f"{vantage} loses {node} on one branch of a load-balanced pair: "
                    f"{self.flows_lost} of {self.flows} flows through {hop} stop, "
                    f"flows through {other} go on")
        elif self.kind == MTU:
            how = (f"a router sent frag-needed for MTU {self.mtu}" if self.mtu
                   else "no frag-needed came back (a PMTU black hole)")
            text = (f"{vantage}: {self.size}-byte packets to {node} stop after {hop} while "
                    f"small ones go on; {how}")
        elif self.kind == UNREACHABLE:
            text = f"{vantage} is told {node} is unreachable by {hop}"
        elif self.kind == LOOP:
            text = f"{vantage}'s packets to {node} loop after {hop}"
        elif self.kind == NO_ANSWER:
            text = f"{vantage} gets no answer from any hop toward {node}"
        else:
            text = f"{vantage} loses {node} after hop {self.ttl} {hop}"
        if self.next_hop is not None and self.kind in (STOP, UNREACHABLE, LOOP):
            text += f"; its passing trace went on to {self.next_hop.where()}"
        return text


def finding(trace: Trace, reference: Trace | None) -> Finding:
    """Where the failing ``trace`` loses the node, judged against the vantage's ``reference``
    (its last passing trace, if any)."""
    small = trace.small
    if not small:
        return Finding(NO_ANSWER)
    split = _ecmp_split(small)
    if split is not None:
        return split
    longest = max(small, key=lambda f: (f.reached, f.extent))
    last = longest.last
    if last is None:
        return Finding(NO_ANSWER, flows_lost=len(small), flows=len(small))
    mtu = _mtu_loss(trace, reference)
    if mtu is not None:
        return mtu
    next_hop = _next_in_reference(reference, trace, last.ttl)
    if longest.stop is TraceStop.LOOP:
        return Finding(LOOP, last, flows_lost=len(small), flows=len(small), next_hop=next_hop)
    if last.reply is HopReply.UNREACHABLE:
        return Finding(UNREACHABLE, last, flows_lost=len(small), flows=len(small),
                       next_hop=next_hop)
    if longest.reached or _as_far_as(reference, trace, last):
        return Finding(NODE_NETWORK, last, flows=len(small))
    return Finding(STOP, last, flows_lost=len(small), flows=len(small), next_hop=next_hop)


def _ecmp_split(small: tuple[Flow, ...]) -> Finding | None:
    """Some flows stop where others go on, and the stopping ones went through a router the
    others did not: that router's branch loses the node's port."""
    if len(small) < 2:
        return None
    furthest = max(f.extent for f in small)
    going = [f for f in small if f.reached or f.extent == furthest]
    stopping = [f for f in small if f not in going and f.extent > 0]
    if not stopping or not going:
        return None
    for ttl in range(1, max(f.extent for f in stopping) + 1):
        theirs = {h.addr for f in going if (h := f.at(ttl)) is not None and h.addr}
        ours = [h for f in stopping if (h := f.at(ttl)) is not None and h.addr]
        if theirs and ours and all(h.addr not in theirs for h in ours) and (
                len({h.addr for h in ours}) == 1):
            other = next(h for f in going if (h := f.at(ttl)) is not None and h.addr)
            return Finding(ECMP, ours[0], other, flows_lost=len(stopping), flows=len(small))
    return None


def _mtu_loss(trace: Trace, reference: Trace | None) -> Finding | None:
    """Big probes of the main flow stop before the small ones do, and did not when the vantage
    last saw the node passing (a path MTU below the probe size that was always there is not
    why the node fails now)."""
    found = _big_stop(trace)
    if found is None:
        return None
    if reference is not None and reference.comparable(trace):
        before = _big_stop(reference)
        if before is not None and before.key() == found.key():
            return None
    return found


def _big_stop(trace: Trace) -> Finding | None:
    main, big = trace.main, trace.big
    if main is None or big is None or big.stop is TraceStop.LOCAL_ERROR:
        return None
    frag = next((h for h in big.answered if h.reply is HopReply.FRAG_NEEDED), None)
    if frag is not None:
        # the router that refused is the one that answered the small probe from that address
        at = next((h for h in main.answered if h.addr == frag.addr), None)
        hop = at or main.at(frag.ttl - 1) or frag
        return Finding(MTU, hop, mtu=frag.mtu, size=big.size)
    big_last = big.last
    if big.stop is TraceStop.GAP and big.extent < main.extent and big_last is not None:
        return Finding(MTU, main.at(big_last.ttl) or big_last, size=big.size)
    return None


def _next_in_reference(reference: Trace | None, trace: Trace, ttl: int) -> Hop | None:
    if reference is None or not reference.comparable(trace):
        return None
    ref = reference.main
    if ref is None:
        return None
    return next((h for h in ref.answered if h.ttl > ttl), None)


def _as_far_as(reference: Trace | None, trace: Trace, last: Hop) -> bool:
    """The failing trace gets as far as the vantage's passing trace did (to the hop before
    the node, when the node itself used to answer): nothing was lost on the way that a trace
    can see."""
    if reference is None or not reference.comparable(trace):
        return False
    ref = reference.main
    if ref is None or ref.last is None:
        return False
    return last.ttl >= (ref.extent - 1 if ref.reached else ref.extent)


def mtu_limit(trace: Trace) -> int | None:
    """The path MTU a trace's big probes ran into (frag-needed), whether failing or not."""
    big = trace.big
    if big is None:
        return None
    return next((h.mtu for h in big.answered if h.reply is HopReply.FRAG_NEEDED), None)


# ------------------------------------------------------------------------------ routes


@dataclass(frozen=True, slots=True)
class RouteChange:
    """The main flow's path differs from the previous trace's at ``ttl``."""

    at: float  # mesh time the new trace arrived
    ttl: int
    before: Hop | None
    after: Hop | None
    hops_before: int
    hops_after: int

    def sentence(self, vantage: str, node: str) -> str:
        old = self.before.where() if self.before else "nothing"
        new = self.after.where() if self.after else "nothing"
        return (f"the path from {vantage} to {node} changed at hop {self.ttl}: {old} -> {new} "
                f"({self.hops_before} -> {self.hops_after} hops)")


def route_change(old: Trace, new: Trace) -> RouteChange | None:
    """A different router at the same TTL (both answered), or the node answering at a
    different distance. A trace that just ends sooner (a failing one) or later (a silent hop
    answering this time) is not a route change."""
    if not old.comparable(new):
        return None
    a, b = old.main, new.main
    assert a is not None and b is not None
    for hop in b.answered:
        before = a.at(hop.ttl)
        if before is not None and before.addr and before.addr != hop.addr:
            return RouteChange(new.received, hop.ttl, before, hop, a.extent, b.extent)
    if a.reached and b.reached and a.extent != b.extent:
        ttl = min(a.extent, b.extent)
        return RouteChange(new.received, ttl, a.at(ttl), b.at(ttl), a.extent, b.extent)
    return None


def degraded(new: Trace, reference: Trace) -> bool:
    """``new`` goes less far than ``reference`` on the same route: its main flow ends sooner,
    or its big probes stop sooner (or meet a frag-needed the reference did not). A passing
    trace like that was taken after a fault began but before the vantage's checks noticed; it
    must not become the picture of the healthy path."""
    if not reference.comparable(new) or route_change(reference, new) is not None:
        return False
    a, b = reference.main, new.main
    assert a is not None and b is not None
    if b.extent < a.extent and not b.reached:
        return True
    big_a, big_b = reference.big, new.big
    if big_a is None or big_b is None:
        return False
    return big_b.extent < big_a.extent or (mtu_limit(new) is not None
                                           and mtu_limit(reference) is None)


def fingerprint(trace: Trace) -> str:
    """The main flow's answering hops, ``ttl:address`` joined: equal for equal routes. (Use
    :func:`route_change` to compare: a silent hop changes the fingerprint, not the route.)"""
    main = trace.main
    if main is None:
        return ""
    text = ",".join(f"{h.ttl}:{h.addr}" for h in main.answered)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def crosses(trace: Trace, asn: int) -> Hop | None:
    """The last hop of ``trace``'s main flow inside AS ``asn``, if it goes through it."""
    main = trace.main
    if main is None:
        return None
    inside = [h for h in main.answered if h.network.asn == asn]
    return inside[-1] if inside else None


def continues_past(trace: Trace, hop: Hop) -> bool:
    main = trace.main
    return main is not None and (main.reached or main.extent > hop.ttl)


def as_path(trace: Trace) -> list[str]:
    """The main flow's networks in order, repeats and silent hops left out."""
    out: list[str] = []
    main = trace.main
    for hop in main.answered if main is not None else ():
        label = hop.network.label
        if not out or out[-1] != label:
            out.append(label)
    return out


def common(values: Iterable[str]) -> str | None:
    found = set(values)
    return found.pop() if len(found) == 1 else None
