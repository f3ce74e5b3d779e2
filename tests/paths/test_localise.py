"""Path localisation (probes/mesh/pathcompare.py, probes/mesh/paths.py) on recorded traces from
the path lab (data/lab-traces.jsonl, recorded by tests/paths/record.py) and on hand-made ones
for what the lab does not produce: asymmetric and partial traces, rate-limited routers, loops,
unreachables, MTU limits that were always there, an impaired vantage."""

from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.mesh import pathcompare as pc
from probes.mesh.paths import PathEngine, PathPolicy
from probes.model import (
    HopReply,
    PathFlow,
    PathTrace,
    TraceHop,
    TraceProtocol,
    TraceStop,
    TraceTrigger,
)
from probes.paths.asn import AsnTable, load_table

pytestmark = pytest.mark.paths

DATA = Path(__file__).parent / "data"
TABLE = AsnTable([("10.1.0.0/16", 64501), ("10.10.0.0/16", 64510), ("10.20.0.0/16", 64520),
                  ("10.30.0.0/16", 64530), ("10.50.0.0/16", 64500), ("10.2.0.0/16", 64502),
                  ("10.3.0.0/16", 64503)],
                 {64510: "transit-1", 64500: "pop"})
NODE_ADDR = "10.50.9.2"


# ------------------------------------------------------------------------------ recorded


def recorded() -> list[tuple[str, float, PathTrace]]:
    out = []
    for line in (DATA / "lab-traces.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.append((record["phase"], record["now"],
                    msgspec.convert(record["trace"], PathTrace)))
    return out


def lab_engine() -> PathEngine:
    table = load_table(DATA / "lab-rib.mrt", DATA / "lab-asnames.txt", local_asn=64500)
    return PathEngine(PathPolicy(), table, {"node1"})


def replay_phases(engine: PathEngine) -> dict[str, Any]:
    """Feed the recording phase by phase; the localisation (as the API shows it) at the end
    of every phase."""
    seen = {}
    for phase, group in groupby(recorded(), key=lambda r: r[0]):
        now = 0.0
        for _phase, now, trace in group:
            engine.ingest([trace], now)
        seen[phase] = (engine.node_view("node1", now), now)
    return seen


def test_recorded_lab_faults_are_localised_as_in_the_lab() -> None:
    seen = replay_phases(lab_engine())
    healthy, _ = seen["healthy"]
    assert healthy["localisation"] is None
    assert all(v["route_changes"] == 0 for v in healthy["vantages"].values())

    black_hole = seen["black-hole-t1"][0]["localisation"]
    assert black_hole["network"]["asn"] == 64510
    assert {v: (f["kind"], f["hop"]["addr"]) for v, f in black_hole["vantages"].items()} == {
        "va": ("stop", "10.200.1.2"), "vb": ("stop", "10.200.2.2")}

    ecmp = seen["ecmp-t2b"][0]["localisation"]
    branches = {(f["kind"], f["hop"]["addr"], f["other_branch"]["addr"])
                for f in ecmp["vantages"].values()}
    assert branches == {("ecmp-branch", "10.200.4.2", "10.200.3.2")}

    mtu = seen["mtu-t1"][0]["localisation"]
    assert {v: (f["kind"], f["mtu"], f["hop"]["asn"]) for v, f in mtu["vantages"].items()} == {
        "va": ("mtu", 1280, 64510), "vb": ("mtu", 1280, 64510)}

    route = seen["route-vb"][0]["vantages"]["vb"]
    assert route["route_changes"] == 1
    assert (route["last_change"]["before"]["asn"], route["last_change"]["after"]["asn"]) == (
        64510, 64530)
    for heal in ("heal-black-hole-t1", "heal-ecmp-t2b", "heal-mtu-t1"):
        assert seen[heal][0]["localisation"] is None, heal


