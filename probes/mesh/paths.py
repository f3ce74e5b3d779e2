"""Path localisation: traces in, where each vantage loses each node out. Pure and replayable.

The engine beside the decision engine (docs/paths.md). Its one input is
:meth:`PathEngine.ingest` (the traces of an agent batch, with the ``now`` the batch was applied
at); everything else reads. It holds, per (node, vantage), the latest trace, the vantage's last
*passing* trace (its reference: where the path used to go), the finding of a failing latest
trace, and the route history (a route change is the main flow's path differing from the
previous trace's, see :func:`probes.mesh.pathcompare.route_change`).

Reads, all pure functions of the state and ``now``:

* :meth:`PathEngine.localise`: for a node, every failing vantage's finding, confirmed by the
  passing vantages whose paths cross the same network and go on; the network every failing
  vantage shares, if one does ("lost after AS64510");
* :meth:`PathEngine.vantage_fault`: the network after which one vantage loses most of the
  nodes it fails (the evidence for an impaired vantage: its own provider);
* :meth:`PathEngine.evidence`: both as verdict reasons, plus recent route changes;
* :meth:`PathEngine.node_view` for the API, :meth:`PathEngine.faults` for metrics.

Which traces count: a failing vantage's latest trace while it is younger than
``failing_max_age_seconds``; a passing trace (another vantage's, or the failing vantage's own
reference) while younger than ``reference_max_age_seconds``. Hop networks come from the
operator's ASN table (:mod:`probes.paths.asn`) when a trace arrives.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from probes.duration import Duration
from probes.mesh import pathcompare as pc
from probes.mesh.pathcompare import Finding, Flow, Hop, RouteChange, Trace
from probes.mesh.state import AuditNote
from probes.model import PathTrace, VerdictReason
from probes.paths.asn import EMPTY, AsnTable, Network

ROWS_VERSION = 1
NOTES_KEPT = 1000  # audit notes kept until taken (a replay that never takes them stays bounded)
_trace_decoder = msgspec.json.Decoder(PathTrace)


class PathPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How old a trace may be and still speak (mesh clock, seconds)."""

    failing_max_age_seconds: Duration = 900.0  # a failing vantage's trace
    reference_max_age_seconds: Duration = 7200.0  # a passing trace (agents re-trace every 30 m)
    route_change_window_seconds: Duration = 900.0  # a route change is verdict evidence this long
    vantage_min_nodes: int = 2  # failing nodes a vantage-wide network finding needs
    max_reasons: int = 8  # path reasons per verdict


@dataclass(slots=True)
class PairState:
    """One (node, vantage): what its traces say."""

    latest: Trace | None = None
    reference: Trace | None = None  # the last passing trace (the latest itself when passing)
    finding: Finding | None = None  # where the latest trace loses the node, when it failed
    fingerprint: str = ""
    changes: int = 0
    last_change: RouteChange | None = None
    raw: tuple[PathTrace | None, PathTrace | None] = (None, None)  # (latest, reference)


@dataclass(frozen=True, slots=True)
class VantageFinding:
    vantage: str
    finding: Finding
    confirmed_by: tuple[str, ...] = ()  # passing vantages that cross its network and go on


@dataclass(frozen=True, slots=True)
class NodeLocalisation:
    node: str
    findings: tuple[VantageFinding, ...]
    network: Network | None  # the network every failing vantage loses the node after, if one

    def key(self) -> tuple[tuple[str, str, str, str, int | None], ...]:
        return tuple((f.vantage, *f.finding.key()) for f in self.findings)

    def summary(self) -> str:
        vantages = ", ".join(f.vantage for f in self.findings)
        if self.network is None:
            return f"failing vantages ({vantages}) lose {self.node} in different places"
        kinds = {f.finding.kind for f in self.findings}
        if kinds == {pc.NODE_NETWORK}:
            return (f"every failing vantage ({vantages}) reaches {self.network.describe()}, "
                    f"the network in front of {self.node}: the path is intact, look at the node")
        return (f"every failing vantage ({vantages}) loses {self.node} after "
                f"{self.network.describe()}: check ASN routing")


@dataclass(frozen=True, slots=True)
class VantageFault:
    """One vantage loses most of the nodes it fails after the same network."""

    vantage: str
    network: Network
    hop: Hop | None
    nodes: int  # failing nodes lost after ``network``
    failing: int  # failing nodes with a trace

    def sentence(self) -> str:
        hop = f" (hop {self.hop.where()})" if self.hop is not None else ""
        return (f"{self.vantage} loses {self.nodes} of the {self.failing} nodes it fails after "
                f"{self.network.describe()}{hop}: its own network, check its ASN routing")


