"""Ingest (authentication, validation, all-or-nothing) and the HTTP API, through aiohttp's test
client against the real app and a real SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from probes.cli.status import render
from probes.config import ConfigError
from probes.mesh.config import load_mesh_config
from probes.model import ObservationBatch, encode, signing
from tests.mesh.apptest import NOW, TOKEN, Mesh, mesh_app
from tests.mesh.helpers import obs, write_mesh_config

pytestmark = pytest.mark.mesh


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async with mesh_app(tmp_path) as m:
        yield m


async def test_accepts_signed_batches_and_decides(mesh: Mesh) -> None:
    for seq, agent in enumerate(["va", "vb", "vc"], 1):
        status, reply = await mesh.post(agent, mesh.body(agent, seq, {"n0": True, "n1": True}))
        assert (status, reply["accepted"]) == (200, True)
    resp = await mesh.client.get("/v1/verdicts")
    data = await resp.json()
    states = {n["node"]: n["state"] for n in data["nodes"]}
    assert states == {"n0": "UP", "n1": "UP", "n2": "UNKNOWN", "n3": "UNKNOWN"}
    assert data["vantages"] == ["va", "vb", "vc"]
    journal, agents, verdicts, applied = mesh.stored()
    assert (journal, verdicts, applied) == (3, 2, 6)
    assert agents == {"va": (0, 1), "vb": (0, 2), "vc": (0, 3)}  # (epoch, batch_seq)


async def _assert_rejected(mesh: Mesh, result: tuple[int, Any], status: int, reason: str,
                           answered: str | None = None) -> None:
    """Rejected with ``status``, answered ``answered`` (default: ``reason``), and counted in the
    rejects metric under ``reason``."""
    assert result[0] == status and result[1]["error"] == (answered or reason), result
    metrics = await (await mesh.client.get("/metrics")).text()
    assert f'tunnelwatch_mesh_ingest_rejects_total{{reason="{reason}"}} 1.0' in metrics


async def test_forged_signature_is_rejected_and_nothing_stored(mesh: Mesh) -> None:
    before = mesh.stored()
    body = mesh.body("va", 1, {"n0": False})
    headers = {signing.HEADER_SIGNATURE: signing.sign(b"x" * 32, f"{NOW:.3f}", body)}
    await _assert_rejected(mesh, await mesh.post("va", body, **headers), 401, "bad-signature")
    tampered = body.replace(b'"ok":false', b'"ok":true ')
    headers = {signing.HEADER_SIGNATURE: signing.sign(mesh.key("va"), f"{NOW:.3f}", body)}
    status, reply = await mesh.post("va", tampered, **headers)
    assert (status, reply["error"]) == (401, "bad-signature")
    assert mesh.stored() == before


async def test_replayed_batch_is_rejected(mesh: Mesh) -> None:
    body = mesh.body("va", 7, {"n0": True})
    assert (await mesh.post("va", body))[0] == 200
    before = mesh.stored()
    await _assert_rejected(mesh, await mesh.post("va", body), 409, "replay")
    older = mesh.body("va", 6, {"n0": False})
    assert (await mesh.post("va", older))[0] == 409
    assert mesh.stored() == before


async def test_a_newer_agent_epoch_is_taken_and_older_positions_are_replays(
        tmp_path: Path) -> None:
    """An agent that lost its state starts a newer instance epoch with batch_seq 0: taken at
    once, and its restarted observation seqs count (the engine does not drop them as old
    duplicates). Within an epoch the batch_seq rule holds; an older epoch is a replay; the 409
    names the agent's position, and the position survives a mesh restart."""
    async with mesh_app(tmp_path) as mesh:
        first = mesh.body("va", 40, {"n0": True}, epoch=1000, obs_seq=500)
        assert (await mesh.post("va", first))[0] == 200
        mesh.now += 1
        seen = mesh.service.engine.check_state("n0", "va", "wg").seen
        lost_state = mesh.body("va", 0, {"n0": True}, epoch=2000, obs_seq=0)
        assert (await mesh.post("va", lost_state))[0] == 200
        assert mesh.service.engine.check_state("n0", "va", "wg").seen > seen
        assert mesh.service.engine.duplicate_total == 0
        status, reply = await mesh.post("va", mesh.body("va", 0, {"n0": False}, epoch=2000))
        assert (status, reply["error"], reply["epoch"], reply["batch_seq"]) == (
            409, "replay", 2000, 0)
        for epoch, seq in ((1000, 41), (0, 99), (1999, 5)):
            assert (await mesh.post("va", mesh.body("va", seq, {"n0": False}, epoch=epoch)))[
                0] == 409
        assert mesh.stored()[1] == {"va": (2000, 0)}
    async with mesh_app(tmp_path) as again:  # a restart keeps the position
        assert (await again.post("va", again.body("va", 0, {"n0": True}, epoch=2000)))[0] == 409
        assert (await again.post("va", again.body("va", 1, {"n0": True}, epoch=2000)))[0] == 200


