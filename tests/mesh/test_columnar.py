"""The columnar batch (probes.model.columnar): what it decodes to, what it refuses, and that the
mesh decides from it exactly as from the same observations in JSON."""

from __future__ import annotations

from array import array
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.mesh.decision import DecisionEngine
from probes.mesh.inputs import apply_entry
from probes.mesh.paths import PathEngine, PathPolicy
from probes.mesh.policy import DecisionPolicy, QualityBounds
from probes.mesh.store import EntryKind, JournalEntry
from probes.model import (
    NodeLoad,
    Observation,
    PathTrace,
    Quality,
    Reason,
    SchemaError,
    Tier,
    TraceProtocol,
    TraceTrigger,
    batch_body,
    decode_batch,
    encode,
)
from probes.model.columnar import (
    FIELDS,
    ColumnarBatch,
    columnar_body,
    columnar_body_of_json,
    columnar_count,
    decode_columnar,
    decode_received,
    is_columnar,
    whole_batch,
)
from probes.paths.asn import EMPTY
from tests.mesh.apptest import Mesh, mesh_app
from tests.mesh.helpers import fleet

pytestmark = pytest.mark.mesh

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
AGENT = "va"
NODES = [f"n{i}" for i in range(4)]


def observation(i: int, **kw: Any) -> Observation:
    fields: dict[str, Any] = {
        "node": NODES[i % len(NODES)], "check": "wg", "vantage": AGENT, "seq": i + 1,
        "wall_time": 100.0 + i, "ok": True, "reason": Reason.OK, "duration_seconds": 0.01,
        "kind": "wireguard.handshake"}
    fields.update(kw)
    return Observation(**fields)


def body_of(observations: list[Observation], **kw: Any) -> bytes:
    body = columnar_body(AGENT, kw.pop("batch_seq", 1), 100.0, observations, **kw)
    assert body is not None
    return body


def json_of(observations: list[Observation], batch_seq: int = 1, epoch: int = 0) -> bytes:
    return batch_body(AGENT, batch_seq, 100.0, [encode(o) for o in observations], epoch=epoch)


# ---- observations of every shape ----------------------------------------------------------

seconds = st.floats(0.0, 86_400.0)
qualities = st.builds(Quality, sent=st.integers(0, 10), received=st.integers(0, 10),
                      loss_ratio=st.floats(0.0, 1.0),
                      rtt_p99_seconds=st.none() | st.floats(0.0, 2.0))
loads = st.builds(NodeLoad, interval_seconds=st.floats(0.1, 60.0),
                  cpu_busy_ratio=st.none() | st.floats(0.0, 1.0))
reasons = st.sampled_from([Reason.OK, Reason.TIMEOUT, Reason.REFUSED, Reason.TUNNEL_LOSS,
                           Reason.TUNNEL_RTT, Reason.OVERLOADED, Reason.PROBE_ERROR])


@st.composite
def observations(draw: st.DrawFn, max_size: int = 12) -> list[Observation]:
    out = []
    seq = draw(st.integers(0, 5))
    for _ in range(draw(st.integers(0, max_size))):
        seq += draw(st.integers(0, 2))  # repeats: duplicates the engine counts
        reason = draw(reasons)
        out.append(Observation(
            node=draw(st.sampled_from([*NODES, "unknown-node"])),
            check=draw(st.sampled_from(["wg", "tcp:443", "sess"])), vantage=AGENT, seq=seq,
            wall_time=draw(st.floats(0.0, 1e10)), ok=reason == Reason.OK, reason=reason,
            duration_seconds=draw(seconds), kind=draw(st.sampled_from(["", "tcp", "wireguard"])),
            tier=draw(st.none() | st.sampled_from(list(Tier))),
            phases=draw(st.dictionaries(st.sampled_from(["connect", "tls", "rtt"]), seconds,
                                        max_size=2)),
            quality=draw(st.none() | qualities), detail=draw(st.sampled_from(["", "refused"])),
            load=draw(st.none() | loads)))
    return out


@FAST
@given(observations(), st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1))
def test_a_columnar_batch_decodes_to_the_json_batch(obs: list[Observation], batch_seq: int,
                                                    epoch: int) -> None:
    body = body_of(obs, batch_seq=batch_seq, epoch=epoch)
    assert is_columnar(body) and not is_columnar(json_of(obs))
    assert columnar_count(body) == len(obs)
    assert whole_batch(body) == decode_batch(json_of(obs, batch_seq, epoch))
    # the agent's path: from its spool's JSON observations
    again = columnar_body_of_json(AGENT, batch_seq, 100.0, [encode(o) for o in obs], epoch=epoch)
    assert again == body