def annotate(trace: PathTrace, table: AsnTable, received: float) -> Trace:
    """Look up every hop's network."""
    flows = tuple(
        Flow(f.sport, f.size, f.stop, tuple(
            Hop(h.ttl, h.addr, table.lookup(h.addr) if h.addr else pc.NOWHERE, h.reply,
                h.rtt_seconds, h.mtu) for h in f.hops))
        for f in trace.flows)
    return Trace(trace.node, trace.vantage, trace.wall_time, received, trace.trigger,
                 trace.failing, trace.target, trace.protocol, trace.port, flows)


@dataclass
class PathEngine:
    policy: PathPolicy = field(default_factory=PathPolicy)
    table: AsnTable = EMPTY
    nodes: set[str] = field(default_factory=set)
    pairs: dict[str, dict[str, PairState]] = field(default_factory=dict)  # node -> vantage
    announced: dict[str, Any] = field(default_factory=dict)  # node -> last localisation key
    traces_total: dict[str, int] = field(default_factory=dict)  # by vantage
    route_changes_total: dict[str, int] = field(default_factory=dict)  # by vantage
    unknown_node_total: int = 0
    news_total: int = 0  # localisation changes noted after the verdict they explain
    notes: deque[AuditNote] = field(default_factory=lambda: deque(maxlen=NOTES_KEPT))
    _failing: set[tuple[str, str]] = field(default_factory=set)  # pairs whose latest failed

    def set_nodes(self, nodes: Iterable[str]) -> None:
        """The configured nodes; the traces of a node no longer configured are forgotten."""
        self.nodes = set(nodes)
        for gone in [n for n in self.pairs if n not in self.nodes]:
            del self.pairs[gone]
            self.announced.pop(gone, None)
        self._failing = {p for p in self._failing if p[0] in self.nodes}

    # ---- the input ------------------------------------------------------------------------

    def ingest(self, traces: Sequence[PathTrace], now: float) -> list[str]:
        """Take the traces of one batch; return the nodes whose localisation now differs
        from what their last verdict said (the caller may publish it again with the news)."""
        touched: set[str] = set()
        for raw in traces:
            if raw.node not in self.nodes:
                self.unknown_node_total += 1
                continue
            self._take(raw, now)
            touched.add(raw.node)
        changed = []
        for node in sorted(touched):
            loc = self.localise(node, now)
            key = loc.key() if loc is not None else ()
            if key != self.announced.get(node, ()):
                changed.append(node)
        return changed

    def _take(self, raw: PathTrace, now: float) -> None:
        trace = annotate(raw, self.table, now)
        vantage = raw.vantage
        pair = self.pairs.setdefault(raw.node, {}).setdefault(vantage, PairState())
        self.traces_total[vantage] = self.traces_total.get(vantage, 0) + 1
        if pair.latest is not None:
            change = pc.route_change(pair.latest, trace)
            if change is not None:
                pair.changes += 1
                pair.last_change = change
                self.route_changes_total[vantage] = self.route_changes_total.get(vantage, 0) + 1
        pair.latest = trace
        pair.fingerprint = pc.fingerprint(trace)
        if not trace.failing:
            ref = pair.reference
            if (ref is None or not pc.degraded(trace, ref)
                    or now - ref.received > self.policy.reference_max_age_seconds):
                pair.reference = trace
                pair.raw = (raw, raw)
            else:  # a fault the vantage has not noticed yet: keep the healthy picture
                pair.raw = (raw, pair.raw[1])
            pair.finding = None
            self._failing.discard((raw.node, vantage))
        else:
            pair.raw = (raw, pair.raw[1])
            pair.finding = pc.finding(trace, pair.reference)
            self._failing.add((raw.node, vantage))

    # ---- reads ----------------------------------------------------------------------------

    def _fresh_failing(self, pair: PairState, now: float) -> bool:
        latest = pair.latest
        return (latest is not None and latest.failing and pair.finding is not None
                and now - latest.received <= self.policy.failing_max_age_seconds)

    def _passing(self, node: str, now: float) -> dict[str, Trace]:
        out = {}
        for vantage, pair in self.pairs.get(node, {}).items():
            latest = pair.latest
            if (latest is not None and not latest.failing
                    and now - latest.received <= self.policy.reference_max_age_seconds):
                out[vantage] = latest
        return out

    def localise(self, node: str, now: float) -> NodeLocalisation | None:
        """Every fresh failing vantage's finding, checked against the passing vantages."""
        pairs = self.pairs.get(node, {})
        passing = self._passing(node, now)
        results = []
        for vantage in sorted(pairs):
            pair = pairs[vantage]
            if not self._fresh_failing(pair, now):
                continue
            assert pair.finding is not None
            results.append(self._cross_check(vantage, pair.finding, passing))
        if not results:
            return None
        shared = pc.common(r.finding.network.label for r in results if r.finding.hop)
        network = None
        if shared is not None and all(r.finding.hop is not None for r in results):
            network = results[0].finding.network
        return NodeLocalisation(node, tuple(results), network)

    def _cross_check(self, vantage: str, finding: Finding,
                     passing: dict[str, Trace]) -> VantageFinding:
        """Which passing vantages cross the network the failing one stops in and go on. With
        no reference of its own, a stop where every passing path ends too is the node's
        network, not a loss on the way."""
        hop = finding.hop
        asn = finding.network.asn
        if hop is None or asn is None or finding.kind not in (pc.STOP, pc.UNREACHABLE,
                                                              pc.LOOP, pc.NODE_NETWORK):
            return VantageFinding(vantage, finding)
        confirmed = []
        ending_here = 0
        crossing = 0
        for other in sorted(passing):
            inside = pc.crosses(passing[other], asn)
            if inside is None:
                continue
            crossing += 1
            if pc.continues_past(passing[other], inside):
                confirmed.append(other)
            else:
                ending_here += 1
        if (finding.kind == pc.STOP and finding.next_hop is None and crossing
                and ending_here == crossing):
            return VantageFinding(vantage, Finding(pc.NODE_NETWORK, hop, flows=finding.flows))
        if finding.kind == pc.NODE_NETWORK:
            return VantageFinding(vantage, finding)
        return VantageFinding(vantage, finding, tuple(confirmed))

    def vantage_fault(self, vantage: str, now: float) -> VantageFault | None:
        """The network after which ``vantage`` loses most of the nodes it fails."""
        by_label: Counter[str] = Counter()
        sample: dict[str, Finding] = {}
        total = 0
        for node, v in sorted(self._failing):
            if v != vantage:
                continue
            pair = self.pairs[node][v]
            if not self._fresh_failing(pair, now):
                continue
            assert pair.finding is not None
            total += 1
            if pair.finding.hop is None or pair.finding.kind == pc.NODE_NETWORK:
                continue
            label = pair.finding.network.label
            by_label[label] += 1
            sample.setdefault(label, pair.finding)
        if total < self.policy.vantage_min_nodes or not by_label:
            return None
        label, count = min(by_label.items(), key=lambda kv: (-kv[1], kv[0]))
        if count * 2 <= total:
            return None
        found = sample[label]
        return VantageFault(vantage, found.network, found.hop, count, total)

    def evidence(self, node: str, now: float, impaired: Sequence[str] = ()) -> list[VerdictReason]:
        """Path reasons for a verdict of ``node`` (recorded as what was last announced)."""
        out: list[VerdictReason] = []
        loc = self.localise(node, now)
        self.announced[node] = loc.key() if loc is not None else ()
        if loc is not None:
            if loc.network is not None and len(loc.findings) > 1:
                out.append(VerdictReason(what="path", reason="network", asn=loc.network.asn,
                                         note=loc.summary()))
            for result in loc.findings:
                out.append(_finding_reason(node, result))
        for vantage in sorted(impaired):
            fault = self.vantage_fault(vantage, now)
            if fault is not None:
                out.append(VerdictReason(
                    what="vantage-path", vantage=vantage, reason="network",
                    asn=fault.network.asn, hop=fault.hop.addr if fault.hop else "",
                    value=float(fault.nodes), bound=float(fault.failing),
                    note=f"impaired: {fault.sentence()}"))
        window = self.policy.route_change_window_seconds
        for vantage, pair in sorted(self.pairs.get(node, {}).items()):
            change = pair.last_change
            if change is not None and now - change.at <= window:
                after = change.after
                out.append(VerdictReason(
                    what="route-change", vantage=vantage,
                    asn=after.network.asn if after is not None else None,
                    hop=after.addr if after is not None else "", value=float(change.ttl),
                    note=change.sentence(vantage, node)))
        return out[:self.policy.max_reasons]

    def note_news(self, node: str, now: float) -> None:
        """Where the vantages lose ``node`` changed after its verdict was published: an audit
        note says so (a verdict is published only when the state changes)."""
        loc = self.localise(node, now)
        self.announced[node] = loc.key() if loc is not None else ()
        if loc is None:
            text = "no failing vantage's trace says where it is lost any more"
        else:
            text = "; ".join([loc.summary(), *(_finding_reason(node, f).note
                                               for f in loc.findings)])
        self.notes.append(AuditNote(now, "path-localised", node=node, note=text))
        self.news_total += 1

    def take_notes(self) -> list[AuditNote]:
        """The audit notes since the last call, oldest first."""
        notes = list(self.notes)
        self.notes.clear()
        return notes

    def faults(self, now: float) -> list[tuple[str, str, Finding]]:
        """(node, vantage, finding) of every fresh failing trace, for metrics."""
        out = []
        for node, vantage in sorted(self._failing):
            pair = self.pairs[node][vantage]
            if self._fresh_failing(pair, now):
                assert pair.finding is not None
                out.append((node, vantage, pair.finding))
        return out

    def failing_vantages(self) -> set[str]:
        return {v for _node, v in self._failing}

    def node_view(self, node: str, now: float) -> dict[str, Any]:
        """The paths of one node, per vantage, and its localisation (plain data, for the API)."""
        loc = self.localise(node, now)
        vantages = {}
        for vantage, pair in sorted(self.pairs.get(node, {}).items()):
            latest = pair.latest
            if latest is None:
                continue
            ref = pair.reference
            vantages[vantage] = {
                "taken_at": latest.wall_time,
                "received_at": latest.received,
                "trigger": latest.trigger.value,
                "failing": latest.failing,
                "fresh": now - latest.received <= (
                    self.policy.failing_max_age_seconds if latest.failing
                    else self.policy.reference_max_age_seconds),
                "target": latest.target,
                "protocol": latest.protocol.value,
                "port": latest.port,
                "fingerprint": pair.fingerprint,
                "as_path": pc.as_path(latest),
                "mtu": pc.mtu_limit(latest),
                "route_changes": pair.changes,
                "last_change": _change_view(pair.last_change, vantage, node),
                "finding": _finding_view(pair.finding, vantage, node) if latest.failing else None,
                "flows": [_flow_view(f) for f in latest.flows],
                "reference": None if ref is None or ref is latest else {
                    "taken_at": ref.wall_time, "as_path": pc.as_path(ref),
                    "fingerprint": pc.fingerprint(ref),
                    "hops": [_hop_view(h) for h in ref.main.hops] if ref.main else []},
            }
        return {
            "localisation": None if loc is None else {
                "network": _network_view(loc.network) if loc.network else None,
                "summary": loc.summary(),
                "vantages": {r.vantage: {**(_finding_view(r.finding, r.vantage, node) or {}),
                                         "confirmed_by": list(r.confirmed_by)}
                             for r in loc.findings},
            },
            "vantages": vantages,
        }

    # ---- snapshot rows ----------------------------------------------------------------------

    def to_rows(self) -> dict[str, Any]:
        pairs = []
        for node, by_vantage in self.pairs.items():
            for vantage, pair in by_vantage.items():
                latest, reference = pair.raw
                change = pair.last_change
                pairs.append([
                    node, vantage,
                    _raw_row(latest, pair.latest), _raw_row(reference, pair.reference),
                    pair.changes,
                    None if change is None else [
                        change.at, change.ttl, change.before.addr if change.before else "",
                        change.after.addr if change.after else "", change.hops_before,
                        change.hops_after],
                ])
        return {"version": ROWS_VERSION, "pairs": pairs,
                "announced": [[n, [list(k) for k in key]] for n, key in self.announced.items()],
                "traces_total": self.traces_total,
                "route_changes_total": self.route_changes_total,
                "unknown_node_total": self.unknown_node_total,
                "news_total": self.news_total}

    @classmethod
    def from_rows(cls, rows: dict[str, Any], policy: PathPolicy, table: AsnTable,
                  nodes: Iterable[str]) -> PathEngine:
        engine = cls(policy, table, set(nodes))
        if rows.get("version") != ROWS_VERSION:
            return engine  # an unknown format: start empty, the agents trace again
        for node, vantage, latest_row, ref_row, changes, change in rows["pairs"]:
            latest, latest_at = _from_row(latest_row)
            reference, ref_at = _from_row(ref_row)
            pair = PairState(raw=(latest, reference), changes=changes)
            if reference is not None:
                pair.reference = annotate(reference, table, ref_at)
            if latest is not None:
                # a passing latest trace is its own reference: one object, as when ingested
                pair.latest = (pair.reference if latest_row == ref_row
                               else annotate(latest, table, latest_at))
                assert pair.latest is not None
                pair.fingerprint = pc.fingerprint(pair.latest)
                if pair.latest.failing:
                    pair.finding = pc.finding(pair.latest, pair.reference)
                    engine._failing.add((node, vantage))
            if change is not None:
                at, ttl, before, after, hops_before, hops_after = change
                pair.last_change = RouteChange(at, ttl, _hop(before, ttl, table),
                                               _hop(after, ttl, table), hops_before, hops_after)
            engine.pairs.setdefault(node, {})[vantage] = pair
        engine.announced = {n: tuple(tuple(k) for k in key) for n, key in rows["announced"]}
        engine.traces_total = dict(rows["traces_total"])
        engine.route_changes_total = dict(rows["route_changes_total"])
        engine.unknown_node_total = rows["unknown_node_total"]
        engine.news_total = rows.get("news_total", 0)
        engine.set_nodes(nodes)
        return engine


