"""The policy scan's hello offers through the session core, against an OpenSSL server (the fake
server's TLS is real): accepted and refused answers, the classification, and fuzzed answers."""

from __future__ import annotations

import os
import ssl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.checks.openvpn_policy import PQ_ITEM, _hello_outcome, _pq_offer
from probes.protocols.openvpn.policy import HELLO_ITEMS
from probes.protocols.openvpn.session import (
    ClientSession,
    HelloAnswered,
    ResetAnswered,
    ServerMisbehaved,
    SessionOptions,
)
from probes.protocols.tlswire import (
    TLS12,
    TLS13,
    X25519,
    X25519MLKEM768,
    HelloOffer,
    ServerFlight,
    client_hello,
)
from tests.openvpn.conftest import server_context
from tests.openvpn.fake_server import FakeServer
from tests.openvpn.pki import Issued, ScratchPki
from tests.openvpn.test_session import drive

pytestmark = pytest.mark.openvpn


def _offer(server_ctx: ssl.SSLContext, offer: HelloOffer) -> tuple[list[object], FakeServer]:
    session = ClientSession(options=SessionOptions(hello=client_hello(offer, os.urandom(32)),
                                                   key_exchange=False, want_push=False))
    server = FakeServer(server_ctx)
    session.start(0.0)
    events = drive(session, server)
    return events, server


def test_accepted_tls12_offer_is_a_server_hello(pki: ScratchPki, server_cert: Issued) -> None:
    ctx = server_context(pki.ca_file, server_cert)
    ctx.verify_mode = ssl.CERT_NONE
    offer = HelloOffer((TLS12,), (0xC02B, 0xC02C), (23, 29))
    events, _ = _offer(ctx, offer)
    assert isinstance(events[0], ResetAnswered)
    answered = [e for e in events if isinstance(e, HelloAnswered)]
    assert len(answered) == 1, events
    outcome, facts = _hello_outcome("x", offer, answered[0].flight)
    assert outcome == "accepted" and "TLS_ECDHE_ECDSA_WITH_AES" in str(facts["chosen.x"])


def test_refused_offer_is_an_alert_and_classified(pki: ScratchPki, server_cert: Issued) -> None:
    ctx = server_context(pki.ca_file, server_cert)  # TLS 1.2 minimum, as OpenSSL 3 defaults
    name, (_, offer) = "tls_version_1_0", HELLO_ITEMS["tls_version_1_0"]
    events, server = _offer(ctx, offer)
    answered = [e for e in events if isinstance(e, HelloAnswered)]
    assert server.tls_error is not None
    if answered:  # the fake server sends OpenSSL's alert (OpenVPN drops the instance instead)
        assert _hello_outcome(name, offer, answered[0].flight)[0] == "refused"
    assert _hello_outcome(name, offer, None) == ("refused", {
        f"refusal.{name}": "dropped without an answer"})


def test_an_unoffered_choice_is_an_error_never_an_acceptance() -> None:
    offer = HELLO_ITEMS["tls_kx_rsa"][1]
    flight = ServerFlight()
    from tests.unit.test_tlswire import _server_hello

    flight.feed(_server_hello(TLS12, 0xC02F, None))  # ECDHE: not what was offered
    outcome, facts = _hello_outcome("tls_kx_rsa", offer, flight)
    assert outcome == "error" and "not offered" in str(facts["error.tls_kx_rsa"])


def _pq_answer(group: int, share_len: int) -> ServerFlight:
    from tests.unit.test_tlswire import _server_hello

    flight = ServerFlight()
    flight.feed(_server_hello(TLS13, 0x1301, group, share_len=share_len))
    return flight


def test_pq_positive_path_read_from_a_synthetic_server_hello() -> None:
    """No TLS server here speaks ML-KEM (OpenSSL 3.0; X25519MLKEM768 needs 3.5), so the
    positive path is proven against a ServerHello built here: a server taking the hybrid group
    with a 1120-byte share (ML-KEM-768 ciphertext + X25519) is an acceptance; another group or
    a share of the wrong size is an error, never an acceptance. This shows the probe reads a
    positive answer right, not that an ML-KEM exchange completes."""
    offer = _pq_offer()
    assert _hello_outcome(PQ_ITEM, offer, _pq_answer(X25519MLKEM768, 1120)) == (
        "accepted", {f"chosen.{PQ_ITEM}": "TLSv1.3 TLS_AES_128_GCM_SHA256"})
    for group, size in ((X25519MLKEM768, 32), (X25519, 32)):
        outcome, facts = _hello_outcome(PQ_ITEM, offer, _pq_answer(group, size))
        assert outcome == "error" and "key share" in str(facts[f"error.{PQ_ITEM}"]), facts


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=4))
def test_hostile_answers_to_a_hello_never_raise(answers: list[bytes]) -> None:
    """Whatever comes back inside CONTROL_V1 after our hello: events, never an exception."""
    from probes.protocols.openvpn.packet import ControlPacket, Opcode
    from probes.protocols.openvpn.wrap import NoWrap

    session = ClientSession(options=SessionOptions(
        hello=client_hello(HELLO_ITEMS["tls_version_1_0"][1], bytes(32)), key_exchange=False,
        want_push=False))
    session.start(0.0)
    session.datagrams_to_send(0.0)
    wrap, sid = NoWrap(), os.urandom(8)
    first = ControlPacket(Opcode.CONTROL_HARD_RESET_SERVER_V2, sid, 0, (0,),
                          session.session_id, 0, b"")
    reset = wrap.wrap(first.header(), first.body())
    session.receive_datagram(reset, ("", 0), 0.0)
    for i, data in enumerate(answers):
        packet = ControlPacket(Opcode.CONTROL_V1, sid, 0, (), None, i + 1, data)
        session.receive_datagram(wrap.wrap(packet.header(), packet.body()), ("", 0), float(i))
        session.datagrams_to_send(float(i))
    events = []
    while (event := session.next_event()) is not None:
        events.append(event)
    for event in events:
        if isinstance(event, HelloAnswered):
            _hello_outcome("tls_version_1_0", HELLO_ITEMS["tls_version_1_0"][1], event.flight)
        assert not isinstance(event, ServerMisbehaved) or event.detail
    session.end_hello(10.0)


def test_policy_scan_is_planned_last_for_the_cli_and_by_the_agent(tmp_path: object) -> None:
    from pathlib import Path

    from probes.checks.base import PlanContext
    from probes.checks.openvpn import COMMAND
    from probes.checks.registry import families
    from probes.config import OpenVPNTarget, Target, openvpn_problems
    from probes.model import Tier

    section = OpenVPNTarget(policy_scan=True, tls_crypt_file="/k", policy_items=["tls_kx_rsa"])
    target = Target(id="n", pool="p", pop="x", region="r", address="192.0.2.1", openvpn=section)
    ctx = PlanContext(target, Path(str(tmp_path)))
    cli = list(COMMAND.plan(section, ctx))
    assert cli[-1].kind.name == "openvpn.policy" and cli[-1].kind.tier is Tier.POLICY
    assert cli[-1].params.items == ("tls_kx_rsa",)
    agent = [p.kind.name for f in families() for p in f.plan(ctx)]
    assert agent.count("openvpn.policy") == 1
    bad = OpenVPNTarget(policy_items=["tls_version_0_9"])
    assert any("tls_version_0_9" in p.message
               for p in openvpn_problems(bad, "$.openvpn", Path(str(tmp_path))))