def test_traces_ride_along_as_json() -> None:
    trace = PathTrace(node="n0", vantage=AGENT, wall_time=100.0, trigger=TraceTrigger.CHANGE,
                      failing=True, target="192.0.2.1", protocol=TraceProtocol.UDP, port=51820)
    body = body_of([observation(0)], traces=[encode(trace)])
    decoded = decode_received(body)
    assert isinstance(decoded, ColumnarBatch) and decoded.traces == [trace]
    assert whole_batch(body).traces == [trace]


def test_another_vantage_is_left_to_json() -> None:
    """A columnar batch has no vantage per observation: one that is not the agent's cannot be
    said, so the agent sends JSON (which the mesh refuses, as it always has)."""
    assert columnar_body(AGENT, 1, 100.0, [observation(0, vantage="vb")]) is None


# ---- the mesh decides alike ------------------------------------------------------------------

POLICY = DecisionPolicy(quality=QualityBounds(max_loss_ratio=0.2), fall=2, rise=2)


def _engines() -> tuple[DecisionEngine, PathEngine]:
    infos = fleet(len(NODES))
    return (DecisionEngine(POLICY, infos),
            PathEngine.from_rows({}, PathPolicy(), EMPTY, [i.node for i in infos]))


@FAST
@given(st.lists(observations(), min_size=1, max_size=6))
def test_json_and_columnar_batches_give_the_same_engine_and_verdicts(
        batches: list[list[Observation]]) -> None:
    json_engine, json_paths = _engines()
    col_engine, col_paths = _engines()
    for i, obs in enumerate(batches):
        now = 100.0 + 7.0 * i  # some observations go stale or late between batches
        by_json = apply_entry(json_engine, None, json_paths,
                              JournalEntry(EntryKind.BATCH, now, json_of(obs, i + 1)))
        by_columns = apply_entry(col_engine, None, col_paths,
                                 JournalEntry(EntryKind.BATCH, now, body_of(obs, batch_seq=i + 1)))
        assert by_columns == by_json
    assert col_engine.to_rows() == json_engine.to_rows()
    assert col_engine.agent_side_total == json_engine.agent_side_total


def test_load_reads_go_to_the_weights_not_the_engine() -> None:
    obs = [observation(0), observation(1, load=NodeLoad(interval_seconds=5.0)), observation(2)]
    decoded = decode_columnar(body_of(obs))
    assert [row[0] for row in decoded.rows()] == ["n0", "n2"]
    assert decoded.loads() == [("n1", NodeLoad(interval_seconds=5.0))]


# ---- what is refused, and where -------------------------------------------------------------

def _fields(obs: list[Observation]) -> list[Any]:
    return list(msgspec.msgpack.decode(body_of(obs)))


def _with(obs: list[Observation], **changes: Any) -> bytes:
    fields = _fields(obs)
    for name, value in changes.items():
        fields[FIELDS.index(name)] = value
    return msgspec.msgpack.encode(fields)


TWO = [observation(0), observation(1, ok=False, reason=Reason.TIMEOUT)]
NAN = array("d", [100.0, float("nan")]).tobytes()
# phases table ["connect", "tls"]; counts [2, 1]; names [0, 1, 0]
PHASED = [observation(0, phases={"connect": 0.1, "tls": 0.2}),
          observation(1, phases={"connect": 0.3})]


