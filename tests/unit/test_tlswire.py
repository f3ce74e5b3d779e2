"""The TLS wire reader and ClientHello builder: real shapes parse, anything else is a
TlsWireError and never another exception (hypothesis)."""

from __future__ import annotations

import os
import ssl
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.protocols import tlswire as tw


def _server_hello(version: int, suite: int, group: int | None, *, retry: bool = False,
                  share_len: int = 32) -> bytes:
    ext = b""
    if version == tw.TLS13:
        ext += struct.pack("!HHH", tw.EXT_SUPPORTED_VERSIONS, 2, tw.TLS13)
        if group is not None:
            share = b"" if retry else struct.pack("!H", share_len) + bytes(share_len)
            ext += struct.pack("!HH", tw.EXT_KEY_SHARE, 2 + len(share)) + struct.pack(
                "!H", group) + share
    random = tw.HRR_RANDOM if retry else os.urandom(32)
    body = (struct.pack("!H", min(version, tw.TLS12)) + random + b"\x00"
            + struct.pack("!H", suite) + b"\x00" + struct.pack("!H", len(ext)) + ext)
    message = bytes([tw.HandshakeType.SERVER_HELLO]) + len(body).to_bytes(3, "big") + body
    return tw.records(tw.ContentType.HANDSHAKE, tw.TLS12, message)


def test_tls13_server_hello_names_its_group() -> None:
    flight = tw.ServerFlight()
    data = _server_hello(tw.TLS13, 0x1302, tw.X25519)
    for byte in range(len(data)):  # one byte at a time: records arrive in pieces
        flight.feed(data[byte:byte + 1])
    assert flight.done and flight.hello is not None
    assert (flight.hello.version_name, tw.suite_name(flight.hello.suite), flight.group_label) == (
        "TLSv1.3", "TLS_AES_256_GCM_SHA384", "x25519")


def test_tls12_rsa_key_transport_and_dhe_prime_size() -> None:
    flight = tw.ServerFlight()
    flight.feed(_server_hello(tw.TLS12, 0x009C, None))
    assert flight.group_label == "rsa" and not flight.done
    dhe = tw.ServerFlight()
    dhe.feed(_server_hello(tw.TLS12, 0x009E, None))
    prime = (1 << 2047) + 1
    ske = struct.pack("!H", 256) + prime.to_bytes(256, "big") + b"\x00\x01\x02"
    dhe.feed(tw.records(tw.ContentType.HANDSHAKE, tw.TLS12, bytes(
        [tw.HandshakeType.SERVER_KEY_EXCHANGE]) + len(ske).to_bytes(3, "big") + ske))
    assert dhe.group_label == "dhe2048"


def test_alert_ends_the_flight() -> None:
    flight = tw.ServerFlight()
    flight.feed(tw.alert(tw.ALERT_HANDSHAKE_FAILURE))
    assert flight.done and flight.alert is not None and flight.alert.name == "handshake_failure"


def test_client_hello_is_what_openssl_parses() -> None:
    """A real TLS library reads our ClientHello: an OpenSSL server answers a TLS 1.2 offer of
    one suite with a ServerHello choosing exactly it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*_self_signed())
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = ctx.wrap_bio(incoming, outgoing, server_side=True)
    hello = tw.client_hello(tw.HelloOffer(versions=(tw.TLS12,), suites=(0xC02B,),
                                          groups=(23,)), os.urandom(32))
    incoming.write(hello)
    with pytest.raises(ssl.SSLWantReadError):
        server.do_handshake()
    flight = tw.ServerFlight()
    flight.feed(outgoing.read())
    assert flight.hello is not None and flight.hello.suite == 0xC02B
    assert flight.group_label == "secp256r1" and flight.certificates


def _self_signed() -> tuple[str, str]:
    import datetime as dt
    import tempfile

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tlswire")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    folder = tempfile.mkdtemp()
    cert_path, key_path = f"{folder}/c.pem", f"{folder}/k.pem"
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


_SAMPLES = [_server_hello(tw.TLS13, 0x1301, tw.X25519MLKEM768),
            _server_hello(tw.TLS13, 0x1301, tw.X25519, retry=True),
            _server_hello(tw.TLS12, 0xC02F, None), tw.alert(70)]


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SAMPLES)))
    for _ in range(draw(st.integers(1, 5))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(0, len(data)))])


@given(st.one_of(_mutated(), st.binary(max_size=300)), st.integers(1, 64))
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_flight_reader_raises_only_tlswireerror(data: bytes, chunk: int) -> None:
    flight = tw.ServerFlight()
    try:
        for pos in range(0, len(data), chunk):
            flight.feed(data[pos:pos + chunk])
    except tw.TlsWireError:
        return
    label = flight.group_label
    assert label == "" or label in tw.GROUP_NAMES.values() or label in ("rsa", "unknown") \
        or label.startswith("dhe")
