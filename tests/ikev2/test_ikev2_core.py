"""Unit tests of the IKEv2 core: codec, crypto shapes, proposals, ESP and the state machine."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from probes.protocols.core import BadDatagram
from probes.protocols.ikev2 import IKEv2Error
from probes.protocols.ikev2 import crypto as c
from probes.protocols.ikev2 import payloads as p
from probes.protocols.ikev2.esp import EspSa, classify_nat_t
from probes.protocols.ikev2.initiator import (
    AuthCompleted,
    ChildRequest,
    Closed,
    EspPacket,
    Failed,
    Failure,
    InitCompleted,
    Initiator,
    InitiatorConfig,
    InitRetried,
    State,
)
from probes.protocols.ikev2.proposals import (
    DEFAULT_IKE_PROPOSALS,
    parse_esp_proposal,
    parse_ike_proposal,
    parse_ike_proposals,
)
from tests.ikev2.fake_responder import FakeResponder

pytestmark = pytest.mark.ikev2

IKE = ("192.0.2.1", 500)  # datagrams from the responder's IKE port
NAT_T = ("192.0.2.1", 4500)  # ... and from its NAT-T port

LOCAL = ("198.51.100.7", 40000)


# --- codec ------------------------------------------------------------------------------------

def test_sa_init_round_trips_through_the_codec() -> None:
    payloads: list[p.Payload] = [
        p.NotifyPayload(p.NotifyType.COOKIE, b"c" * 16),
        p.SAPayload(parse_ike_proposals(DEFAULT_IKE_PROPOSALS)),
        p.KEPayload(19, b"k" * 64),
        p.NoncePayload(b"n" * 32),
        p.TSPayload(p.PayloadType.TSI, (p.TrafficSelector.network("10.0.0.0/8"),)),
        p.DeletePayload(p.ProtocolId.ESP, (b"abcd", b"efgh")),
        p.IdPayload(p.PayloadType.IDI, p.IdType.FQDN, b"probe"),
        p.AuthPayload(p.AuthMethod.PSK, b"a" * 32),
        p.RawPayload(p.PayloadType.VENDOR, b"vendor", critical=False),
    ]
    header = p.Header(b"I" * 8, bytes(8), 0, p.ExchangeType.IKE_SA_INIT, p.FLAG_INITIATOR, 0)
    wire = p.encode_message(header, payloads)
    decoded_header, decoded = p.decode_message(wire)
    assert decoded == payloads
    assert decoded_header.length == len(wire) and decoded_header.exchange == 34
    assert wire[16] == p.PayloadType.NOTIFY and wire[17] == 0x20


def test_transform_layout_matches_rfc_7296() -> None:
    # last transform, 12 bytes, ENCR AES-CBC with the TV key length attribute 0x800E = 256
    wire = p.Transform(p.TransformType.ENCR, 12, 256).encode(last=True)
    assert wire.hex() == "0000000c0100000c800e0100"


def test_truncated_and_overlong_messages_raise_only_ikev2_error() -> None:
    header = p.Header(b"I" * 8, bytes(8), 0, 34, 8, 0)
    wire = p.encode_message(header, [p.NoncePayload(b"n" * 32)])
    for cut in range(len(wire)):
        with pytest.raises(IKEv2Error):
            p.decode_message(wire[:cut])
    with pytest.raises(IKEv2Error):
        p.decode_message(wire + b"x")


# --- crypto -----------------------------------------------------------------------------------

def test_prf_plus_is_hkdf_expand_shaped() -> None:
    """prf+ (§2.13) and HKDF-Expand (RFC 5869) are the same construction: T(n) = prf(K,
    T(n-1)|S|n). An independent implementation must agree byte for byte."""
    key, seed = os.urandom(32), os.urandom(80)
    for name, algo in (("sha256", hashes.SHA256()), ("sha512", hashes.SHA512())):
        ours = c.prf_plus(name, key, seed, 300)
        theirs = HKDFExpand(algo, 300, seed).derive(key)
        assert ours == theirs


def test_ike_keys_have_rfc_sizes_and_order() -> None:
    suite = c.CipherSuite(c.ENCR_AES_CBC, 32, c.PRF_HMAC_SHA2_256, c.AUTH_HMAC_SHA2_256_128, 14)
    ni, nr, si, sr, shared = b"i" * 32, b"r" * 32, b"S" * 8, b"R" * 8, b"g" * 256
    keys = c.derive_ike_keys(suite, shared, nonce_i=ni, nonce_r=nr, spi_i=si, spi_r=sr)
    skeyseed = hmac.new(ni + nr, shared, "sha256").digest()
    stream = c.prf_plus("sha256", skeyseed, ni + nr + si + sr, 32 * 7)
    assert keys.sk_d == stream[:32] and keys.sk_ai == stream[32:64]
    assert keys.sk_pr == stream[-32:]
    gcm = c.CipherSuite(c.ENCR_AES_GCM_16, 32, c.PRF_HMAC_SHA2_384, None, 19)
    gkeys = c.derive_ike_keys(gcm, shared, nonce_i=ni, nonce_r=nr, spi_i=si, spi_r=sr)
    assert (len(gkeys.sk_d), len(gkeys.sk_ai), len(gkeys.sk_ei), len(gkeys.sk_pi)) == \
        (48, 0, 36, 48)


@pytest.mark.parametrize("group", c.SUPPORTED_GROUPS)
def test_every_group_agrees_on_the_shared_secret(group: int) -> None:
    a, b = c.KeyExchange(group), c.KeyExchange(group)
    assert len(a.public) == c.KE_LENGTHS[group]
    assert a.shared_secret(b.public) == b.shared_secret(a.public)
    with pytest.raises(IKEv2Error):
        a.shared_secret(b.public[:-1])
    with pytest.raises(IKEv2Error):
        a.shared_secret(bytes(len(b.public)))


@pytest.mark.parametrize("suite", [
    c.CipherSuite(c.ENCR_AES_GCM_16, 16, c.PRF_HMAC_SHA2_256, None, 19),
    c.CipherSuite(c.ENCR_AES_CBC, 32, c.PRF_HMAC_SHA2_512, c.AUTH_HMAC_SHA2_512_256, 14),
])
def test_encrypted_payload_seals_opens_and_detects_tampering(suite: c.CipherSuite) -> None:
    keys = c.derive_ike_keys(suite, b"x" * 32, nonce_i=b"a" * 16, nonce_r=b"b" * 16,
                             spi_i=b"c" * 8, spi_r=b"d" * 8)
    mirrored = c.IkeKeys(keys.sk_d, keys.sk_ar, keys.sk_ai, keys.sk_er, keys.sk_ei, keys.sk_pr,
                         keys.sk_pi)
    sender, receiver = c.SkCodec(suite, mirrored, os.urandom), c.SkCodec(suite, keys, os.urandom)
    prefix = b"P" * 32
    for size in (0, 1, 15, 16, 17, 100):
        body = sender.seal(prefix, b"m" * size)
        assert len(body) == sender.sealed_length(size)
        assert receiver.open(prefix, body) == b"m" * size
        with pytest.raises(IKEv2Error):
            receiver.open(prefix[:-1] + b"Q", body)
        with pytest.raises(IKEv2Error):
            receiver.open(prefix, body[:-1] + bytes([body[-1] ^ 1]))


def test_nat_detection_hash_is_sha1_of_spis_address_port() -> None:
    expect = hashlib.sha1(b"i" * 8 + bytes(8) + bytes([10, 0, 0, 1]) + b"\x01\xf4").digest()
    assert c.nat_detection_hash(b"i" * 8, bytes(8), bytes([10, 0, 0, 1]), 500) == expect


# --- proposals --------------------------------------------------------------------------------

def test_proposal_strings() -> None:
    gcm = parse_ike_proposal("aes256gcm16-prfsha384-ecp256-curve25519", 1)
    assert [(t.type, t.id, t.key_length) for t in gcm.transforms] == [
        (1, 20, 256), (2, 6, None), (4, 19, None), (4, 31, None)]
    cbc = parse_ike_proposal("aes128-sha512-modp2048", 2)
    assert cbc.transform(p.TransformType.PRF) == p.Transform(2, 7)
    assert cbc.transform(p.TransformType.INTEG) == p.Transform(3, 14)
    for bad in ("aes256gcm16-sha256-ecp256", "aes256-ecp256", "sha256-ecp256", "3des-sha1-modp4096",
                "aes256gcm16-aes256-sha256-ecp256"):
        with pytest.raises(IKEv2Error):
            parse_ike_proposal(bad, 1)
    esp = parse_esp_proposal("aes128gcm16", b"spi!")
    assert esp.protocol == p.ProtocolId.ESP and esp.spi == b"spi!"
    with pytest.raises(IKEv2Error):
        parse_esp_proposal("aes128-sha256", b"spi!")


# --- ESP --------------------------------------------------------------------------------------

def test_esp_round_trip_replay_and_demux() -> None:
    k1, k2 = os.urandom(36), os.urandom(36)
    out = EspSa(b"\x00\x00\x00\x01", k1, b"\x00\x00\x00\x02", k2, os.urandom)
    back = EspSa(b"\x00\x00\x00\x02", k2, b"\x00\x00\x00\x01", k1, os.urandom)
    inner = bytes(range(45))
    packet = out.seal(inner)
    assert classify_nat_t(packet)[0] == "esp"
    assert back.open(packet) == (4, inner)
    with pytest.raises(IKEv2Error):
        back.open(packet)  # replay
    with pytest.raises(IKEv2Error):
        back.open(out.seal(inner)[:-1])
    assert classify_nat_t(b"\xff") == ("keepalive", b"")
    assert classify_nat_t(bytes(4) + b"ike") == ("ike", b"ike")


# --- state machine ----------------------------------------------------------------------------

def _config(**kw: object) -> InitiatorConfig:
    base: dict[str, object] = dict(local_address=LOCAL, remote_address=("192.0.2.1", 500),
                                   proposals=parse_ike_proposals(DEFAULT_IKE_PROPOSALS),
                                   psk=b"secret", local_id="probe", remote_id="node.test")
    base.update(kw)
    return InitiatorConfig(**base)  # type: ignore[arg-type]


def _exchange(ini: Initiator, responder: FakeResponder, now: float = 0.0,
              drop: set[int] | None = None) -> list[object]:
    """Deliver datagrams both ways until quiet; ``drop`` lists send indexes to lose."""
    events: list[object] = []
    sent = 0
    for _ in range(50):
        out = ini.datagrams_to_send(now)
        if not out:
            timer = ini.get_timer()
            if timer is None:
                break
            now = timer
            ini.handle_timer(now)
            continue
        for data, (_, port) in out:
            sent += 1
            if drop and sent in drop:
                continue
            reply = responder.handle(data)
            if reply is not None:
                framed = bytes(4) + reply if port == 4500 else reply
                ini.receive_datagram(framed, ("", port), now)
        while (event := ini.next_event()) is not None:
            events.append(event)
            if isinstance(event, (AuthCompleted, Failed)) and ini.established:
                ini.close(now)
    while (event := ini.next_event()) is not None:
        events.append(event)
    return events


def test_auth_childless_then_delete() -> None:
    responder = FakeResponder()
    ini = Initiator(_config())
    ini.start(0.0)
    events = _exchange(ini, responder)
    kinds = [type(e) for e in events]
    assert InitRetried in kinds  # default proposals start with curve25519; it wants ecp256
    auth = next(e for e in events if isinstance(e, AuthCompleted))
    assert auth.childless and auth.responder_id == "node.test"
    assert events[-1] == Closed(acknowledged=True)
    assert responder.deleted == [p.ProtocolId.IKE]
    assert [h.message_id for h in responder.seen] == [0, 0, 1, 2]
    assert ini.state is State.CLOSED and not ini.half_open


def test_cookie_and_invalid_ke_retries_keep_spi_and_nonce() -> None:
    responder = FakeResponder(demand_cookie=True, proposal="aes128-sha256-modp2048")
    ini = Initiator(_config(proposals=parse_ike_proposals(("aes128-sha256-ecp384-modp2048",))))
    ini.start(0.0)
    events = _exchange(ini, responder)
    retries = [e for e in events if isinstance(e, InitRetried)]
    assert [(r.why, r.group) for r in retries] == [("cookie", 20), ("invalid-ke", 14)]
    init = next(e for e in events if isinstance(e, InitCompleted))
    assert init.cookie_rounds == 1 and init.ke_rounds == 1 and init.suite.group == 14
    assert any(isinstance(e, AuthCompleted) for e in events)
    assert {h.spi_i for h in responder.seen} == {ini.spi_i}


def test_nat_detected_floats_to_4500_with_marker() -> None:
    responder = FakeResponder(behind_nat=True)
    ini = Initiator(_config())
    ini.start(0.0)
    events = _exchange(ini, responder)
    init = next(e for e in events if isinstance(e, InitCompleted))
    assert init.nat_remote and not init.nat_local and init.floated
    assert ini.remote_port == 4500
    assert any(isinstance(e, AuthCompleted) for e in events)


def test_no_proposal_wrong_psk_and_forged_responder_auth() -> None:
    ini = Initiator(_config(proposals=parse_ike_proposals(("aes128-sha256-modp2048",))))
    ini.start(0.0)
    failed = [e for e in _exchange(ini, FakeResponder()) if isinstance(e, Failed)]
    assert failed[0].failure is Failure.NO_PROPOSAL_CHOSEN and not ini.half_open

    ini = Initiator(_config(psk=b"wrong"))
    ini.start(0.0)
    failed = [e for e in _exchange(ini, FakeResponder()) if isinstance(e, Failed)]
    assert failed[0].failure is Failure.AUTH_FAILED and not failed[0].established

    responder = FakeResponder(wrong_auth=True)
    ini = Initiator(_config())
    ini.start(0.0)
    events = _exchange(ini, responder)
    failed = [e for e in events if isinstance(e, Failed)]
    assert failed[0].failure is Failure.AUTH_FAILED and failed[0].established
    assert responder.deleted == [p.ProtocolId.IKE]  # still cleaned up on the responder


def test_child_sa_negotiated_or_refused_separately() -> None:
    responder = FakeResponder()
    ini = Initiator(_config(child=ChildRequest()))
    ini.start(0.0)
    auth = next(e for e in _exchange(ini, responder) if isinstance(e, AuthCompleted))
    assert auth.child is not None and not auth.childless
    assert auth.child.ts_r[0].start == ipaddress.IPv4Address("10.8.0.1")
    assert responder.deleted == [p.ProtocolId.ESP, p.ProtocolId.IKE]

    responder = FakeResponder(refuse_child=True, childless=False)
    ini = Initiator(_config())
    ini.start(0.0)
    auth = next(e for e in _exchange(ini, responder) if isinstance(e, AuthCompleted))
    assert auth.child is None and auth.child_error == "NO_PROPOSAL_CHOSEN"
    assert responder.deleted == [p.ProtocolId.IKE]


def test_a_config_request_gets_the_inner_address_and_resolvers() -> None:
    """CP CFG_REQUEST (INTERNAL_IP4_ADDRESS, INTERNAL_IP4_DNS) in IKE_AUTH, the reply's
    attributes in AuthCompleted; without request_config no CP goes out."""
    responder = FakeResponder(assign=("10.9.0.7", ("10.9.0.53", "10.9.0.54")))
    ini = Initiator(_config(child=ChildRequest(request_config=True)))
    ini.start(0.0)
    auth = next(e for e in _exchange(ini, responder) if isinstance(e, AuthCompleted))
    assert auth.internal_address == "10.9.0.7"
    assert auth.internal_dns == ("10.9.0.53", "10.9.0.54")
    ini = Initiator(_config(child=ChildRequest()))
    ini.start(0.0)
    auth = next(e for e in _exchange(ini, FakeResponder()) if isinstance(e, AuthCompleted))
    assert auth.internal_address is None and auth.internal_dns == ()


def test_config_payload_codec() -> None:
    """§3.15: type, 3 reserved octets, attributes (R bit clear, type, length, value); an
    attribute value that is not 4 octets is no IPv4 address; overruns raise IKEv2Error."""
    cp = p.ConfigPayload(p.ConfigType.REPLY, (
        (p.ConfigAttribute.INTERNAL_IP4_ADDRESS, bytes([10, 0, 0, 9])),
        (p.ConfigAttribute.INTERNAL_IP4_DNS, b"\x01\x02\x03"),
        (p.ConfigAttribute.INTERNAL_IP4_DNS, bytes([10, 0, 0, 53]))))
    assert cp.body()[:8] == bytes([2, 0, 0, 0, 0, 1, 0, 4])
    first, data = p.encode_chain([cp])
    (back,) = p.decode_chain(first, data)
    assert back == cp
    assert isinstance(back, p.ConfigPayload)
    assert back.ipv4(p.ConfigAttribute.INTERNAL_IP4_DNS) == ("10.0.0.53",)
    overrun = bytes([2, 0, 0, 0, 0, 1, 0, 8, 10, 0, 0, 9])  # 8 octets claimed, 4 there
    with pytest.raises(IKEv2Error, match="overruns the CP"):
        p.decode_chain(p.PayloadType.CP, bytes([0, 0, 0, len(overrun) + 4]) + overrun)


def test_retransmission_is_driven_by_now_then_times_out() -> None:
    ini = Initiator(_config(retransmit_initial=0.5, retransmit_factor=2.0, retransmit_tries=4))
    ini.start(10.0)
    first = ini.datagrams_to_send(10.0)
    assert len(first) == 1
    sends = [10.0]
    while (timer := ini.get_timer()) is not None:
        ini.handle_timer(timer - 0.01)
        assert ini.datagrams_to_send(timer) == []  # not due yet
        ini.handle_timer(timer)
        resent = ini.datagrams_to_send(timer)
        if resent:
            assert resent == first
            sends.append(timer)
    assert sends == [10.0, 10.5, 11.5, 13.5]
    event = ini.next_event()
    assert isinstance(event, Failed) and event.failure is Failure.TIMEOUT


def test_lost_auth_request_is_retransmitted() -> None:
    responder = FakeResponder(proposal="aes256gcm16-prfsha256-curve25519")
    ini = Initiator(_config())
    ini.start(0.0)
    events = _exchange(ini, responder, drop={2})
    assert any(isinstance(e, AuthCompleted) for e in events)
    assert events[-1] == Closed(acknowledged=True)


def test_garbage_and_foreign_datagrams_are_ignored() -> None:
    ini = Initiator(_config())
    ini.start(0.0)
    for junk in (b"", b"\x00" * 4, os.urandom(28), bytes(4) + os.urandom(40), os.urandom(300)):
        ini.receive_datagram(junk, IKE, 0.1)
        ini.receive_datagram(junk, NAT_T, 0.1)
    # told as bad datagrams (or, without the non-ESP marker on the NAT-T port, ESP), not acted on
    assert all(isinstance(e, BadDatagram | EspPacket) for e in iter(ini.next_event, None))
    assert ini.state is State.INIT_SENT


def test_ipv6_outer_addresses_work_for_nat_detection() -> None:
    responder = FakeResponder(address=("2001:db8::1", 500), peer=("2001:db8::7", 40000))
    ini = Initiator(_config(local_address=("2001:db8::7", 40000),
                            remote_address=("2001:db8::1", 500)))
    ini.start(0.0)
    events = _exchange(ini, responder)
    init = next(e for e in events if isinstance(e, InitCompleted))
    assert not init.floated and ini.remote_port == 500
    assert any(isinstance(e, AuthCompleted) for e in events)


def test_forged_auth_answer_is_dropped_and_the_real_one_still_counts() -> None:
    responder = FakeResponder()
    ini = Initiator(_config(proposals=parse_ike_proposals(("aes256gcm16-prfsha256-ecp256",))))
    ini.start(0.0)
    (request, _), = ini.datagrams_to_send(0.0)
    ini.receive_datagram(responder.handle(request) or b"", IKE, 0.0)
    assert isinstance(ini.next_event(), InitCompleted)
    (auth_request, (_, port)), = ini.datagrams_to_send(0.0)
    real = responder.handle(auth_request[4:] if port == 4500 else auth_request)
    assert real is not None
    forged = real[:-1] + bytes([real[-1] ^ 0xFF])  # same header, ICV broken
    ini.receive_datagram(bytes(4) + forged, NAT_T, 0.01)
    assert ini.state is State.AUTH_SENT and isinstance(ini.next_event(), BadDatagram)
    ini.receive_datagram(bytes(4) + real, NAT_T, 0.02)
    assert isinstance(ini.next_event(), AuthCompleted)
    ini.close(0.03)
    ini.close(0.03)  # twice: the Delete in flight is kept
    assert ini.state is State.DELETE_SENT and ini.get_timer() is not None