@pytest.mark.parametrize(("body", "field"), [
    (_with(TWO, version=3), "$.version"),
    (_with(TWO, agent=7), "$.agent"),
    (_with(TWO, batch_seq=-1), "$.batch_seq"),
    (_with(TWO, nodes=["n0", "x" * 300]), "$.nodes[1]"),
    (_with(TWO, reasons=["ok", "made-up"]), "$.reasons[1]"),
    (_with(TWO, seq=b"\x00" * 15), "$.seq"),
    (_with(TWO, node=array("I", [0, 9]).tobytes()), "$.node[1]"),
    (_with(TWO, check=array("H", [0, 1]).tobytes()), "$.check[1]"),
    (_with(TWO, check=array("H", [1, 1]).tobytes()), "$.check[0]"),  # one value for all
    (_with(TWO, kind=array("H", [0, 256]).tobytes()), "$.kind[1]"),
    (_with(TWO, reason=bytes([0, 2])), "$.reason[1]"),
    (_with(TWO, ok=bytes([1, 2])), "$.ok[1]"),
    (_with(TWO, tier=bytes([0, 7])), "$.tier[1]"),
    (_with(TWO, tier=bytes([9, 9])), "$.tier[0]"),
    (_with(TWO, seq=array("q", [1, -2]).tobytes()), "$.seq[1]"),
    (_with(TWO, wall_time=NAN), "$.wall_time[1]"),
    (_with(TWO, duration_seconds=array("d", [0.1, 1e9]).tobytes()), "$.duration_seconds[1]"),
    (_with(TWO, extras=b'[[1,{"detail":"a","detail":"b"}]]'), "$.extras[0][1].detail"),
    (_with(TWO, extras=b'[[1,{"detail":"a"}],[0,{"detail":"b"}]]'), "$.extras[1][0]"),
    (_with(TWO, extras=b'[[2,{"detail":"a"}]]'), "$.extras[0][0]"),
    (_with(TWO, extras=b'[[0,{"color":"red"}]]'), "$.extras[0][1]"),
    (_with(TWO, traces=b'[{"node":"n0"}]'), "$.traces[0]"),
    (_with(PHASED, phases=["connect", "x" * 65]), "$.phases[1]"),
    (_with(PHASED, phase_count=bytes([2])), "$.phase_count"),
    (_with(PHASED, phase_count=bytes([2, 33])), "$.phase_count[1]"),
    (_with(PHASED, phase_count=bytes([2, 2])), "$.phase"),
    (_with(PHASED, phase_count=bytes([1, 0])), "$.phase"),
    (_with(PHASED, phase_count=bytes([1, 1])), "$.phase"),
    (_with(PHASED, phase_seconds=array("d", [0.1, 0.2]).tobytes()), "$.phase_seconds"),
    (_with(PHASED, phase=array("H", [0, 5, 0]).tobytes()), "$.phase[1]"),
    (_with(PHASED, phase=array("H", [1, 1, 0]).tobytes()), "$.phase[1]"),  # "tls" twice
    (_with(PHASED, phase_seconds=array("d", [0.1, float("nan"), 0.3]).tobytes()),
     "$.phase_seconds[1]"),
    (_with(PHASED, phase_seconds=array("d", [0.1, 0.2, -1.0]).tobytes()), "$.phase_seconds[2]"),
    (_with(PHASED, extras=b'[[0,{"phases":{"connect":0.1}}]]'), "$.extras[0][1]"),
    (msgspec.msgpack.encode([*_fields(TWO), b"more"]), "$"),
    (msgspec.msgpack.encode(_fields(TWO)[:-1]), "$"),
])
def test_a_malformed_columnar_batch_is_refused_naming_the_field(body: bytes, field: str) -> None:
    assert is_columnar(body)
    with pytest.raises(SchemaError) as caught:
        decode_received(body)
    assert caught.value.path == field, str(caught.value)


def test_phases_travel_in_columns_in_their_order() -> None:
    obs = [observation(0, phases={"tls": 0.2, "connect": 0.1}), observation(1),
           observation(2, phases={"connect": 0.3})]
    fields = dict(zip(FIELDS, _fields(obs), strict=True))
    assert fields["phases"] == ["tls", "connect"]
    assert fields["phase_count"] == bytes([2, 0, 1])
    assert fields["phase"] == array("H", [0, 1, 1]).tobytes()
    assert fields["phase_seconds"] == array("d", [0.2, 0.1, 0.3]).tobytes()
    assert fields["extras"] == b""  # no JSON left for the mesh to decode
    assert [list(o.phases) for o in whole_batch(body_of(obs)).observations] == [
        ["tls", "connect"], [], ["connect"]]


def _mutated(data: bytes, cut: int, junk: bytes) -> bytes:
    cut %= len(data) + 1
    return data[:cut] + junk + data[cut + len(junk):]


def _decodes_or_names_a_field(body: bytes) -> None:
    """Anything the decoder takes is a batch the JSON schema takes too (bounds included); all
    else is a SchemaError naming where, never another exception."""
    try:
        batch = whole_batch(body)
    except SchemaError as exc:
        assert exc.path.startswith("$"), exc.path
        return
    assert decode_batch(encode(batch)) == batch