def test_replay_is_deterministic_and_survives_a_snapshot() -> None:
    """Recorded traces in, the same localisation out, byte for byte; an engine restored from
    its rows half way continues exactly like the one that was not interrupted."""
    records = recorded()
    half = len(records) // 2

    def run(engine: PathEngine, part: list[tuple[str, float, PathTrace]]) -> list[bytes]:
        out = []
        for _phase, now, trace in part:
            changed = engine.ingest([trace], now)
            out.append(msgspec.json.encode([changed, engine.node_view("node1", now),
                                            engine.evidence("node1", now, ["va"])]))
        return out

    first, second = lab_engine(), lab_engine()
    assert run(first, records) == run(second, records)
    assert msgspec.json.encode(first.to_rows()) == msgspec.json.encode(second.to_rows())

    straight = lab_engine()
    expected = run(straight, records)
    interrupted = lab_engine()
    got = run(interrupted, records[:half])
    rows = msgspec.msgpack.decode(msgspec.msgpack.encode(interrupted.to_rows()))
    restored = PathEngine.from_rows(rows, PathPolicy(), interrupted.table, {"node1"})
    got += run(restored, records[half:])
    assert got == expected


# ------------------------------------------------------------------------------ hand-made


def hop(ttl: int, addr: str = "", reply: HopReply = HopReply.TIME_EXCEEDED,
        mtu: int | None = None) -> TraceHop:
    if not addr:
        return TraceHop(ttl=ttl)
    return TraceHop(ttl=ttl, addr=addr, reply=reply, rtt_seconds=0.001 * ttl, mtu=mtu)


def flow(addrs: list[str], sport: int = 61000, size: int = 28,
         stop: TraceStop = TraceStop.GAP, last: HopReply | None = None) -> PathFlow:
    hops = [hop(i, a) for i, a in enumerate(addrs, start=1)]
    if last is not None and hops:
        hops[-1] = hop(len(hops), addrs[-1], last)
    return PathFlow(sport=sport, size=size, stop=stop, hops=hops)


def trace(vantage: str, failing: bool, *flows: PathFlow, node: str = "n1",
          at: float = 0.0) -> PathTrace:
    return PathTrace(node=node, vantage=vantage, wall_time=at, trigger=(
        TraceTrigger.CHANGE if failing else TraceTrigger.BASELINE), failing=failing,
        target=NODE_ADDR, protocol=TraceProtocol.UDP, port=51820, flows=list(flows))


def engine(*nodes: str, **policy: Any) -> PathEngine:
    return PathEngine(PathPolicy(**policy), TABLE, set(nodes or ("n1",)))


A_PATH = ["10.1.0.1", "10.10.0.1", "10.20.0.1", "10.50.0.1"]  # provider, t1, t2, pop
C_PATH = ["10.3.0.1", "10.30.0.1", "10.50.0.9"]  # another provider, t3, pop


def test_a_stop_names_the_last_answer_and_where_the_path_used_to_go() -> None:
    eng = engine()
    eng.ingest([trace("va", False, flow(A_PATH), at=1)], 1.0)
    changed = eng.ingest([trace("va", True, flow(A_PATH[:2]), at=2)], 2.0)
    assert changed == ["n1"]
    loc = eng.localise("n1", 2.0)
    assert loc is not None and loc.network is not None and loc.network.asn == 64510
    found = loc.findings[0].finding
    assert (found.kind, found.hop.addr, found.next_hop.addr) == (  # type: ignore[union-attr]
        pc.STOP, "10.10.0.1", "10.20.0.1")
    reasons = eng.evidence("n1", 2.0)
    assert [(r.what, r.reason, r.asn, r.hop) for r in reasons] == [
        ("path", "stop", 64510, "10.10.0.1")]
    assert "transit-1" in reasons[0].note
    # announced: the same news again is no change
    assert eng.ingest([trace("va", True, flow(A_PATH[:2]), at=3)], 3.0) == []


def test_asymmetric_addresses_of_one_router_still_name_its_network() -> None:
    """Routers answer from the interface a probe came in on: vantages entering t1 from
    different neighbours see different addresses for it. The network is what they share."""
    b_path = ["10.2.0.1", "10.10.7.1", "10.20.0.5", "10.50.0.1"]
    eng = engine()
    eng.ingest([trace("va", False, flow(A_PATH)), trace("vb", False, flow(b_path))], 1.0)
    eng.ingest([trace("va", True, flow(A_PATH[:2])), trace("vb", True, flow(b_path[:2]))],
               2.0)
    loc = eng.localise("n1", 2.0)
    assert loc is not None and loc.network is not None and loc.network.asn == 64510
    assert {f.vantage: f.finding.hop.addr for f in loc.findings  # type: ignore[union-attr]
            } == {"va": "10.10.0.1", "vb": "10.10.7.1"}
    assert "check ASN routing" in loc.summary()