@pytest.mark.parametrize(
    ("kw", "key_agent", "field"),
    [
        ({}, "vb", ""),  # va's header with vb's key id
        ({"batch_agent": "vb"}, None, "$.agent"),
        ({"vantage": "vb"}, None, "$.observations[0].vantage"),
    ],
)
async def test_an_agent_reports_only_as_itself(
    mesh: Mesh, kw: dict[str, str], key_agent: str | None, field: str
) -> None:
    before = mesh.stored()
    body = mesh.body("va", 1, {"n0": False, "n1": False}, **kw)
    result = await mesh.post("va", body, key_agent=key_agent)
    await _assert_rejected(mesh, result, 403, "identity")
    assert result[1].get("field", "") == field
    assert mesh.stored() == before


async def test_one_foreign_observation_rejects_the_whole_batch(mesh: Mesh) -> None:
    mine = obs("n0", "va", False, at=NOW)
    foreign = obs("n1", "vb", False, at=NOW)
    body = encode(
        ObservationBatch(
            version=1, agent="va", batch_seq=1, sent_at=NOW, observations=[mine, foreign]
        )
    )
    before = mesh.stored()
    status, reply = await mesh.post("va", body)
    assert (status, reply["field"]) == (403, "$.observations[1].vantage")
    assert mesh.stored() == before
    assert mesh.service.engine.check_count() == 0


async def test_oversized_body_is_rejected(mesh: Mesh) -> None:
    body = mesh.body("va", 1, {f"n{i % 4}": True for i in range(4)})
    big = body[:-2] + b"," + b",".join([encode(obs("n0", "va", True))] * 40) + b"]}"
    assert len(big) > 4096
    before = mesh.stored()
    await _assert_rejected(mesh, await mesh.post("va", big), 413, "too-large")
    assert mesh.stored() == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"version": 1, "agent": "va", "batch_seq": 1, "sent_at": 1.0, "observations": [', "$"),
        (b"not json at all", "$"),
        (
            b'{"version": 1, "agent": "va\x80", "batch_seq": 1, "sent_at": 1, "observations": []}',
            "$",
        ),
        (
            b'{"version": 1, "agent": "va", "batch_seq": "one", "sent_at": 1, "observations": []}',
            "$.batch_seq",
        ),
        (
            b'{"version": 9, "agent": "va", "batch_seq": 1, "sent_at": 1.0, "observations": []}',
            "$.version",
        ),
    ],
)
async def test_malformed_bodies_are_rejected_naming_the_field(
    mesh: Mesh, body: bytes, field: str
) -> None:
    before = mesh.stored()
    result = await mesh.post("va", body)
    await _assert_rejected(mesh, result, 400, "schema")
    assert result[1]["field"] == field
    assert mesh.stored() == before


async def test_bad_observation_field_is_named(mesh: Mesh) -> None:
    good = msgspec.json.decode(mesh.body("va", 1, {"n0": True, "n1": True}))
    good["observations"][1]["reason"] = "made-up"
    status, reply = await mesh.post("va", msgspec.json.encode(good))
    assert (status, reply["field"]) == (400, "$.observations[1].reason")


async def test_header_problems(mesh: Mesh) -> None:
    body = mesh.body("va", 1, {"n0": True})
    stale = signing.format_timestamp(NOW - 3600)
    headers = {
        signing.HEADER_TIMESTAMP: stale,
        signing.HEADER_SIGNATURE: signing.sign(mesh.key("va"), stale, body),
    }
    await _assert_rejected(mesh, await mesh.post("va", body, **headers), 401, "stale-timestamp")
    # an unknown key id gets the answer a wrong signature gets (no enumeration of key ids)
    await _assert_rejected(
        mesh, await mesh.post("va", body, **{signing.HEADER_KEY_ID: "nobody"}), 401, "unknown-key",
        answered="bad-signature",
    )
    resp = await mesh.client.post("/v1/batches", data=body)
    assert resp.status == 401 and (await resp.json())["error"] == "missing-header"
    assert mesh.stored()[0] == 0
    data = await (await mesh.client.get("/v1/verdicts?vantages=1")).json()
    assert data["vantages"] == ["va", "vb", "vc"]  # configured, none reported yet
    assert all(n["vantages"] == {} and n["state"] == "UNKNOWN" for n in data["nodes"])


