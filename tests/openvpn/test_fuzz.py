"""Fuzz every parser: only OpenVPNError may escape; the session never raises on input."""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.protocols.openvpn import keymethod as km
from probes.protocols.openvpn.data import DataChannel, Framing, unframe
from probes.protocols.openvpn.packet import (
    ControlPacket,
    Opcode,
    OpenVPNError,
    TcpDeframer,
    decode_plain,
)
from probes.protocols.openvpn.session import ClientSession, SessionOptions
from probes.protocols.openvpn.wrap import (
    ReplayCounter,
    TlsAuth,
    TlsCrypt,
    parse_static_key,
    parse_tls_crypt_v2_client_key,
)

pytestmark = pytest.mark.openvpn

KEY = bytes(range(256))
SID = b"S" * 8


def _valid_packets() -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda op, acks, mid, payload: ControlPacket(
            op, SID, 0, tuple(acks), SID if acks else b"",
            None if op == Opcode.ACK_V1 else mid, b"" if op == Opcode.ACK_V1 else payload,
        ).encode(),
        st.sampled_from([o for o in Opcode if o not in (Opcode.DATA_V1, Opcode.DATA_V2)]),
        st.lists(st.integers(0, 2**32 - 1), max_size=8),
        st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1)),
        st.binary(max_size=64))


def _mutated() -> st.SearchStrategy[bytes]:
    """Valid packets with bytes flipped or cut: reaches deeper than pure noise."""
    return st.builds(lambda data, cut, flip: bytes(
        b ^ 0x5A if i == flip else b for i, b in enumerate(data[:cut])),
        _valid_packets(), st.integers(0, 120), st.integers(0, 120))


INPUTS = st.one_of(st.binary(max_size=200), _valid_packets(), _mutated())


def _only_own_error(func: Callable[[bytes], Any], data: bytes) -> None:
    with contextlib.suppress(OpenVPNError):
        func(data)


def _build_parsers() -> dict[str, Callable[[bytes], Any]]:
    channel = DataChannel(KEY, "AES-256-GCM", 1)
    return {
        "decode_plain": decode_plain,
        "tls_auth": TlsAuth(KEY, ReplayCounter(1), key_direction=1).unwrap,
        "tls_crypt": TlsCrypt(KEY, ReplayCounter(1)).unwrap,
        "deframe": lambda d: TcpDeframer().feed(d),
        "km2": km.decode_server_key_method_2,
        "push": lambda d: km.parse_push_reply("PUSH_REPLY," + d.decode("latin-1")).peer_id,
        "data": channel.decrypt,
        "unframe_lzo": lambda d: unframe(Framing.LZO, d),
        "unframe_swap": lambda d: unframe(Framing.SWAP, d),
        "unframe_v2": lambda d: unframe(Framing.V2, d),
        "static_key": lambda d: parse_static_key(
            "-----BEGIN OpenVPN Static key V1-----" + d.decode("latin-1")
            + "-----END OpenVPN Static key V1-----"),
        "v2_key": lambda d: parse_tls_crypt_v2_client_key(
            "-----BEGIN OpenVPN tls-crypt-v2 client key-----" + d.decode("latin-1")
            + "-----END OpenVPN tls-crypt-v2 client key-----"),
    }


_PARSERS = _build_parsers()  # built once: key setup is not what is being fuzzed


def _parsers() -> dict[str, Callable[[bytes], Any]]:
    return _PARSERS


def _insecure_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


_CONTEXT = _insecure_context()


def _session_never_raises(chunks: list[bytes]) -> None:
    session = ClientSession(options=SessionOptions(ssl_context=_CONTEXT))
    session.session_id = SID  # lets fuzzed ACKs name our session
    session.start(0.0)
    session.datagrams_to_send(0.0)
    for i, data in enumerate(chunks):
        session.receive_datagram(data, ("", 0), float(i))
        session.handle_timer(float(i))
        session.datagrams_to_send(float(i))
    while session.next_event() is not None:
        pass


@pytest.mark.parametrize("name", sorted(_parsers()))
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=INPUTS)
def test_parsers_raise_only_openvpn_error(name: str, data: bytes) -> None:
    _only_own_error(_parsers()[name], data)


@settings(max_examples=500, deadline=None)
@given(chunks=st.lists(INPUTS, max_size=6))
def test_session_never_raises(chunks: list[bytes]) -> None:
    _session_never_raises(chunks)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@settings(max_examples=100_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=INPUTS)
def test_parsers_raise_only_openvpn_error_long(data: bytes) -> None:
    # every input goes through every parser: 100k examples each, one generation cost
    for parser in _parsers().values():
        _only_own_error(parser, data)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@settings(max_examples=100_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(chunks=st.lists(INPUTS, max_size=6))
def test_session_never_raises_long(chunks: list[bytes]) -> None:
    _session_never_raises(chunks)


def test_fuzz_inputs_reach_the_valid_path() -> None:
    # guard against a fuzz setup that only ever exercises the error path
    wire = ControlPacket(Opcode.CONTROL_V1, SID, 0, (1,), SID, 2, os.urandom(5)).encode()
    assert decode_plain(wire).message_id == 2