def test_a_silent_hop_on_the_way_back_does_not_move_the_stop() -> None:
    """Asymmetric return path: a router whose answers are lost on the way back shows as a hole;
    the failing trace still reaches further, and the stop is its last answer."""
    eng = engine()
    eng.ingest([trace("va", False, flow(A_PATH))], 1.0)
    eng.ingest([trace("va", True, flow(["10.1.0.1", "", "10.20.0.1"]))], 2.0)
    found = eng.localise("n1", 2.0).findings[0].finding  # type: ignore[union-attr]
    assert (found.kind, found.hop.addr, found.network.asn) == (  # type: ignore[union-attr]
        pc.STOP, "10.20.0.1", 64520)


def test_rate_limited_routers_make_no_route_changes_and_no_findings() -> None:
    eng = engine()
    holes = [["10.1.0.1", "", "10.20.0.1", "10.50.0.1"], A_PATH,
             ["10.1.0.1", "10.10.0.1", "", "10.50.0.1"], ["", "10.10.0.1", "10.20.0.1"]]
    for i, addrs in enumerate(holes):
        eng.ingest([trace("va", False, flow(addrs), at=i)], float(i))
    assert eng.pairs["n1"]["va"].changes == 0
    assert eng.localise("n1", 10.0) is None and eng.faults(10.0) == []


def test_a_rate_limited_last_hop_in_some_flows_is_not_an_ecmp_branch() -> None:
    eng = engine()
    eng.ingest([trace("va", False, flow(A_PATH))], 1.0)
    flows = [flow(A_PATH, sport=61000), flow(A_PATH, sport=61001),
             flow(A_PATH[:3], sport=61002), flow(A_PATH[:3], sport=61003)]
    eng.ingest([trace("va", True, *flows)], 2.0)
    found = eng.localise("n1", 2.0).findings[0].finding  # type: ignore[union-attr]
    assert found.kind == pc.NODE_NETWORK  # as far as the passing trace went: not the path


def test_an_ecmp_branch_losing_the_port_is_named() -> None:
    good = ["10.1.0.1", "10.10.0.1", "10.20.0.1", "10.50.0.1"]
    bad = ["10.1.0.1", "10.10.0.1", "10.20.0.2"]
    eng = engine()
    eng.ingest([trace("va", True, flow(good, 61000), flow(bad, 61001), flow(bad, 61002),
                      flow(good, 61003))], 1.0)
    found = eng.localise("n1", 1.0).findings[0].finding  # type: ignore[union-attr]
    assert (found.kind, found.hop.addr, found.other.addr) == (  # type: ignore[union-attr]
        pc.ECMP, "10.20.0.2", "10.20.0.1")
    assert (found.flows_lost, found.flows) == (2, 4)


def test_loops_unreachables_and_silence() -> None:
    eng = engine("n1", "n2", "n3")
    loop = PathFlow(sport=61000, size=28, stop=TraceStop.LOOP, hops=[
        hop(1, "10.1.0.1"), hop(2, "10.10.0.1"), hop(3, "10.20.0.1"), hop(4, "10.10.0.1")])
    unreachable = flow(A_PATH[:3], stop=TraceStop.UNREACHABLE, last=HopReply.UNREACHABLE)
    silent = PathFlow(sport=61000, size=28, stop=TraceStop.GAP)
    eng.ingest([trace("va", True, loop, node="n1"), trace("va", True, unreachable, node="n2"),
                trace("va", True, silent, node="n3")], 1.0)
    kinds = {n: eng.localise(n, 1.0).findings[0].finding.kind  # type: ignore[union-attr]
             for n in ("n1", "n2", "n3")}
    assert kinds == {"n1": pc.LOOP, "n2": pc.UNREACHABLE, "n3": pc.NO_ANSWER}
    assert eng.localise("n2", 1.0).findings[0].finding.hop.addr == "10.20.0.1"  # type: ignore


