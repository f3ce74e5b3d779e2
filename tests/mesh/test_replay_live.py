"""``tunnelwatch mesh replay`` shows the same stream as the live mesh (issue 16).

A mesh service on a real SQLite store takes a generated correlated failure (a fleet simulator's
batches at their arrival times, its ticks, an operator's drain and ready): its journal, written
as journal records, replays through the real CLI to its verdict log byte for byte. Recorded
batches (as agents sent them) replay at their ``sent_at``, as the live mesh applied them.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from probes.cli import main
from probes.mesh.paths import PathPolicy
from probes.mesh.policy import DampingPolicy, DecisionPolicy
from probes.mesh.replay import JournalRecord, journal_record, parse_lines, replay
from probes.mesh.service import MeshService
from probes.mesh.store_sqlite import SQLiteStore
from probes.mesh.weight_policy import WeightPolicy
from probes.mesh.weights import WeightNode
from probes.model import ObservationBatch, PathTrace, SchemaError, VerdictState, encode
from probes.paths.asn import AsnTable
from tests.mesh.fleetsim import Fault, FleetSim, generated_fleet, pool_nodes
from tests.mesh.helpers import fleet, obs, write_mesh_config
from tests.paths.test_localise import A_PATH, flow, trace

pytestmark = pytest.mark.mesh

VANTAGES = ["va", "vb", "vc"]


@pytest.mark.parametrize("weights", [False, True])
async def test_replaying_the_journal_gives_the_live_verdict_stream(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], weights: bool) -> None:
    nodes = generated_fleet([12])
    names = pool_nodes(nodes, "p0")
    run = FleetSim(nodes=nodes, vantages=VANTAGES, policy=DecisionPolicy(), seed=5, loss=0.05,
                   faults=[Fault(frozenset(names[:7]), 10.0, 30.0)]).run(45.0)
    # with weights on, every verdict carries the node's published weight after it: the replay
    # runs the weight engine as the mesh does
    weight_policy = WeightPolicy(enabled=True) if weights else None
    svc = MeshService(SQLiteStore(tmp_path / "live.db"), DecisionPolicy(), nodes,
                      snapshot_every=10**9, weight_policy=weight_policy,
                      weight_nodes=[WeightNode(n.node, n.pool) for n in nodes])
    inputs = sorted([(t, 0, b) for t, b in run.batches] + [(t, 1, None) for t in run.ticks],
                    key=lambda x: (x[0], x[1]))
    for t, _, batch in inputs:
        if batch is None:
            await svc.tick(t)
        else:
            await svc.accept_batch(encode(batch), batch, t)
        if t == 20.0:
            await svc.set_admin(names[9], VerdictState.DRAINING, "alice", t)
        if t == 25.0:
            await svc.set_admin(names[9], None, "alice", t)
    live = [stored.verdict for stored in svc.store.verdicts(limit=100_000)]
    recovery = svc.store.recover()
    assert recovery.snapshot_journal_id == 0  # the journal holds everything since the start
    journal = tmp_path / "journal.jsonl"
    epoch = svc.store.epoch
    assert epoch > 0  # the live verdicts carry the store's epoch: so do the journal records
    journal.write_bytes(b"".join(journal_record(e, epoch) + b"\n" for e in recovery.entries))
    await svc.close()
    # the run moved verdicts, with the admin actions among them
    assert {v.state for v in live} >= {VerdictState.UP, VerdictState.DOWN,
                                       VerdictState.DRAINING}

    assert all((v.weight is not None) == weights for v in live)
    config = write_mesh_config(tmp_path / "cfg", 0, VANTAGES, infos=nodes,
                               extra="weights: {enabled: true}\n" if weights else "")
    assert main(["mesh", "replay", "--config", str(config), "--observations", str(journal)]) == 0
    replayed = capsys.readouterr().out.splitlines()
    assert [line.encode() for line in replayed] == [encode(v) for v in live]
    # the simulated mesh (the same engine, the same inputs, no operator) agrees on the probes'
    # verdicts as well
    assert [(v.node, v.state) for v in run.verdicts if v.node != names[9]] == [
        (v.node, v.state) for v in live if v.node != names[9]]


def test_a_recorded_batch_is_applied_whole_at_its_sent_at() -> None:
    policy = DecisionPolicy(rise=1, fall=1)
    batches = [
        msgspec.json.encode({"version": 1, "agent": v, "batch_seq": 1, "sent_at": 10.0,
                             "observations": [msgspec.to_builtins(
                                 obs("n0", v, True, at=3.0 + i))]})
        for i, v in enumerate(VANTAGES)
    ]
    verdicts = list(replay(policy, fleet(1), parse_lines(batches)))
    assert [(v.node, v.state, v.decided_at) for v in verdicts] == [
        ("n0", VerdictState.UP, 10.0)]


def test_journal_records_are_checked() -> None:
    good = msgspec.json.encode(JournalRecord(5.0, tick=True))
    assert list(parse_lines([good])) == [JournalRecord(5.0, tick=True)]
    for bad, field in ((b'{"now": 1.0}', "$"), (b'{"now": 1.0, "tick": true, "admin": '
                                                 b'{"node": "n0", "state": null}}', "$"),
                       (b'{"now": "x", "tick": true}', "$.now"),
                       (b'{"now": 1.0, "tick": true, "extra": 1}', "$")):
        with pytest.raises(SchemaError) as err:
            list(parse_lines([good, bad]))
        assert err.value.path.startswith("line 2: ") and field in err.value.path
    with pytest.raises(SchemaError):
        list(replay(DecisionPolicy(), [], parse_lines(
            [b'{"now": 1.0, "admin": {"node": "ghost", "state": "DRAINING"}}'])))


async def test_path_traces_replay_to_the_live_verdicts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Batches that carry path traces (the live mesh's path engine, with the operator's ASN
    table): the verdicts' path evidence, an impaired vantage's own network and a trace that
    comes after its verdict (an audit note, no verdict) replay from the journal through the
    CLI to the live verdict log byte for byte."""
    prefixes = [("10.1.0.0/16", 64501), ("10.10.0.0/16", 64510), ("10.20.0.0/16", 64520)]
    names = {64501: "provider-a", 64510: "transit-1"}
    nodes = fleet(4)
    svc = MeshService(SQLiteStore(tmp_path / "live.db"),
                      DecisionPolicy(damping=DampingPolicy(enabled=False)), nodes,
                      snapshot_every=10**9, path_policy=PathPolicy(),
                      asn_table=AsnTable(prefixes, names))
    seq = 0

    async def send(vantage: str, t: float, results: dict[str, bool],
                   traces: list[PathTrace] | None = None) -> None:
        nonlocal seq
        seq += 1
        b = ObservationBatch(version=1, agent=vantage, batch_seq=seq, sent_at=t,
                             observations=[obs(n, vantage, ok, at=t) for n, ok in results.items()],
                             traces=traces or [])
        await svc.accept_batch(encode(b), b, t)

    all_nodes = [n.node for n in nodes]
    for t in range(14):
        now = 100.0 + t
        # va: cut off inside its own provider from t=0 (its traces stop in AS64501): impaired.
        # From t=6 n0 fails for vb and vc too, who trace it to transit-1 (AS64510)
        cut = [trace("va", True, flow(["10.1.0.1"]), node=n, at=now) for n in all_nodes]
        await send("va", now, dict.fromkeys(all_nodes, False), cut if t == 0 else None)
        for vantage in ("vb", "vc"):
            lost = [trace(vantage, True, flow(A_PATH[:2]), node="n0", at=now)]
            await send(vantage, now, {n: not (t >= 6 and n == "n0") for n in all_nodes},
                       lost if t == 6 else None)
        if t % 2:
            await svc.tick(now + 0.5)
    # after n0's verdict: vb traces n1, which passes (news for no verdict: an audit note)
    await send("vb", 114.0, {}, [trace("vb", False, flow(A_PATH), node="n1", at=114.0)])
    live = [stored.verdict for stored in svc.store.verdicts(limit=100_000)]
    kinds = {r.what for v in live for r in v.reasons}
    assert {"path", "vantage-path"} <= kinds, kinds  # the traces are in the verdicts
    journal = tmp_path / "journal.jsonl"
    epoch = svc.store.epoch
    journal.write_bytes(b"".join(journal_record(e, epoch) + b"\n"
                                 for e in svc.store.recover().entries))
    await svc.close()

    table, names_file = tmp_path / "cfg" / "asn.ipasn", tmp_path / "cfg" / "asnames.txt"
    table.parent.mkdir()
    table.write_text("".join(f"{prefix}\t{asn}\n" for prefix, asn in prefixes))
    names_file.write_text("".join(f"{asn} {name}\n" for asn, name in names.items()))
    config = write_mesh_config(tmp_path / "cfg", 4, VANTAGES, extra=(
        "decision: {damping: {enabled: false}}\n"
        f"paths: {{asn_table: {table}, asn_names: {names_file}}}\n"))
    assert main(["mesh", "replay", "--config", str(config), "--observations", str(journal)]) == 0
    replayed = capsys.readouterr().out.splitlines()
    assert [line.encode() for line in replayed] == [encode(v) for v in live]
