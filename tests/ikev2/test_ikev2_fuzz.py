"""Fuzz every IKEv2 parser: only IKEv2Error may escape, and the initiator never raises at all.

Default runs use a few thousand examples in total; ``-m slow`` runs >=100k per parser.
"""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.protocols.ikev2 import IKEv2Error
from probes.protocols.ikev2 import crypto as c
from probes.protocols.ikev2 import payloads as p
from probes.protocols.ikev2.esp import EspSa, classify_nat_t
from probes.protocols.ikev2.initiator import Initiator, InitiatorConfig, State
from probes.protocols.ikev2.proposals import (
    DEFAULT_IKE_PROPOSALS,
    chosen_suite,
    parse_ike_proposal,
    parse_ike_proposals,
)
from tests.ikev2.fake_responder import FakeResponder

pytestmark = pytest.mark.ikev2

FAST = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=100_000, deadline=None, suppress_health_check=list(HealthCheck))

OFFERED = parse_ike_proposals(DEFAULT_IKE_PROPOSALS)


def _sample_messages() -> list[bytes]:
    """Real shapes to mutate: a full SA_INIT request and the fake responder's answers."""
    config = InitiatorConfig(local_address=("198.51.100.7", 40000),
                             remote_address=("192.0.2.1", 500), proposals=OFFERED, psk=b"k",
                             remote_id="node.test")
    ini = Initiator(config)
    ini.start(0.0)
    request = ini.datagrams_to_send(0.0)[0][0]
    responder = FakeResponder(proposal="aes256gcm16-prfsha256-curve25519")
    answer = responder.handle(request)
    assert answer is not None
    ini.receive_datagram(answer, ("192.0.2.1", 500), 0.0)
    auth_request = ini.datagrams_to_send(0.0)[0][0]
    auth_answer = responder.handle(auth_request)
    assert auth_answer is not None
    return [request, answer, auth_request, auth_answer]


SAMPLES = _sample_messages()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 6))):
        choice = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(data) - 1)) if data else 0
        if choice == 0 and data:
            data[pos] = draw(st.integers(0, 255))
        elif choice == 1:
            del data[pos:pos + draw(st.integers(1, 16))]
        elif choice == 2:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            data = data[:pos]
    if len(data) >= p.HEADER_LEN and draw(st.booleans()):
        data[24:28] = len(data).to_bytes(4, "big")  # keep the header length honest, go deeper
    return bytes(data)


inputs = st.one_of(st.binary(max_size=600), mutated())


def _decode_everything(data: bytes) -> None:
    try:
        _, payloads = p.decode_message(data)
    except IKEv2Error:
        return
    for payload in payloads:
        if isinstance(payload, p.SAPayload):
            for proposal in payload.proposals:
                with contextlib.suppress(IKEv2Error):
                    chosen_suite(proposal, OFFERED)


def _feed_initiator(data: bytes) -> None:
    config = InitiatorConfig(local_address=("198.51.100.7", 40000),
                             remote_address=("192.0.2.1", 500), proposals=OFFERED, psk=b"k")
    ini = Initiator(config)
    ini.start(0.0)
    # make the fuzz input belong to this initiator so it gets past the SPI filter
    if len(data) >= 8:
        data = ini.spi_i + data[8:]
    ini.receive_datagram(data, ("192.0.2.1", 500), 0.1)
    ini.receive_datagram(bytes(4) + data, ("192.0.2.1", 4500), 0.1)
    ini.handle_timer(100.0)
    while ini.next_event() is not None:
        pass
    assert ini.state in set(State)


_ESP = EspSa(b"\x00\x00\x00\x07", os.urandom(36), b"\x00\x00\x00\x09", os.urandom(36), os.urandom)


def _esp_and_demux(data: bytes) -> None:
    with contextlib.suppress(IKEv2Error):
        classify_nat_t(data)
    with contextlib.suppress(IKEv2Error):
        _ESP.open(b"\x00\x00\x00\x09" + data[4:])


_SUITE = c.CipherSuite(c.ENCR_AES_CBC, 16, c.PRF_HMAC_SHA2_256, c.AUTH_HMAC_SHA2_256_128, 19)
_SK = c.SkCodec(_SUITE, c.derive_ike_keys(_SUITE, b"s", nonce_i=b"i", nonce_r=b"r",
                                          spi_i=b"a" * 8, spi_r=b"b" * 8), os.urandom)


_KES = {group: c.KeyExchange(group) for group in c.SUPPORTED_GROUPS}  # keys reused: only the
# peer value is under test, and key generation would dominate the run


def _sk_open_and_ke(data: bytes) -> None:
    with contextlib.suppress(IKEv2Error):
        _SK.open(b"prefix", data)
    for group, ke in _KES.items():
        size = c.KE_LENGTHS[group]
        with contextlib.suppress(IKEv2Error):
            ke.shared_secret(data[:size].ljust(size, data[:1] or b"\x01"))


def _proposal_strings(text: str) -> None:
    with contextlib.suppress(IKEv2Error):
        parse_ike_proposal(text, 1)


def _config_payload(data: bytes) -> None:
    """A CP payload's body (the attributes a responder assigns) straight from the input."""
    body = data[:0xFFFB]
    try:
        (cp,) = p.decode_chain(p.PayloadType.CP, bytes(2) + (len(body) + 4).to_bytes(2, "big")
                               + body)
    except IKEv2Error:
        return
    assert isinstance(cp, p.ConfigPayload)
    for attr in p.ConfigAttribute:
        for address in cp.ipv4(attr):
            assert address.count(".") == 3


TARGETS = [_decode_everything, _feed_initiator, _esp_and_demux, _sk_open_and_ke,
           _config_payload]


@pytest.mark.parametrize("target", TARGETS, ids=lambda f: f.__name__)
def test_parsers_raise_only_their_own_error(target: object) -> None:
    assert callable(target)

    def run(data: bytes) -> None:  # a fresh function: settings attach to the function object
        target(data)

    given(inputs)(FAST(run))()


def test_proposal_parser_raises_only_its_own_error() -> None:
    tokens = st.sampled_from(["aes256", "aes128gcm16", "sha256", "prfsha384", "ecp256", "x25519",
                              "modp2048", "bogus", "", "AES256"])
    given(st.lists(tokens, max_size=6).map("-".join))(FAST(_proposal_strings))()


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 100k examples; the project default of 300 s is for normal tests
@pytest.mark.parametrize("target", TARGETS, ids=lambda f: f.__name__)
def test_parsers_fuzz_long(target: object) -> None:
    assert callable(target)

    def run(data: bytes) -> None:  # a fresh function: settings attach to the function object
        target(data)

    given(inputs)(SLOW(run))()