def _raw_row(raw: PathTrace | None, trace: Trace | None) -> list[Any] | None:
    if raw is None or trace is None:
        return None
    return [trace.received, msgspec.json.encode(raw)]


def _from_row(row: list[Any] | None) -> tuple[PathTrace | None, float]:
    if row is None:
        return None, 0.0
    received, body = row
    return _trace_decoder.decode(body), float(received)


def _hop(addr: str, ttl: int, table: AsnTable) -> Hop | None:
    return Hop(ttl, addr, table.lookup(addr)) if addr else None


def _finding_reason(node: str, result: VantageFinding) -> VerdictReason:
    f = result.finding
    note = f.sentence(result.vantage, node)
    if result.confirmed_by:
        note += (f"; {', '.join(result.confirmed_by)} cross {f.network.describe()} "
                 "and reach further")
    return VerdictReason(what="path", vantage=result.vantage, reason=f.kind,
                         asn=f.network.asn if f.hop else None,
                         hop=f.hop.addr if f.hop else "",
                         value=float(f.ttl) if f.ttl else None,
                         bound=float(f.mtu) if f.mtu else None, note=note)


def _network_view(network: Network) -> dict[str, Any]:
    return {"asn": network.asn, "name": network.name, "label": network.label,
            "private": network.private}


