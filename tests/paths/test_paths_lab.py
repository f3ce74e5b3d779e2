"""The path-evidence lab (probes/lab/pathlab.py): real eBGP between ten BIRD routers, a real
WireGuard node, real agents tracing, the mesh naming where each vantage loses the node, the
reference webhook receiver getting the evidence. One lab for the whole module; each fault is
undone before the next (the fixture waits for a healthy fleet in between)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import lab_unavailable

pytestmark = [pytest.mark.lab, pytest.mark.paths, pytest.mark.mesh]

T1, T2, T3 = 64510, 64520, 64530


def _verdict(pl: Any) -> dict[str, Any]:
    node: dict[str, Any] = pl.api("/v1/verdicts?vantages=1")["nodes"][0]
    return node


def _localisation(pl: Any) -> dict[str, Any] | None:
    loc: dict[str, Any] | None = pl.node_view()["paths"]["localisation"]
    return loc


def _healthy(pl: Any) -> bool:
    v = _verdict(pl)
    return (v["state"] == "UP" and set(v.get("vantages", {}).values()) == {"UP"}
            and len(v["vantages"]) == 3 and _localisation(pl) is None
            and not pl.api("/v1/paths")["faults"])


@pytest.fixture(scope="module")
def pathlab() -> Iterator[Any]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    if shutil.which("bird") is None or shutil.which("birdc") is None:
        pytest.skip("bird2 is not installed (make setup installs it)")
    from probes.lab.pathlab import PathLab
    from probes.lab.topology import Lab

    with Lab("paths") as lab:
        pl = PathLab(lab).build()
        pl.wait_for(lambda: _healthy(pl) and len(pl.node_view()["paths"]["vantages"]) == 3,
                    90, "a healthy fleet with a trace from every vantage")
        yield pl


@pytest.fixture
def fault(pathlab: Any) -> Iterator[Any]:
    """The lab, healed and healthy again after the test (whatever it broke)."""
    yield pathlab
    pathlab.heal()
    pathlab.wait_for(lambda: _healthy(pathlab), 90, "the fleet to heal")


def _reasons(verdict: dict[str, Any], what: str) -> list[dict[str, Any]]:
    return [r for r in verdict.get("reasons", []) if r["what"] == what]


def _down_at_webhook(pl: Any, kind: str) -> dict[str, Any] | None:
    """The DOWN verdict the webhook receiver holds, once it has a path reason of ``kind``
    (an earlier fault's verdict may still be there when a test begins)."""
    verdict: dict[str, Any] = pl.received().get("node1", {})
    if verdict.get("state") == "DOWN" and any(r.get("reason") == kind
                                              for r in _reasons(verdict, "path")):
        return verdict
    return None


def test_a_healthy_fleet_makes_no_localisation_noise(pathlab: Any) -> None:
    pl = pathlab
    # several rounds of baseline traces from every vantage (agents trace every 6 s here)
    pl.wait_for(lambda: all(n >= 3 for n in _traces_per_vantage(pl).values()), 60,
                "three baseline traces per vantage")
    assert _localisation(pl) is None
    assert pl.api("/v1/paths") == {"now": pl.api("/v1/paths")["now"], "faults": [],
                                   "vantages": {}}
    view = pl.node_view()["paths"]["vantages"]
    assert {v: p["route_changes"] for v, p in view.items()} == {"va": 0, "vb": 0, "vc": 0}
    assert all(not p["failing"] and p["finding"] is None for p in view.values())
    metrics = pl.metrics()
    assert "tunnelwatch_mesh_path_fault{" not in metrics
    assert "tunnelwatch_mesh_path_route_changes_total{" not in metrics
    # the networks on the way, from the MRT dump of the PoP router's RIB
    assert view["va"]["as_path"] == ["64501", str(T1), str(T2), "64500"]
    assert view["vc"]["as_path"] == ["64503", "64550", "64500"]
    log = pl.api("/v1/verdicts?after=0")["log"]
    assert not [r for e in log for r in e["verdict"].get("reasons", [])
                if r["what"].endswith("path") or r["what"] == "route-change"]


def _traces_per_vantage(pl: Any) -> dict[str, float]:
    out = {}
    for line in pl.metrics().splitlines():
        if line.startswith("tunnelwatch_mesh_traces_total{"):
            vantage = line.split('vantage="', 1)[1].split('"', 1)[0]
            out[vantage] = float(line.rsplit(" ", 1)[1])
    return out


def test_black_hole_at_a_transit_hop_names_the_hop_and_its_network(fault: Any) -> None:
    pl = fault
    t1 = pl.net.routers["t1"]
    pl.black_hole_t1()
    pl.wait_for(lambda: _verdict(pl)["state"] == "DOWN", 60, "node1 DOWN")
    loc = pl.wait_for(lambda: (loc := _localisation(pl)) and len(loc["vantages"]) == 2 and loc,
                      60, "both failing vantages localised")
    assert loc["network"]["asn"] == T1 and loc["network"]["name"] == "transit-1"
    for vantage, provider in (("va", "pa"), ("vb", "pb")):
        found = loc["vantages"][vantage]
        assert found["kind"] == "stop"
        # t1 answers from the link it was reached over; its passing trace went on into AS64520
        assert found["hop"]["addr"] == t1.address_toward(provider)
        assert found["hop"]["asn"] == T1
        assert found["next_hop"]["asn"] == T2
    # the same evidence in the DOWN verdict the webhook receiver got: the agents traced at the
    # first failure, so the traces were in before the verdict
    verdict = pl.wait_for(lambda: pl.received().get("node1", {}).get("state") == "DOWN"
                          and pl.received()["node1"], 90, "the DOWN verdict at the webhook")
    assert verdict["previous"] == "UP"
    paths = _reasons(verdict, "path")
    assert {(r.get("vantage"), r.get("asn"), r.get("hop", "")) for r in paths} >= {
        ("va", T1, t1.address_toward("pa")), ("vb", T1, t1.address_toward("pb"))}
    assert any("check ASN routing" in r["note"] for r in paths)
    # metrics: bounded labels, the AS number and never an address
    metrics = pl.metrics()
    assert f'tunnelwatch_mesh_path_fault{{asn="{T1}",kind="stop",node="node1",vantage="va"}}' \
        in metrics
    assert f'tunnelwatch_mesh_asn_info{{as_name="transit-1",asn="{T1}"}}' in metrics


def test_an_ecmp_branch_dropping_the_vpn_port_is_named(fault: Any) -> None:
    pl = fault
    bad = pl.net.routers["t2b"].address_toward("t1")
    good = pl.net.routers["t2a"].address_toward("t1")
    pl.drop_vpn_port_on_t2b()

    def branch_named() -> list[dict[str, Any]]:
        loc = _localisation(pl) or {"vantages": {}}
        return [f for f in loc["vantages"].values() if f["kind"] == "ecmp-branch"]

    for found in pl.wait_for(branch_named, 90, "the ECMP branch named"):
        assert (found["hop"]["addr"], found["other_branch"]["addr"]) == (bad, good)
        assert found["hop"]["asn"] == T2 and 0 < found["flows_lost"] < found["flows"]
    # each handshake takes a fresh source port, so va's and vb's checks flap with the branch
    # their flow hashes onto; damping holds the flapping checks down and the node goes DOWN:
    # the verdict the webhook receiver gets names the branch
    verdict = pl.wait_for(lambda: _down_at_webhook(pl, "ecmp-branch"), 120,
                          "the DOWN verdict naming the branch at the webhook")
    branches = [r for r in _reasons(verdict, "path") if r.get("reason") == "ecmp-branch"]
    for r in branches:
        assert r["hop"] == bad and r["asn"] == T2 and f"flows through {good}" in r["note"]


def test_an_mtu_drop_at_a_transit_hop_is_named_with_the_mtu(fault: Any) -> None:
    pl = fault
    t1 = pl.net.routers["t1"]
    pl.mtu_drop_at_t1()
    pl.wait_for(lambda: _verdict(pl)["state"] == "DOWN", 60, "node1 DOWN (path MTU check)")
    loc = pl.wait_for(lambda: (loc := _localisation(pl)) and len(loc["vantages"]) == 2
                      and all(f["kind"] == "mtu" for f in loc["vantages"].values()) and loc,
                      60, "the MTU drop localised")
    for vantage, provider in (("va", "pa"), ("vb", "pb")):
        found = loc["vantages"][vantage]
        assert found["mtu"] == 1280 and found["size"] == 1500
        assert found["hop"]["addr"] == t1.address_toward(provider)
        assert found["hop"]["asn"] == T1
    verdict = pl.wait_for(lambda: _down_at_webhook(pl, "mtu"), 90,
                          "the DOWN verdict naming the MTU at the webhook")
    assert {r.get("bound") for r in _reasons(verdict, "path") if r.get("reason") == "mtu"} == {
        1280.0}


def test_a_route_change_to_a_longer_path_is_detected(fault: Any) -> None:
    pl = fault
    before = pl.node_view()["paths"]["vantages"]["vb"]["route_changes"]
    pl.longer_route_for_vb()
    pl.wait_for(lambda: pl.net.path("pb", pl.node_prefix)[0] == T3, 90, "pb's route via t3")

    def changed() -> dict[str, Any] | None:
        view: dict[str, Any] = pl.node_view()["paths"]["vantages"]["vb"]
        return view if view["route_changes"] > before else None

    view = pl.wait_for(changed, 60, "vb's route change")
    change = view["last_change"]
    assert change["before"]["asn"] == T1 and change["after"]["asn"] == T3
    assert change["hops_after"] > change["hops_before"]
    assert view["as_path"] == ["64502", str(T3), "64540", "64550", "64500"]
    assert not view["failing"] and _verdict(pl)["state"] == "UP"  # a longer path still works
    assert 'tunnelwatch_mesh_path_route_changes_total{vantage="vb"}' in pl.metrics()
