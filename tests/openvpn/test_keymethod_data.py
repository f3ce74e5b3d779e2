"""Key-method 2 messages, PUSH_REPLY parsing, the OpenVPN PRF and the DATA_V2 channel."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import pytest

from probes.protocols.openvpn import keymethod as km
from probes.protocols.openvpn.data import PING_STRING, DataChannel, Framing, frame, unframe
from probes.protocols.openvpn.packet import OpenVPNError

pytestmark = pytest.mark.openvpn


def test_client_key_method_2_layout() -> None:
    source = km.ClientKeySource(b"P" * 48, b"R" * 32, b"S" * 32)
    wire = km.encode_client_key_method_2(source, "V4,x", "IV_VER=1\n", "alice", "pw")
    assert wire[:5] == b"\x00\x00\x00\x00\x02"
    assert wire[5:117] == b"P" * 48 + b"R" * 32 + b"S" * 32
    assert wire[117:] == (b"\x00\x05V4,x\x00" + b"\x00\x06alice\x00" + b"\x00\x03pw\x00"
                          + b"\x00\x0aIV_VER=1\n\x00")
    anonymous = km.encode_client_key_method_2(source, "V4", "")
    assert anonymous.endswith(b"\x00\x03V4\x00" + b"\x00\x00" * 3)


def test_server_key_method_2_decodes() -> None:
    wire = (struct.pack("!IB", 0, 2) + b"a" * 32 + b"b" * 32 + km.encode_string("V4,tls-server")
            + km.encode_string(None) + km.encode_string(None) + km.encode_string("IV_X=1"))
    msg = km.decode_server_key_method_2(wire)
    assert (msg.random1, msg.random2, msg.options, msg.peer_info) == (
        b"a" * 32, b"b" * 32, "V4,tls-server", "IV_X=1")
    for bad in (wire[:40], b"\x00\x00\x00\x01\x02" + wire[5:], wire[:72]):
        with pytest.raises(OpenVPNError):
            km.decode_server_key_method_2(bad)


def test_push_reply_parses_subnet_and_net30() -> None:
    reply = km.parse_push_reply(
        "PUSH_REPLY,route-gateway 10.8.0.1,topology subnet,ping 2,ifconfig 10.8.0.2 "
        "255.255.255.0,peer-id 7,cipher aes-256-gcm,key-derivation tls-ekm,push-continuation 1")
    assert reply.ifconfig == ("10.8.0.2", "255.255.255.0")
    assert reply.server_tunnel_address == "10.8.0.1"
    assert (reply.peer_id, reply.cipher, reply.uses_tls_ekm, reply.continues) == (
        7, "AES-256-GCM", True, False)
    net30 = km.parse_push_reply("PUSH_REPLY,ifconfig 10.8.0.6 10.8.0.5,push-continuation 2")
    assert net30.server_tunnel_address == "10.8.0.5" and net30.continues
    assert net30.peer_id is None and net30.topology == "net30"
    merged = net30.merged(km.parse_push_reply("PUSH_REPLY,peer-id 1"))
    assert merged.peer_id == 1 and merged.ifconfig == ("10.8.0.6", "10.8.0.5")
    with pytest.raises(OpenVPNError):
        km.parse_push_reply("AUTH_FAILED")
    with pytest.raises(OpenVPNError):
        _ = km.parse_push_reply("PUSH_REPLY,peer-id x").peer_id


def test_control_text_stops_at_nul() -> None:
    assert km.control_text(b"AUTH_FAILED,bad\x00junk") == "AUTH_FAILED,bad"


def test_tls1_prf_matches_rfc2246_definition() -> None:
    # independent straight-line P_hash for one output block, against our implementation
    secret, seed = bytes(range(48)), b"label" + bytes(64)
    s1, s2 = secret[:24], secret[24:]

    def p_hash(name: str, key: bytes, n: int) -> bytes:
        a, out = seed, b""
        while len(out) < n:
            a = hmac.new(key, a, name).digest()
            out += hmac.new(key, a + seed, name).digest()
        return out[:n]

    want = bytes(x ^ y for x, y in zip(p_hash("md5", s1, 100), p_hash("sha1", s2, 100),
                                       strict=True))
    assert km.tls1_prf(secret, seed, 100) == want
    assert hashlib.sha256(km.tls1_prf(b"k" * 5, b"s", 7)).digest() != b""  # odd secret length


def test_prf_key2_depends_on_every_input() -> None:
    client = km.ClientKeySource(b"p" * 48, b"r" * 32, b"s" * 32)
    server = km.ServerKeyMethod2(b"t" * 32, b"u" * 32, "")
    base = km.openvpn_prf_key2(client, server, b"c" * 8, b"d" * 8)
    assert len(base) == 256
    assert base != km.openvpn_prf_key2(client, server, b"c" * 8, b"e" * 8)
    assert base != km.openvpn_prf_key2(km.ClientKeySource(b"q" * 48, b"r" * 32, b"s" * 32),
                                       server, b"c" * 8, b"d" * 8)


@pytest.mark.parametrize("cipher", ["AES-256-GCM", "CHACHA20-POLY1305"])
@pytest.mark.parametrize("peer_id", [5, None])
def test_data_channel_round_trip(cipher: str, peer_id: int | None) -> None:
    key2 = os.urandom(256)
    client = DataChannel(key2, cipher, peer_id)
    server = DataChannel(key2, cipher, peer_id, server=True)
    wire = client.encrypt(b"ip packet")
    if peer_id is not None:
        assert wire[:4] == struct.pack("!I", (9 << 3 << 24) | peer_id)
        assert wire[4:8] == struct.pack("!I", 1)
    assert server.decrypt(wire) == b"ip packet"
    assert client.decrypt(server.encrypt(PING_STRING)) == PING_STRING
    with pytest.raises(OpenVPNError):
        client.decrypt(wire)  # own direction
    with pytest.raises(OpenVPNError):
        server.decrypt(wire[:-1] + bytes([wire[-1] ^ 1]))


def test_data_channel_layout_is_tag_before_ciphertext() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key2 = bytes(range(256))
    wire = DataChannel(key2, "AES-256-GCM", 1).encrypt(b"abc")
    header, pid, tag, ct = wire[:4], wire[4:8], wire[8:24], wire[24:]
    assert AESGCM(key2[0:32]).decrypt(pid + key2[64:72], ct + tag, header + pid) == b"abc"


def test_data_channel_refuses_bad_setup_and_packets() -> None:
    with pytest.raises(OpenVPNError):
        DataChannel(bytes(256), "BF-CBC", 1)
    with pytest.raises(OpenVPNError):
        DataChannel(bytes(10), "AES-256-GCM", 1)
    channel = DataChannel(bytes(256), "AES-256-GCM", 1)
    for bad in (b"", b"\x48\x00", b"\x20" + bytes(30)):
        with pytest.raises(OpenVPNError):
            channel.decrypt(bad)


@pytest.mark.parametrize("framing", list(Framing))
@pytest.mark.parametrize("payload", [b"E\x00\x00\x14rest-of-ipv4", b"P-starts-0x50", b"x", b""])
def test_compression_framing_round_trip(framing: Framing, payload: bytes) -> None:
    assert unframe(framing, frame(framing, payload)) == payload


def test_compression_framing_layouts() -> None:
    ip = b"E\x00abc"
    assert frame(Framing.NONE, ip) == ip
    assert frame(Framing.LZO, ip) == b"\xfa" + ip
    assert frame(Framing.SWAP, ip) == b"\xfb\x00abcE"  # first byte moved to the end
    assert frame(Framing.V2, ip) == ip  # IPv4 needs no escape
    assert frame(Framing.V2, b"Pxy") == b"P\x00Pxy"
    assert unframe(Framing.SWAP, b"\xfa" + ip) == ip  # a plain stub byte is accepted too
    for framing, compressed in ((Framing.LZO, b"\x66data"), (Framing.SWAP, b"\x69data"),
                                (Framing.V2, b"P\x01data")):
        with pytest.raises(OpenVPNError):
            unframe(framing, compressed)


def test_pushed_compression_is_recognised() -> None:
    cases = {"comp-lzo no": "comp-lzo", "compress": "compress", "compress lz4": "compress",
             "compress lzo": "comp-lzo", "compress stub-v2": "compress-v2",
             "compress lz4-v2": "compress-v2", "ping 10": None}
    for option, want in cases.items():
        assert km.parse_push_reply(f"PUSH_REPLY,{option}").compression == want


def test_framed_data_channel_round_trip() -> None:
    key2 = os.urandom(256)
    client = DataChannel(key2, "AES-256-GCM", 1, framing=Framing.SWAP)
    server = DataChannel(key2, "AES-256-GCM", 1, server=True, framing=Framing.SWAP)
    assert server.decrypt(client.encrypt(b"E\x00packet")) == b"E\x00packet"
    assert DataChannel(key2, "AES-256-GCM", 1, server=True).decrypt(
        client.encrypt(b"E\x00packet")) == b"\xfb\x00packetE"