def _hop_view(hop: Hop) -> dict[str, Any]:
    out: dict[str, Any] = {"ttl": hop.ttl, "addr": hop.addr}
    if hop.addr:
        out |= {"asn": hop.network.asn, "as_name": hop.network.name,
                "network": hop.network.label, "reply": hop.reply.value if hop.reply else None,
                "rtt_seconds": hop.rtt}
        if hop.mtu is not None:
            out["mtu"] = hop.mtu
    return out


def _flow_view(flow: Flow) -> dict[str, Any]:
    return {"sport": flow.sport, "size": flow.size, "stop": flow.stop.value,
            "hops": [_hop_view(h) for h in flow.hops]}


def _finding_view(finding: Finding | None, vantage: str, node: str) -> dict[str, Any] | None:
    if finding is None:
        return None
    return {"kind": finding.kind, "ttl": finding.ttl or None,
            "hop": _hop_view(finding.hop) if finding.hop else None,
            "other_branch": _hop_view(finding.other) if finding.other else None,
            "next_hop": _hop_view(finding.next_hop) if finding.next_hop else None,
            "mtu": finding.mtu, "size": finding.size, "flows_lost": finding.flows_lost,
            "flows": finding.flows, "summary": finding.sentence(vantage, node)}


def _change_view(change: RouteChange | None, vantage: str, node: str) -> dict[str, Any] | None:
    if change is None:
        return None
    return {"at": change.at, "ttl": change.ttl,
            "before": _hop_view(change.before) if change.before else None,
            "after": _hop_view(change.after) if change.after else None,
            "hops_before": change.hops_before, "hops_after": change.hops_after,
            "summary": change.sentence(vantage, node)}
