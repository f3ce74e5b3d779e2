"""Packet codec, TCP framing, key files and control-channel wrapping (layouts from protocols.md)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from probes.protocols.openvpn.packet import (
    ControlPacket,
    Opcode,
    OpenVPNError,
    TcpDeframer,
    decode_plain,
    frame_tcp,
)
from probes.protocols.openvpn.wrap import (
    EARLY_NEG_START,
    NoWrap,
    ReplayCounter,
    TlsAuth,
    TlsCrypt,
    TlsCryptV2,
    parse_static_key,
    parse_tls_crypt_v2_client_key,
)
from tests.openvpn.conftest import openvpn_genkey
from tests.openvpn.pki import static_key_text

pytestmark = pytest.mark.openvpn

SID = bytes.fromhex("0102030405060708")
SSID = bytes.fromhex("a1a2a3a4a5a6a7a8")
KEY = bytes(range(256))


def test_client_reset_is_14_bytes_with_known_layout() -> None:
    wire = ControlPacket(Opcode.CONTROL_HARD_RESET_CLIENT_V2, SID, message_id=0).encode()
    assert wire == bytes.fromhex("38") + SID + bytes.fromhex("00 00000000")
    assert len(wire) == 14


def test_server_reset_is_26_bytes_with_known_layout() -> None:
    wire = bytes.fromhex("40") + SSID + bytes.fromhex("01 00000000") + SID + bytes(4)
    packet = decode_plain(wire)
    assert len(wire) == 26
    assert packet.opcode == Opcode.CONTROL_HARD_RESET_SERVER_V2
    assert (packet.session_id, packet.acks, packet.remote_session_id) == (SSID, (0,), SID)
    assert packet.message_id == 0 and packet.payload == b""


def test_control_and_ack_round_trip() -> None:
    control = ControlPacket(Opcode.CONTROL_V1, SID, 0, (3, 4), SSID, 9, b"tls bytes")
    assert decode_plain(control.encode()) == control
    ack = ControlPacket(Opcode.ACK_V1, SID, 0, (1,), SSID, None)
    wire = ack.encode()
    assert wire == bytes([0x28]) + SID + b"\x01" + struct.pack("!I", 1) + SSID
    assert decode_plain(wire) == ack


@pytest.mark.parametrize("wire", [
    b"", b"\x38" + SID[:4], bytes([0x38]) + SID, bytes([0xF8]) + SID + bytes(5),
    bytes([0x20]) + SID + b"\x09" + bytes(60),  # nine acks
    bytes([0x20]) + SID + b"\x01\x00\x00",  # truncated ack array
    bytes([0x28]) + SID + b"\x00" + b"junk",  # ACK_V1 with trailing payload
    bytes([0x48]) + bytes(20),  # a data packet is not a control packet
])
def test_malformed_control_packets_raise_openvpn_error(wire: bytes) -> None:
    with pytest.raises(OpenVPNError):
        decode_plain(wire)


def test_encode_refuses_inconsistent_packets() -> None:
    with pytest.raises(OpenVPNError):
        ControlPacket(Opcode.ACK_V1, SID, 0, (1,), SSID, 5).encode()
    with pytest.raises(OpenVPNError):
        ControlPacket(Opcode.CONTROL_V1, SID, 0, (1,), b"", 5).encode()


def test_tcp_framing_reassembles_across_chunks() -> None:
    packets = [b"a" * 5, b"b" * 300, b"c"]
    stream = b"".join(frame_tcp(p) for p in packets)
    deframer = TcpDeframer()
    out: list[bytes] = []
    for i in range(len(stream)):
        out += deframer.feed(stream[i:i + 1])
    assert out == packets and deframer.pending == 0
    assert frame_tcp(b"xyz") == b"\x00\x03xyz"
    with pytest.raises(OpenVPNError):
        TcpDeframer().feed(b"\x00\x00")


def test_static_key_file_parses() -> None:
    assert parse_static_key(static_key_text(KEY)) == KEY
    with pytest.raises(OpenVPNError):
        parse_static_key(static_key_text(KEY[:128]))
    with pytest.raises(OpenVPNError):
        parse_static_key("nothing here")


def test_real_openvpn_static_key_parses(tmp_path: Path) -> None:
    assert len(parse_static_key(openvpn_genkey("tls-crypt", tmp_path / "tc.key"))) == 256


def _pair(kind: str, **kw: object) -> tuple[object, object]:
    client = {"auth": TlsAuth, "crypt": TlsCrypt}[kind](KEY, ReplayCounter(1000), **kw)  # type: ignore[arg-type]
    server = {"auth": TlsAuth, "crypt": TlsCrypt}[kind](KEY, ReplayCounter(2000), server=True, **kw)  # type: ignore[arg-type]
    return client, server


@pytest.mark.parametrize(("kind", "kw"), [
    ("auth", {}), ("auth", {"key_direction": 1}), ("auth", {"key_direction": 0}),
    ("auth", {"digest": "SHA256", "key_direction": 1}), ("auth", {"digest": "sha512"}),
    ("crypt", {}),
])
def test_wrap_unwrap_round_trip_both_directions(kind: str, kw: dict[str, object]) -> None:
    client, server = _pair(kind, **kw)
    packet = ControlPacket(Opcode.CONTROL_V1, SID, 0, (0,), SSID, 1, b"hello tls")
    wire = client.wrap(packet.header(), packet.body())  # type: ignore[attr-defined]
    assert server.unwrap(wire) == (Opcode.CONTROL_V1, 0, SID, packet.body())  # type: ignore[attr-defined]
    back = server.wrap(packet.header(), packet.body())  # type: ignore[attr-defined]
    assert client.unwrap(back)[3] == packet.body()  # type: ignore[attr-defined]
    if kind == "crypt" or kw.get("key_direction") is not None:
        with pytest.raises(OpenVPNError):  # directional keys: never valid in its own direction
            client.unwrap(wire)  # type: ignore[attr-defined]
    tampered = wire[:-1] + bytes([wire[-1] ^ 1])
    with pytest.raises(OpenVPNError):
        server.unwrap(tampered)  # type: ignore[attr-defined]


def test_tls_auth_layout_matches_swap_hmac() -> None:
    wrapper = TlsAuth(KEY, ReplayCounter(0x11223344), key_direction=1)
    packet = ControlPacket(Opcode.CONTROL_HARD_RESET_CLIENT_V2, SID, message_id=0)
    wire = wrapper.wrap(packet.header(), packet.body())
    replay = struct.pack("!II", 1, 0x11223344)
    mac = hmac.new(KEY[192:212], replay + packet.header() + packet.body(), "sha1").digest()
    assert wire == packet.header() + mac + replay + packet.body()


def test_tls_crypt_layout_matches_tls_crypt_c() -> None:
    wrapper = TlsCrypt(KEY, ReplayCounter(77))
    packet = ControlPacket(Opcode.CONTROL_HARD_RESET_CLIENT_V2, SID, message_id=0)
    wire = wrapper.wrap(packet.header(), packet.body())
    clear = packet.header() + struct.pack("!II", 1, 77)
    tag = hmac.new(KEY[192:224], clear + packet.body(), hashlib.sha256).digest()
    enc = Cipher(algorithms.AES(KEY[128:160]), modes.CTR(tag[:16])).encryptor()
    assert wire == clear + tag + enc.update(packet.body()) + enc.finalize()
    assert len(wire) == 14 + 40


def test_replay_id_counts_from_one_with_fixed_time() -> None:
    counter = ReplayCounter(5)
    assert [counter.take() for _ in range(2)] == [struct.pack("!II", 1, 5),
                                                   struct.pack("!II", 2, 5)]


def _wrap_client_key(server_key: bytes, kc: bytes, metadata: bytes) -> bytes:
    """WKc per doc/tls-crypt-v2.txt, to check our reading of real keys."""
    ke, ka = server_key[0:32], server_key[64:96]
    length = struct.pack("!H", 32 + len(kc) + len(metadata) + 2)
    tag = hmac.new(ka, length + kc + metadata, hashlib.sha256).digest()
    enc = Cipher(algorithms.AES(ke), modes.CTR(tag[:16])).encryptor()
    return tag + enc.update(kc + metadata) + enc.finalize() + length


def test_real_tls_crypt_v2_client_key_unwraps_with_server_key(tmp_path: Path) -> None:
    server_text = openvpn_genkey("tls-crypt-v2-server", tmp_path / "s.key")
    client_text = openvpn_genkey("tls-crypt-v2-client", tmp_path / "c.key",
                                 pre=("--tls-crypt-v2", str(tmp_path / "s.key")))
    server_key = base64.b64decode("".join(server_text.strip().splitlines()[1:-1]))
    kc, wkc = parse_tls_crypt_v2_client_key(client_text)
    tag, length = wkc[:32], wkc[-2:]
    dec = Cipher(algorithms.AES(server_key[0:32]), modes.CTR(tag[:16])).decryptor()
    plain = dec.update(wkc[32:-2]) + dec.finalize()
    assert plain[:256] == kc
    assert hmac.new(server_key[64:96], length + plain, hashlib.sha256).digest() == tag
    assert _wrap_client_key(server_key, kc, plain[256:]) == wkc


def test_tls_crypt_v2_appends_wkc_to_v3_reset_and_wkc_packets_only() -> None:
    kc, server_key = os.urandom(256), os.urandom(128)
    wkc = _wrap_client_key(server_key, kc, b"\x00meta")
    pem = ("-----BEGIN OpenVPN tls-crypt-v2 client key-----\n"
           + base64.b64encode(kc + wkc).decode()
           + "\n-----END OpenVPN tls-crypt-v2 client key-----\n")
    assert parse_tls_crypt_v2_client_key(pem) == (kc, wkc)
    wrapper = TlsCryptV2(kc, wkc, ReplayCounter(9))
    server = TlsCrypt(kc, ReplayCounter(1), server=True)
    reset = ControlPacket(Opcode.CONTROL_HARD_RESET_CLIENT_V3, SID, message_id=0)
    wire = wrapper.wrap(reset.header(), reset.body())
    assert wire.endswith(wkc)
    # early negotiation: the reset's replay id is in the EARLY_NEG range
    (replay_id,) = struct.unpack_from("!I", wire, 9)
    assert replay_id & 0xFF000000 == EARLY_NEG_START
    assert server.unwrap(wire[:-len(wkc)])[3] == reset.body()
    for opcode, carries in ((Opcode.CONTROL_WKC_V1, True), (Opcode.CONTROL_V1, False),
                            (Opcode.ACK_V1, False)):
        mid = None if opcode == Opcode.ACK_V1 else 1
        packet = ControlPacket(opcode, SID, 0, (0,), SSID, mid, b"" if mid is None else b"x")
        assert wrapper.wrap(packet.header(), packet.body()).endswith(wkc) is carries


@pytest.mark.parametrize("text", [
    "junk",
    "-----BEGIN OpenVPN tls-crypt-v2 client key-----\n!!!\n"
    "-----END OpenVPN tls-crypt-v2 client key-----",
    "-----BEGIN OpenVPN tls-crypt-v2 client key-----\n" + base64.b64encode(bytes(300)).decode()
    + "\n-----END OpenVPN tls-crypt-v2 client key-----",
])
def test_bad_tls_crypt_v2_client_keys_raise(text: str) -> None:
    with pytest.raises(OpenVPNError):
        parse_tls_crypt_v2_client_key(text)


def test_no_wrap_is_identity_and_bad_options_raise() -> None:
    packet = ControlPacket(Opcode.CONTROL_V1, SID, 0, (), b"", 2, b"p")
    assert NoWrap().wrap(packet.header(), packet.body()) == packet.encode()
    with pytest.raises(OpenVPNError):
        TlsAuth(KEY, ReplayCounter(1), digest="WHIRLPOOL")
    with pytest.raises(OpenVPNError):
        TlsAuth(KEY, ReplayCounter(1), key_direction=2)
    with pytest.raises(OpenVPNError):
        TlsCrypt(KEY[:10], ReplayCounter(1))