async def test_api_nodes_admin_and_metrics(mesh: Mesh) -> None:
    for seq, agent in enumerate(["va", "vb", "vc"], 1):
        await mesh.post(agent, mesh.body(agent, seq, {"n0": True, "n1": True}))
    node = await (await mesh.client.get("/v1/nodes/n0")).json()
    assert node["state"] == "UP" and set(node["vantages"]) == {"va", "vb", "vc"}
    assert node["vantages"]["va"]["checks"]["wg"]["state"] == "UP"
    assert node["last_verdict"]["reasons"][0]["what"] == "vote"
    assert (await mesh.client.get("/v1/nodes/zz")).status == 404

    assert (await mesh.client.post("/v1/nodes/n0/drain")).status == 401
    assert (
        await mesh.client.post("/v1/nodes/n0/drain", headers={"Authorization": "Bearer nope"})
    ).status == 401
    assert (await mesh.client.post("/v1/nodes/n0/explode", headers=TOKEN)).status == 404
    assert (await mesh.client.post("/v1/nodes/zz/drain", headers=TOKEN)).status == 404
    resp = await mesh.client.post("/v1/nodes/n0/drain", headers=TOKEN, json={"actor": "alice"})
    assert resp.status == 200 and (await resp.json())["state"] == "DRAINING"
    # probes saying UP do not override the drain
    for seq, agent in enumerate(["va", "vb", "vc"], 10):
        await mesh.post(agent, mesh.body(agent, seq, {"n0": True}))
    assert (await (await mesh.client.get("/v1/nodes/n0")).json())["state"] == "DRAINING"
    log = (await (await mesh.client.get("/v1/verdicts?after=0&node=n0")).json())["log"]
    assert [e["verdict"]["state"] for e in log] == ["UP", "DRAINING"]
    assert log[1]["verdict"]["reasons"][0] == {
        "what": "admin",
        "note": "DRAINING set by operator alice",
    }
    resp = await mesh.client.post("/v1/nodes/n0/ready", headers=TOKEN)
    assert (await resp.json())["state"] == "UP"

    table = render(await (await mesh.client.get("/v1/verdicts?vantages=1")).json())
    assert table.splitlines()[1].split()[:5] == ["n0", "up", "up", "up", "UP"]
    assert "UNKNOWN 2" in table

    metrics = await (await mesh.client.get("/metrics")).text()
    for line in (
        'tunnelwatch_mesh_nodes{state="UP"} 2.0',
        'tunnelwatch_mesh_node_verdict{node="n0",pool="p0",state="UP"} 1.0',
        'tunnelwatch_mesh_node_votes{node="n0",vote="up"} 3.0',
        'tunnelwatch_mesh_verdict_transitions_total{from="DRAINING",to="UP"} 1.0',
        'tunnelwatch_mesh_vantage_impaired{vantage="va"} 0.0',
        'tunnelwatch_mesh_pool_guard_holding{pool="p0"} 0.0',
        "tunnelwatch_mesh_ingest_batches_total 6.0",
        "tunnelwatch_mesh_ingest_observations_total 9.0",
    ):
        assert line in metrics, line
    assert (await (await mesh.client.get("/healthz")).json())["ok"] is True


def test_mesh_config_errors_name_the_field(tmp_path: Path) -> None:
    path = write_mesh_config(tmp_path, 2, ["va"], extra="decision:\n  quorum:\n    min_voters: 0\n")
    with pytest.raises(ConfigError) as info:
        load_mesh_config(path)
    assert [p.path for p in info.value.problems] == ["$.decision.quorum.min_voters"]
    assert info.value.problems[0].line is not None
    text = path.read_text().replace("key_file: va.key", "key_file: missing.key")
    path.write_text(text.replace("decision:\n  quorum:\n    min_voters: 0\n", "nodes_typo: 1\n"))
    with pytest.raises(ConfigError) as info:
        load_mesh_config(path)
    assert "nodes_typo" in str(info.value)
    path.write_text(text.replace("decision:\n  quorum:\n    min_voters: 0\n", ""))
    with pytest.raises(ConfigError) as info:
        load_mesh_config(path)
    assert [p.path for p in info.value.problems] == ["$.agents[0].key_file"]


