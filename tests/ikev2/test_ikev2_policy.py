"""The IKEv2 policy scan without a lab: the deprecated algorithms it must be able to speak, its
offer table, names, config rules, and the scan against in-memory responders (honest, weak and
hostile) over loopback."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.checks.base import CheckResult, PlanContext
from probes.checks.ikev2 import FAMILY
from probes.checks.ikev2_policy import POLICY, Ikev2PolicyParams, run_policy
from probes.config import IKEv2Target, Target, ikev2_problems
from probes.model import Reason, Tier
from probes.protocols.ikev2 import IKEv2Error
from probes.protocols.ikev2 import crypto as c
from probes.protocols.ikev2 import payloads as p
from probes.protocols.ikev2.policy import DEFAULT_ITEMS, ITEMS_BY_NAME, PQ_PROPOSALS
from probes.protocols.ikev2.proposals import (
    chosen_esp,
    chosen_suite,
    encr_name,
    esp_label,
    group_name,
    integ_name,
    parse_esp_proposal,
    parse_esp_proposals,
    parse_ike_proposal,
    parse_ike_proposals,
    prf_name,
    suite_label,
)
from tests.agent.helpers import NODE_LABELS, exported
from tests.ikev2.fake_responder import FakeResponder
from tests.ikev2.test_ikev2_check import serve

pytestmark = pytest.mark.ikev2


# --- the deprecated algorithms the scan must finish an exchange with ---------------------------

@pytest.mark.parametrize("suite", [
    c.CipherSuite(c.ENCR_3DES, 24, c.PRF_HMAC_MD5, c.AUTH_HMAC_MD5_96, c.GROUP_MODP_1024),
    c.CipherSuite(c.ENCR_DES, 8, c.PRF_HMAC_SHA1, c.AUTH_HMAC_SHA1_96, c.GROUP_MODP_768),
    c.CipherSuite(c.ENCR_AES_CBC, 32, c.PRF_HMAC_SHA1, c.AUTH_HMAC_SHA1_96, c.GROUP_MODP_1536),
], ids=["3des-md5", "des-sha1", "aes256-sha1"])
def test_legacy_sk_round_trip_and_tamper(suite: c.CipherSuite) -> None:
    keys = c.derive_ike_keys(suite, b"g" * 128, nonce_i=b"i" * 32, nonce_r=b"r" * 32,
                             spi_i=b"a" * 8, spi_r=b"b" * 8)
    sender = c.SkCodec(suite, keys, os.urandom)
    receiver = c.SkCodec(suite, c.IkeKeys(keys.sk_d, keys.sk_ar, keys.sk_ai, keys.sk_er,
                                          keys.sk_ei, keys.sk_pr, keys.sk_pi), os.urandom)
    for size in (0, 7, 8, 33):
        body = sender.seal(b"prefix", bytes(range(size)))
        assert len(body) == sender.sealed_length(size)
        assert receiver.open(b"prefix", body) == bytes(range(size))
        with pytest.raises(IKEv2Error):
            receiver.open(b"prefix", body[:-1] + bytes([body[-1] ^ 1]))


@pytest.mark.parametrize("group", [c.GROUP_MODP_768, c.GROUP_MODP_1024, c.GROUP_MODP_1536])
def test_small_modp_groups_agree(group: int) -> None:
    a, b = c.KeyExchange(group), c.KeyExchange(group)
    assert len(a.public) == c.KE_LENGTHS[group] == {1: 96, 2: 128, 5: 192}[group]
    assert a.shared_secret(b.public) == b.shared_secret(a.public)
    with pytest.raises(IKEv2Error):
        a.shared_secret(bytes(c.KE_LENGTHS[group] - 1) + b"\x01")  # y = 1


# --- names ---------------------------------------------------------------------------------------

def test_names_are_strongswan_tokens_and_unknown_otherwise() -> None:
    suite = chosen_suite(parse_ike_proposal("3des-md5-prfmd5-modp1024", 1),
                         parse_ike_proposals(["3des-md5-prfmd5-modp1024"]))
    assert suite_label(suite) == "3des-md5-prfmd5-modp1024"
    gcm = chosen_suite(parse_ike_proposal("aes256gcm16-prfsha256-ecp256", 1),
                       parse_ike_proposals(["aes256gcm16-prfsha256-ecp256"]))
    assert suite_label(gcm) == "aes256gcm16-prfsha256-ecp256"
    esp = parse_esp_proposal("3des-sha1", b"spi!", aead_only=False)
    assert esp_label(esp) == "3des-sha1"
    assert (encr_name(99, 128), integ_name(99), prf_name(99), group_name(99)) == (
        "unknown", "unknown", "unknown", "unknown")
    assert integ_name(None) == "none" and group_name(36) == "mlkem768"


# --- the offer table -----------------------------------------------------------------------------

_TYPE_OF = {"encr": p.TransformType.ENCR, "integ": p.TransformType.INTEG,
            "prf": p.TransformType.PRF, "dh": p.TransformType.DH}


@pytest.mark.parametrize("name", [n for n in DEFAULT_ITEMS if not ITEMS_BY_NAME[n].create_child])
def test_each_item_offers_its_weak_choice_alone(name: str) -> None:
    """In the tested transform type only the deprecated choice is offered; the others are
    as broad as the probe speaks (the responder has no other reason to refuse)."""
    item = ITEMS_BY_NAME[name]
    where, what, weak = name.split("_")
    ttype = _TYPE_OF[what]
    if where == "ike":
        proposals = parse_ike_proposals(item.ike)
        offered = {(t.type, t.id) for prop in proposals for t in prop.transforms}
    else:
        assert item.esp is not None
        esp = parse_esp_proposal(item.esp, b"spi!", aead_only=False)
        offered = {(t.type, t.id) for t in esp.transforms}
    in_type = {tid for ttype_, tid in offered if ttype_ == ttype}
    label = {p.TransformType.ENCR: lambda t: encr_name(t, None),
             p.TransformType.INTEG: integ_name, p.TransformType.PRF: prf_name,
             p.TransformType.DH: group_name}[ttype]
    assert {label(t) for t in in_type} == {weak if what != "prf" else f"prf{weak}"}
    assert len(offered) - len(in_type) >= 4


def test_no_pfs_offer_is_every_esp_choice_without_a_key_exchange() -> None:
    item = ITEMS_BY_NAME["esp_no_pfs"]
    assert item.create_child and item.esp is not None
    aead, cbc = parse_esp_proposals(item.esp, b"spi!", aead_only=False)
    assert (aead.number, cbc.number) == (1, 2)
    for proposal in (aead, cbc):
        assert proposal.transform(p.TransformType.DH) is None
    assert {encr_name(t.id, t.key_length) for t in aead.transforms + cbc.transforms
            if t.type == p.TransformType.ENCR} == {"aes128gcm16", "aes256gcm16", "aes128",
                                                   "aes256", "3des", "des"}


def test_pq_offer_requires_mlkem_as_the_first_additional_exchange() -> None:
    (proposal,) = parse_ike_proposals(PQ_PROPOSALS)
    assert p.Transform(p.TransformType.ADDKE1, 36) in proposal.transforms
    encoded = p.encode_message(p.Header(b"i" * 8, bytes(8), 0, p.ExchangeType.IKE_SA_INIT,
                                        p.FLAG_INITIATOR, 0), [p.SAPayload((proposal,))])
    _, (sa,) = p.decode_message(encoded)
    assert isinstance(sa, p.SAPayload) and sa.proposals[0].transforms == proposal.transforms


# --- chosen proposals: fuzzed ------------------------------------------------------------------

_transforms = st.builds(p.Transform, st.integers(1, 12), st.integers(0, 40),
                        st.none() | st.sampled_from([64, 128, 192, 256, 999]))


@given(st.lists(_transforms, max_size=8), st.binary(max_size=6))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_chosen_proposals_raise_only_ikev2error(transforms: list[p.Transform],
                                                spi: bytes) -> None:
    offered = parse_ike_proposals(ITEMS_BY_NAME["ike_integ_md5"].ike + PQ_PROPOSALS)
    chosen = p.Proposal(1, p.ProtocolId.IKE, tuple(transforms), spi)
    with contextlib.suppress(IKEv2Error):
        suite = chosen_suite(chosen, offered)
        assert "unknown" not in suite_label(suite)  # everything chosen was offered: named
    esp_offer = parse_esp_proposal("3des-des-aes128-md5-sha1-modp1024", b"spi!",
                                   aead_only=False)
    with contextlib.suppress(IKEv2Error):
        assert "unknown" not in esp_label(chosen_esp(chosen, esp_offer))


# --- config --------------------------------------------------------------------------------------

def test_config_needs_a_psk_and_known_items(tmp_path: Path) -> None:
    bad = IKEv2Target(policy_scan=True, policy_items=["ike_dh_modp1024", "md4"])
    problems = {pr.path: pr.message for pr in ikev2_problems(bad, "$.ikev2", tmp_path)}
    assert "$.ikev2.policy_scan" in problems and "psk_file" in problems["$.ikev2.policy_scan"]
    assert "md4" in problems["$.ikev2.policy_items[1]"]
    psk = tmp_path / "psk"
    psk.write_text("k\n")
    ok = IKEv2Target(policy_scan=True, psk_file=str(psk), policy_items=["ike_dh_modp1024"])
    assert list(ikev2_problems(ok, "$.ikev2", tmp_path)) == []
    planned_checks = FAMILY.plan(PlanContext(Target(id="n", pool="p", pop="x", region="eu",
                                                    address="192.0.2.1", ikev2=ok),
                                             tmp_path))
    scan = [pc for pc in planned_checks if pc.kind is POLICY]
    assert len(scan) == 1 and scan[0].params.items == ("ike_dh_modp1024",)
    assert POLICY.tier is Tier.POLICY


# --- the scan over loopback ----------------------------------------------------------------------

def _policy(ports: tuple[int, int], psk: Path, **kw: object) -> Ikev2PolicyParams:
    base: dict[str, object] = dict(host="127.0.0.1", port=ports[0], nat_t_port=ports[1],
                                   psk_file=str(psk), remote_id="node.test",
                                   items=tuple(n for n in DEFAULT_ITEMS if n.startswith("ike_")),
                                   post_quantum=False)
    base.update(kw)
    return Ikev2PolicyParams(**base)  # type: ignore[arg-type]


@pytest.fixture
def psk(tmp_path: Path) -> Path:
    path = tmp_path / "psk"
    path.write_text("secret\n")
    return path


async def test_weak_responder_named_item_by_item(psk: Path) -> None:
    responder = FakeResponder(proposal="3des-md5-prfmd5-modp1024")
    async with serve(responder.handle) as ports:
        result = await run_policy(_policy(ports, psk), 20.0)
    assert result.reason is Reason.WEAK_CRYPTO, result
    assert result.facts["weak_accepted"] == (
        "ike_encr_3des,ike_integ_md5,ike_prf_md5,ike_dh_modp1024"), result.facts
    assert result.facts["chosen.ike_encr_3des"] == "3des-md5-prfmd5-modp1024"
    assert responder.deleted  # every accepted SA was deleted
    # the weak-accepted gauge per item, the way the alert reads it
    registry = exported(POLICY, result)
    labels = {**NODE_LABELS, "check": "ikev2.policy"}
    assert registry.get_sample_value("tunnelwatch_policy_weak_accepted",
                                     {**labels, "item": "ike_integ_md5"}) == 1.0
    assert registry.get_sample_value("tunnelwatch_policy_weak_accepted",
                                     {**labels, "item": "ike_integ_sha1"}) == 0.0
    assert registry.get_sample_value("tunnelwatch_node_policy_weak_accepted", labels) == 4.0


async def test_strict_responder_refuses_everything(psk: Path) -> None:
    async with serve(FakeResponder(proposal="aes256gcm16-prfsha256-ecp256").handle) as ports:
        result = await run_policy(_policy(ports, psk), 20.0)
    assert result.ok and result.facts["weak_accepted"] == "", result


async def test_hostile_responders_give_reasons_never_exceptions(psk: Path) -> None:
    def garbage(data: bytes) -> bytes:
        return os.urandom(len(data) % 200)

    def unoffered(data: bytes) -> bytes | None:  # "chooses" a proposal nobody offered
        answer = FakeResponder(proposal="aes256gcm16-prfsha256-modp1024").handle(data)
        if answer is None:
            return None
        header, payloads = p.decode_message(answer)
        swapped = p.SAPayload((parse_ike_proposal("aes192gcm16-prfsha256-modp1024", 1),))
        return p.encode_message(header, [swapped if isinstance(x, p.SAPayload) else x
                                         for x in payloads])

    for answer in (garbage, lambda data: None, unoffered):
        async with serve(answer) as ports:
            result = await run_policy(_policy(ports, psk, items=("ike_dh_modp1024",
                                                                  "ike_integ_sha1")), 3.0)
        assert not result.ok and result.reason is not Reason.WEAK_CRYPTO, result
        assert result.reason in {Reason.TIMEOUT, Reason.BAD_RESPONSE, Reason.BAD_PACKET,
                                 Reason.NO_PROPOSAL_CHOSEN} or result.ok, result
        assert result.detail


@pytest.mark.parametrize("require_pfs", [True, False])
async def test_child_sa_without_pfs_over_create_child_sa(psk: Path, require_pfs: bool) -> None:
    """The no-PFS offer is a CREATE_CHILD_SA without KE after a childless IKE_AUTH: refused by
    a responder that wants PFS, named when taken (and that CHILD_SA deleted with the IKE SA)."""
    responder = FakeResponder(require_pfs=require_pfs)
    async with serve(responder.handle) as ports:
        result = await run_policy(_policy(ports, psk, items=("esp_no_pfs",)), 10.0)
    exchanges = [h.exchange for h in responder.seen]
    assert p.ExchangeType.CREATE_CHILD_SA in exchanges, exchanges
    if require_pfs:
        assert result.ok and result.facts["policy.esp_no_pfs"] == "refused", result
        assert responder.created == 0 and p.ProtocolId.ESP not in responder.deleted
    else:
        assert result.reason is Reason.WEAK_CRYPTO, result
        assert result.facts["chosen.esp_no_pfs"] == "aes256gcm16-prfsha256-ecp256 / aes128gcm16"
        assert responder.created == 1
        assert responder.deleted == [p.ProtocolId.ESP, p.ProtocolId.IKE]
    assert "without PFS" in result.detail or require_pfs


@pytest.mark.parametrize("hostile", ["no-nonce", "with-ke", "unoffered", "two-proposals"])
async def test_hostile_create_child_answers_are_errors_never_acceptances(psk: Path,
                                                                         hostile: str) -> None:
    responder = FakeResponder(hostile_child=hostile)
    async with serve(responder.handle) as ports:
        result = await run_policy(_policy(ports, psk, items=("esp_no_pfs",)), 10.0)
    assert (result.ok, result.reason) == (False, Reason.BAD_RESPONSE), result
    assert result.facts["policy.esp_no_pfs"] == "error"
    assert "CREATE_CHILD_SA" in result.detail or "ESP" in result.detail, result.detail
    assert responder.deleted == [p.ProtocolId.IKE]  # the IKE SA still deleted


@pytest.mark.parametrize(("proposal", "expect"), [
    ("aes256gcm16-prfsha256-ecp256-ke1_mlkem768", "accepted"),
    ("aes256gcm16-prfsha256-ecp256", "refused"),  # answers classically, dropping ML-KEM
])
async def test_pq_offer_read_from_an_in_memory_responder(psk: Path, proposal: str,
                                                         expect: str) -> None:
    """No IKEv2 responder here speaks ML-KEM (strongSwan 5.9.8; its `ml` plugin is 6.0+), so
    the positive path is proven against the in-memory responder: one that chooses
    ML-KEM-768 as Additional Key Exchange 1 is reported as accepting it. It shows the probe
    reads the choice, not that an IKE_INTERMEDIATE exchange completes (the probe stops after
    IKE_SA_INIT)."""
    async with serve(FakeResponder(proposal=proposal).handle) as ports:
        result = await run_policy(_policy(ports, psk, items=(), post_quantum=True), 10.0)
    assert result.facts["post_quantum"] == expect, result
    assert result.facts["node_pq_key_exchange_accepted"] == int(expect == "accepted")
    assert result.facts["crypto.ike_pq_key_exchange"] == (
        "mlkem768" if expect == "accepted" else "none")
    assert result.ok  # readiness is reported, never a failure of the scan


def test_check_result_of_a_scan_is_json(psk: Path) -> None:
    result = CheckResult(False, Reason.WEAK_CRYPTO, 1.0, facts={"policy.ike_encr_3des":
                                                                "accepted"})
    assert result.to_json_dict()["reason"] == "weak-crypto"