def test_an_mtu_limit_that_was_always_there_is_not_blamed() -> None:
    small = flow(A_PATH)
    big = PathFlow(sport=61000, size=1500, stop=TraceStop.UNREACHABLE, hops=[
        hop(1, "10.1.0.1"), hop(2, "10.10.0.1"), hop(3, "10.10.0.1", HopReply.FRAG_NEEDED, 1400)])
    eng = engine()
    eng.ingest([trace("va", False, small, big)], 1.0)  # a passing trace already saw it
    eng.ingest([trace("va", True, small, big)], 2.0)
    assert eng.localise("n1", 2.0).findings[0].finding.kind == pc.NODE_NETWORK  # type: ignore
    fresh = engine()
    fresh.ingest([trace("va", False, small, flow(A_PATH, size=1500))], 1.0)
    fresh.ingest([trace("va", True, small, big)], 2.0)
    found = fresh.localise("n1", 2.0).findings[0].finding  # type: ignore[union-attr]
    assert (found.kind, found.mtu, found.hop.addr) == (pc.MTU, 1400, "10.10.0.1")  # type: ignore


def test_a_passing_trace_taken_during_the_fault_keeps_the_healthy_reference() -> None:
    eng = engine()
    eng.ingest([trace("va", False, flow(A_PATH))], 1.0)
    eng.ingest([trace("va", False, flow(A_PATH[:2]))], 2.0)  # before the checks noticed
    eng.ingest([trace("va", True, flow(A_PATH[:2]))], 3.0)
    found = eng.localise("n1", 3.0).findings[0].finding  # type: ignore[union-attr]
    assert found.kind == pc.STOP and found.next_hop.addr == "10.20.0.1"  # type: ignore


def test_without_a_reference_passing_vantages_judge_the_stop() -> None:
    eng = engine()
    # vc passes through AS64510 and goes on: va's stop there is confirmed
    vc_path = ["10.3.0.1", "10.10.0.5", "10.20.0.9", "10.50.0.3"]
    eng.ingest([trace("vc", False, flow(vc_path)), trace("va", True, flow(A_PATH[:2]))], 1.0)
    result = eng.localise("n1", 1.0).findings[0]  # type: ignore[union-attr]
    assert (result.finding.kind, result.confirmed_by) == (pc.STOP, ("vc",))
    # every passing path ends in the PoP's network too: the node's own network, not the way
    eng2 = engine()
    eng2.ingest([trace("vc", False, flow(C_PATH)), trace("va", True, flow(A_PATH))], 1.0)
    assert eng2.localise("n1", 1.0).findings[0].finding.kind == pc.NODE_NETWORK  # type: ignore


def test_route_changes_are_conflicts_not_extensions() -> None:
    eng = engine()
    eng.ingest([trace("va", False, flow(A_PATH))], 1.0)
    eng.ingest([trace("va", False, flow(A_PATH[:3]))], 2.0)  # ends sooner: not a change
    eng.ingest([trace("va", False, flow([*A_PATH, "10.50.0.7"]))], 3.0)  # longer: not either
    assert eng.pairs["n1"]["va"].changes == 0
    longer = ["10.1.0.1", "10.30.0.1", "10.30.0.2", "10.20.0.1", "10.50.0.1"]
    eng.ingest([trace("va", False, flow(longer))], 4.0)
    pair = eng.pairs["n1"]["va"]
    assert pair.changes == 1 and pair.last_change is not None
    assert (pair.last_change.ttl, pair.last_change.after.network.asn) == (  # type: ignore
        2, 64530)
    reasons = eng.evidence("n1", 5.0)
    assert [(r.what, r.asn, r.value) for r in reasons] == [("route-change", 64530, 2.0)]
    assert eng.evidence("n1", 4.0 + 901) == []  # older than the window: no longer evidence
    reached = flow([*A_PATH, NODE_ADDR], stop=TraceStop.REACHED, last=HopReply.PORT_UNREACHABLE)
    eng.ingest([trace("vb", False, reached)], 6.0)
    eng.ingest([trace("vb", False, flow([*A_PATH[:3], NODE_ADDR], stop=TraceStop.REACHED,
                                        last=HopReply.PORT_UNREACHABLE))], 7.0)
    assert eng.pairs["n1"]["vb"].changes == 1  # the node answered at another distance


