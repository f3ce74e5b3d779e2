"""The mesh's /metrics body is written in slices with the loop served between them (at 15,000
nodes one synchronous ``generate_latest`` held every decision for about a second), byte for byte
what ``generate_latest`` writes, and consistent per node when decisions land mid-scrape."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from probes.mesh import exposition as exposition_module
from probes.mesh.decision import DecisionEngine, NodeInfo
from probes.mesh.exposition import MeshExposition
from probes.mesh.ingest import IngestStats
from probes.mesh.metrics import MeshCollector, WeightCollector
from probes.mesh.policy import DecisionPolicy
from probes.mesh.server import GUARD_KEY
from probes.mesh.service import MeshService
from probes.mesh.state import NodeState
from probes.mesh.store_sqlite import SQLiteStore
from probes.mesh.weight_policy import WeightPolicy
from probes.mesh.weights import WeightEngine, WeightNode
from probes.model import VerdictState, Votes
from probes.selfmetrics import ConfigReloads, SelfCollector
from tests.mesh.apptest import mesh_app
from tests.mesh.helpers import fleet, obs

pytestmark = pytest.mark.mesh

STATES = list(VerdictState)


def exposition_and_reference(svc: MeshService) -> tuple[MeshExposition, CollectorRegistry]:
    """The /metrics writer as the app builds it, and one registry holding every collector (what
    a single ``generate_latest`` wrote before)."""
    collector = MeshCollector(lambda: svc, IngestStats())
    weights = WeightCollector(lambda: svc)
    own = SelfCollector("mesh", ConfigReloads())  # the registry's part: it follows the mesh's
    rest = CollectorRegistry()
    rest.register(own)
    reference = CollectorRegistry()
    reference.register(collector)
    reference.register(weights)
    reference.register(own)
    return MeshExposition(collector, weights, rest), reference


def decide(node: NodeState, generation: int) -> None:
    """What a decision sets on a node (decision.py's _evaluate and _publish), all from one
    generation: its votes say which (``up``), and its state and quorum follow from it."""
    node.votes = Votes(up=generation, down=generation % 3, excluded_stale=1)
    node.quorum_lost = generation % 2 == 1
    node.state = STATES[generation % len(STATES)]


async def test_a_scrape_gives_the_loop_turns_between_slices(tmp_path: Path) -> None:
    svc = MeshService(SQLiteStore(tmp_path / "m.db"), DecisionPolicy(), fleet(3000, 100))
    exposition, reference = exposition_and_reference(svc)
    loop = asyncio.get_running_loop()
    turns = 0
    rendering = True

    def turn() -> None:  # one call per loop iteration while the scrape runs
        nonlocal turns
        turns += 1
        if rendering:
            loop.call_soon(turn)

    loop.call_soon(turn)
    body = await exposition.render()
    rendering = False
    assert body == generate_latest(reference)
    await svc.close()
    # 3,000 nodes written for the first time are tens of ms of work: the loop must have had
    # turns in between (one generate_latest, as before, gave it none until the body was made)
    assert turns >= 3


async def test_each_node_is_read_whole_while_decisions_land_mid_scrape(tmp_path: Path) -> None:
    svc = MeshService(SQLiteStore(tmp_path / "m.db"), DecisionPolicy(), fleet(3000, 100))
    exposition, _ = exposition_and_reference(svc)
    nodes = list(svc.engine.nodes.values())
    loop = asyncio.get_running_loop()
    generations = itertools.count(1)
    rendering = True

    def decisions() -> None:  # every loop turn, a new decision on every node
        generation = next(generations)
        for node in nodes:
            decide(node, generation)
        if rendering:
            loop.call_soon(decisions)

    decisions()
    loop.call_soon(decisions)
    body = (await exposition.render()).decode()
    rendering = False
    await svc.close()
    families = {f.name: f.samples for f in text_string_to_metric_families(body)}
    verdict = {s.labels["node"]: s.labels["state"]
               for s in families["tunnelwatch_mesh_node_verdict"]}
    up_votes = {s.labels["node"]: int(s.value) for s in families["tunnelwatch_mesh_node_votes"]
                if s.labels["vote"] == "up"}
    quorum = {s.labels["node"]: s.value for s in families["tunnelwatch_mesh_node_quorum_lost"]}
    assert len(verdict) == len(up_votes) == len(quorum) == len(nodes)
    for name, generation in up_votes.items():  # the verdict and quorum of the votes' decision
        assert verdict[name] == STATES[generation % len(STATES)].value, name
        assert quorum[name] == generation % 2, name
    # decisions did land between slices: nodes were read in different generations
    assert len(set(up_votes.values())) >= 2
    by_state = {s.labels["state"]: int(s.value) for s in families["tunnelwatch_mesh_nodes"]}
    counted = Counter(verdict.values())
    assert by_state == {state.value: counted.get(state.value, 0) for state in STATES}


names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)


NodeStates = list[tuple[NodeInfo, VerdictState, Votes, bool]]
Reports = list[tuple[str, str, float]]  # (vantage, node, when)


@st.composite
def fleet_states(draw: st.DrawFn) -> tuple[NodeStates, Reports, bool]:
    nodes = draw(st.lists(names, min_size=0, max_size=30, unique=True))
    pools = draw(st.lists(names, min_size=1, max_size=3))
    counts = st.integers(0, 10**8)
    states = [(NodeInfo(name, draw(st.sampled_from(pools)), pop=draw(names)),
               draw(st.sampled_from(STATES)),
               Votes(*(draw(counts) for _ in range(5))), draw(st.booleans()))
              for name in nodes]
    reports = draw(st.lists(st.tuples(st.sampled_from(["va", "vb", "v\"c"]), st.sampled_from(
        nodes), st.floats(-1e3, 1e9)), max_size=40)) if nodes else []
    return states, reports, draw(st.booleans())


def weigh(svc: MeshService, states: NodeStates, data: st.DataObject) -> None:
    """The weight engine on, with random state: the fleet's nodes and one it does not have
    (no pop), published or not, load fresh or stale, any of the load signals."""
    infos = [info for info, *_ in states]
    nodes = [WeightNode(info.node, info.pool, data.draw(st.floats(0.1, 10))) for info in infos]
    # The extra node's name must not be one of the fleet's (a drawn name may be "\n" too).
    extra = "\n" + "x" * max((len(info.node) for info in infos), default=0)
    svc.weights = WeightEngine(WeightPolicy(enabled=True), [*nodes, WeightNode(extra, "p")])
    svc.last_now = data.draw(st.floats(0, 1e6))
    signals = ["cpu", "drops", "effective_sessions", "sessions", "packets", "bytes"]
    for node in svc.weights.nodes.values():
        node.published = data.draw(st.none() | st.integers(0, 100))
        node.seq = data.draw(st.integers(0, 10**7))
        node.load_at = svc.last_now - data.draw(st.floats(0, 30))
        node.ewma = {signal: data.draw(st.floats(0, 1e9)) for signal in data.draw(
            st.lists(st.sampled_from(signals), unique=True))}
    for pool in {info.pool for info in infos}:
        svc.weights.guard_scale[pool] = data.draw(st.floats(0, 1))


def apply(svc: MeshService, states: NodeStates) -> None:
    for info, state, votes, quorum_lost in states:
        node = svc.engine.nodes[info.node]
        node.state, node.votes, node.quorum_lost = state, votes, quorum_lost


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fleets=st.lists(fleet_states(), min_size=1, max_size=3), data=st.data())
def test_the_body_is_what_generate_latest_writes(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
        fleets: list[tuple[NodeStates, Reports, bool]], data: st.DataObject) -> None:
    """Scrapes of random fleets (names and pools with quotes, backslashes, newlines, any
    unicode; counts that Go writes with an exponent; vantages' reports at random times; the
    weight engine on or off, at random state), the
    kept lines carried from one fleet to the next (an engine rebuilt with other nodes, pools or
    states), and some nodes decided again between two scrapes of one fleet. Runs of 4 nodes and
    vantage ages one node at a time, so that small fleets are read in several slices."""
    monkeypatch.setattr(exposition_module, "NODES_PER_RUN", 4)
    monkeypatch.setattr(exposition_module, "NODES_PER_AGE", 1)
    svc = MeshService(SQLiteStore(tmp_path_factory.mktemp("m") / "m.db"), DecisionPolicy(), [])
    exposition, reference = exposition_and_reference(svc)

    async def scrapes() -> None:
        for states, reports, weights_on in fleets:
            svc.engine = DecisionEngine(DecisionPolicy(), [info for info, *_ in states])
            for vantage, node, when in reports:
                svc.engine.observe([obs(node, vantage, True, at=when)], when)
            apply(svc, states)
            svc.weights = None
            if weights_on:
                weigh(svc, states, data)
            assert await exposition.render() == generate_latest(reference)
            if states:
                changed = data.draw(st.lists(st.sampled_from(states), max_size=5))
                apply(svc, [(info, data.draw(st.sampled_from(STATES)),
                             Votes(data.draw(st.integers(0, 9))), not quorum_lost)
                            for info, _, _, quorum_lost in changed])
                assert await exposition.render() == generate_latest(reference)
        await svc.close()

    asyncio.run(scrapes())


async def test_the_apps_metrics_are_every_collectors_in_registry_order(tmp_path: Path) -> None:
    """Over HTTP, weights on: the mesh's families, the weights', then the registry's (the
    process's own), as one registry of them all wrote them before."""
    async with mesh_app(tmp_path, nodes=5, extra="weights: {enabled: true}\n") as mesh:
        body = await (await mesh.client.get("/metrics")).text()
        svc = mesh.service
        reference = CollectorRegistry()
        guard = mesh.client.app[GUARD_KEY]
        reference.register(MeshCollector(lambda: svc, IngestStats(), guard=guard))
        reference.register(WeightCollector(lambda: svc))
        expected = generate_latest(reference).decode()
        names = [f.name for f in text_string_to_metric_families(body)]
        ours = [f.name for f in text_string_to_metric_families(expected)]
        assert "tunnelwatch_mesh_node_weight_changes" in ours
        assert names[:len(ours)] == ours  # then the process's own and build_info
        assert "tunnelwatch_build_info" in names[len(ours):]
        # the per-node families line for line (the totals' ingest and connection figures
        # belong to the app's own ingest and guard)
        per_node = [line for line in body.splitlines() if 'node="' in line]
        assert per_node == [line for line in expected.splitlines() if 'node="' in line]
        # verdict, five votes, quorum; changes, capacity, load fresh (nothing published, no load)
        assert len(per_node) == 5 * (7 + 3)