async def test_quorum_loss_is_an_audit_note_not_a_verdict(mesh: Mesh) -> None:
    for seq, agent in enumerate(["va", "vb", "vc"], 1):
        await mesh.post(agent, mesh.body(agent, seq, {"n0": True}))
    mesh.now += 40  # vb and vc go stale (30 s): va alone is below min_voters
    status, reply = await mesh.post("va", mesh.body("va", 4, {"n0": True}))
    assert (status, reply["verdicts"]) == (200, 0)
    log = (await (await mesh.client.get("/v1/verdicts?after=0&node=n0")).json())["log"]
    assert [e["verdict"]["state"] for e in log] == ["UP"]  # nothing for the balancers
    node = await (await mesh.client.get("/v1/nodes/n0")).json()
    assert node["quorum_lost"] and node["seq"] == 1
    audit = (await (await mesh.client.get("/v1/audit")).json())["audit"]
    assert [(a["what"], a["node"], a["state"]) for a in audit] == [("quorum-lost", "n0", "UP")]
    assert (await mesh.client.get("/v1/audit?limit=x")).status == 400
    metrics = await (await mesh.client.get("/metrics")).text()
    assert 'tunnelwatch_mesh_audit_events_total{what="quorum-lost"} 1.0' in metrics
    assert 'tunnelwatch_mesh_vantage_contradicted{vantage="va"} 0.0' in metrics


async def test_a_failure_asks_the_other_vantages_in_their_replies(mesh: Mesh) -> None:
    for seq, agent in enumerate(["va", "vb", "vc"], 1):
        status, reply = await mesh.post(agent, mesh.body(agent, seq, {"n0": True}))
        assert "reprobe" not in reply
    mesh.now += 1
    status, reply = await mesh.post("va", mesh.body("va", 4, {"n0": False}))
    assert status == 200 and "reprobe" not in reply  # nothing is asked of the one that failed
    status, reply = await mesh.post("vb", mesh.body("vb", 5, {"n1": True}))
    assert reply["reprobe"] == [["n0", "wg"]]
    status, reply = await mesh.post("vb", mesh.body("vb", 6, {"n1": True}))
    assert "reprobe" not in reply  # delivered once
    metrics = await (await mesh.client.get("/metrics")).text()
    assert 'tunnelwatch_mesh_reprobe_requests_total{result="sent"} 1.0' in metrics


async def test_reprobe_requests_dropped_are_counted_on_metrics(tmp_path: Path) -> None:
    """Requests the mesh does not deliver, by why, as the real /metrics endpoint shows them:
    ``agent-rate`` (a flood of failures), ``cooldown`` (the same node and check asked about
    again), ``expired`` (the agent sent no batch in time)."""
    extra = "reprobe: {agent_rate: 0.5, node_cooldown_seconds: 5, max_delay_seconds: 1}\n"
    async with mesh_app(tmp_path, extra=extra) as mesh:
        seq = iter(range(1, 100))
        for agent in ("va", "vb", "vc"):
            await mesh.post(agent, mesh.body(agent, next(seq), {"n0": True, "n1": True}))
        mesh.now += 1
        # va: n0 and n1 begin failing at once. vb and vc are asked about both, but each agent's
        # bucket holds one request (twice 0.5/s): n1's are dropped by the agent rate
        status, _ = await mesh.post("va", mesh.body("va", next(seq), {"n0": False, "n1": False}))
        assert status == 200
        # vb's batch gets its request (sent); its own failure of n0 begins within the cooldown
        # of the ask about n0: vc is not asked again
        status, reply = await mesh.post("vb", mesh.body("vb", next(seq), {"n0": False}))
        assert status == 200 and reply["reprobe"] == [["n0", "wg"]]
        # vc reports only after max_delay_seconds: its request about n0 has expired; its own
        # failure of n1 begins within n1's cooldown (a request dropped by the rate still started
        # it): vb is not asked about n1 either
        mesh.now += 1.5
        status, reply = await mesh.post("vc", mesh.body("vc", next(seq), {"n1": False}))
        assert status == 200 and "reprobe" not in reply
        metrics = await (await mesh.client.get("/metrics")).text()
        for result, count in (("sent", 1), ("agent-rate", 2), ("cooldown", 2), ("expired", 1)):
            line = f'tunnelwatch_mesh_reprobe_requests_total{{result="{result}"}} {count:.1f}'
            assert line in metrics, (line, [m for m in metrics.splitlines() if "reprobe" in m])