GOOD = [body_of(TWO), body_of(PHASED),
        body_of([observation(0, phases={"connect": 0.1},
                             quality=Quality(sent=3, received=3), detail="d")])]


@FAST
@given(st.sampled_from(GOOD), st.integers(0, 400), st.binary(min_size=1, max_size=8))
def test_columnar_decoder_fuzz_mutated(good: bytes, cut: int, junk: bytes) -> None:
    _decodes_or_names_a_field(_mutated(good, cut, junk))


@FAST
@given(st.sampled_from([0x92, 0x9F, 0xDC, 0xDD]), st.binary(max_size=300))
def test_columnar_decoder_fuzz_random(head: int, rest: bytes) -> None:
    _decodes_or_names_a_field(bytes([head]) + rest)


@FAST
@given(st.lists(st.one_of(st.none(), st.integers(-3, 2**33), st.binary(max_size=24),
                          st.text(max_size=4), st.lists(st.text(max_size=3), max_size=3)),
                min_size=len(FIELDS), max_size=len(FIELDS)))
def test_columnar_decoder_fuzz_fields(fields: list[Any]) -> None:
    _decodes_or_names_a_field(msgspec.msgpack.encode([2, *fields[1:]]))


# ---- over HTTP: taken like JSON, refused without losing anything ------------------------------

def _mesh_columnar(mesh: Mesh, agent: str, batch_seq: int, results: dict[str, bool],
                   start: int, *, columnar: bool = True) -> bytes:
    obs = [observation(start + i, node=n, vantage=agent, ok=ok, wall_time=mesh.now,
                       reason=Reason.OK if ok else Reason.TIMEOUT)
           for i, (n, ok) in enumerate(results.items())]
    if not columnar:
        return batch_body(agent, batch_seq, mesh.now, [encode(o) for o in obs])
    body = columnar_body(agent, batch_seq, mesh.now, obs)
    assert body is not None
    return body


async def _decided(folder: Path, columnar: bool) -> tuple[list[int], dict[str, Any]]:
    """Three agents' batches (the first always JSON: an agent's first batch to a mesh) taken
    over HTTP: the verdicts each caused, and the engine after them."""
    rounds = [{"n0": True, "n1": True}, *[{"n0": False, "n1": True}] * 3,
              *[{"n0": False, "n1": False}] * 3]
    caused = []
    async with mesh_app(folder) as mesh:
        for r, results in enumerate(rounds):
            for a, agent in enumerate(["va", "vb", "vc"]):
                body = _mesh_columnar(mesh, agent, r + 1, results, 10 * r,
                                      columnar=columnar and (r, a) != (0, 0))
                status, reply = await mesh.post(agent, body)
                assert status == 200 and "columnar" in reply["accepts"]
                caused.append(reply["verdicts"])
            mesh.now += 5.0  # beyond the dwell
        rows = mesh.service.engine.to_rows()
    async with mesh_app(folder) as mesh:  # a restart replays the journal, bodies as received
        assert mesh.service.engine.to_rows() == rows
    return caused, rows


async def test_the_mesh_decides_from_columnar_batches_as_from_json(tmp_path: Path) -> None:
    caused, rows = await _decided(tmp_path / "columnar", columnar=True)
    assert (caused, rows) == await _decided(tmp_path / "json", columnar=False)
    assert sum(caused) >= 3  # n0 and n1 UP, then n0 DOWN at least


async def test_a_refused_columnar_batch_loses_nothing(tmp_path: Path) -> None:
    async with mesh_app(tmp_path) as mesh:
        good = _mesh_columnar(mesh, "va", 1, {"n0": True, "n1": True}, 0)
        fields = msgspec.msgpack.decode(good)
        fields[FIELDS.index("node")] = array("I", [0, 5]).tobytes()
        before = mesh.stored()
        status, reply = await mesh.post("va", msgspec.msgpack.encode(fields))
        assert (status, reply["error"], reply["field"]) == (400, "schema", "$.node[1]")
        assert mesh.stored() == before  # nothing applied, the agent's position unchanged
        status, _ = await mesh.post("va", good)  # the same position, now well formed
        assert status == 200
        assert mesh.service.engine.observations_total == 2
