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
from probes.mesh.policy import DecisionPolicy
from probes.mesh.replay import JournalRecord, journal_record, parse_lines, replay
from probes.mesh.service import MeshService
from probes.mesh.store_sqlite import SQLiteStore
from probes.mesh.weight_policy import WeightPolicy
from probes.mesh.weights import WeightNode
from probes.model import SchemaError, VerdictState, encode
from tests.mesh.fleetsim import Fault, FleetSim, generated_fleet, pool_nodes
from tests.mesh.helpers import fleet, obs, write_mesh_config

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