def test_an_impaired_vantage_is_explained_by_its_own_network() -> None:
    eng = engine("n1", "n2", "n3")
    cut = ["10.1.0.1"]  # va's provider, then nothing
    eng.ingest([trace("va", True, flow(cut), node=n) for n in ("n1", "n2", "n3")], 1.0)
    fault = eng.vantage_fault("va", 1.0)
    assert fault is not None and (fault.network.asn, fault.nodes, fault.failing) == (64501, 3, 3)
    reasons = eng.evidence("n1", 1.0, impaired=["va"])
    vantage = [r for r in reasons if r.what == "vantage-path"]
    assert [(r.vantage, r.asn, r.value) for r in vantage] == [("va", 64501, 3.0)]
    assert eng.vantage_fault("vb", 1.0) is None


def test_old_traces_stop_speaking_and_unknown_nodes_are_ignored() -> None:
    eng = engine(failing_max_age_seconds=60)
    eng.ingest([trace("va", True, flow(A_PATH[:2]))], 1.0)
    assert eng.localise("n1", 30.0) is not None
    assert eng.localise("n1", 62.0) is None and eng.faults(62.0) == []
    assert eng.ingest([trace("va", True, flow(A_PATH), node="elsewhere")], 2.0) == []
    assert eng.unknown_node_total == 1
    eng.set_nodes([])
    assert eng.pairs == {} and eng.faults(2.0) == []


def test_evidence_is_capped() -> None:
    eng = engine(max_reasons=2)
    eng.ingest([trace(v, True, flow(A_PATH[:2])) for v in ("va", "vb", "vc")], 1.0)
    assert len(eng.evidence("n1", 1.0)) == 2


# ------------------------------------------------------------------------------ fuzz

_ADDRS = st.sampled_from(["", "10.1.0.1", "10.10.0.1", "10.20.0.1", "10.20.0.2", "10.50.0.1",
                          NODE_ADDR, "192.0.2.1", "2001:db8::1"])


@st.composite
def random_trace(draw: st.DrawFn) -> PathTrace:
    flows = []
    for i in range(draw(st.integers(0, 4))):
        addrs = draw(st.lists(_ADDRS, max_size=8))
        reply = draw(st.sampled_from(list(HopReply)))
        hops = [TraceHop(ttl=t + 1, addr=a, reply=reply if a else None,
                         mtu=draw(st.none() | st.integers(0, 1500)) if a else None)
                for t, a in enumerate(addrs)]
        flows.append(PathFlow(sport=61000 + (i % 2), size=draw(st.sampled_from([28, 1500])),
                              stop=draw(st.sampled_from(list(TraceStop))), hops=hops))
    return PathTrace(node=draw(st.sampled_from(["n1", "n2"])),
                     vantage=draw(st.sampled_from(["va", "vb", "vc"])), wall_time=0.0,
                     trigger=TraceTrigger.CHANGE, failing=draw(st.booleans()),
                     target=NODE_ADDR, protocol=TraceProtocol.UDP, port=51820, flows=flows)


@settings(max_examples=300, deadline=None)
@given(st.lists(random_trace(), max_size=12))
def test_fuzz_localisation_never_raises_and_is_deterministic(traces: list[PathTrace]) -> None:
    def run() -> bytes:
        eng = engine("n1", "n2")
        out = []
        for i, t in enumerate(traces):
            out.append(eng.ingest([t], float(i)))
            for node in ("n1", "n2"):
                out.append(eng.node_view(node, float(i)))
                out.append(eng.evidence(node, float(i), ["va"]))
        out.append(eng.to_rows())
        return msgspec.json.encode(out)

    assert run() == run()
