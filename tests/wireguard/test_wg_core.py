"""WireGuard core: constants, primitives, handshake, cookies, transport, timestamps."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl import bindings as sodium
from scapy.layers.inet import ICMP, IP

from probes.protocols import wireguard as wg
from tests.wireguard.wg_responder import Responder

pytestmark = pytest.mark.wireguard

WALL = 1_700_000_000 * 10**9


PEER = ("192.0.2.1", 51820)


def out(conn: wg.WireGuardInitiator) -> list[bytes]:
    """The datagrams the initiator queued (all to its one server)."""
    return [data for data, _ in conn.datagrams_to_send(0.0)]


def rejected(conn: wg.WireGuardInitiator, data: bytes, now: float, match: str = "") -> None:
    """A bad datagram becomes a BadDatagram event naming why, never an exception."""
    while conn.next_event() is not None:  # what earlier datagrams caused
        pass
    conn.receive_datagram(data, PEER, now)
    event = conn.next_event()
    assert isinstance(event, wg.BadDatagram), event
    assert match in event.detail


def drain(conn: wg.WireGuardInitiator) -> list[wg.Event]:
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    return events


def handshake(conn: wg.WireGuardInitiator, responder: Responder,
              now: float = 1.0) -> list[wg.Event]:
    conn.initiate(now, WALL)
    (initiation,) = out(conn)
    reply = responder.handle(initiation)
    assert reply is not None
    conn.receive_datagram(reply, PEER, now + 0.001)
    return drain(conn)


# --- constants and primitives -------------------------------------------------------------


def test_noise_constants_match_protocols_reference() -> None:
    # C0 = HASH(CONSTRUCTION), H0 = HASH(C0 || IDENTIFIER); prefixes/suffixes from protocols.md §1
    c0, h0 = wg.INITIAL_CHAINING_KEY.hex(), wg.INITIAL_HASH.hex()
    assert c0.startswith("60e26dae") and c0.endswith("8b78cd36")
    assert h0.startswith("2211b361") and h0.endswith("ba079ef3")
    assert hashlib.blake2s(wg.INITIAL_CHAINING_KEY + wg.IDENTIFIER).digest() == wg.INITIAL_HASH


@pytest.mark.parametrize("key_len", [0, 1, 32, 64, 65, 100])
def test_hmac_blake2s_matches_stdlib(key_len: int) -> None:
    key = bytes(range(key_len % 256))[:key_len] if key_len <= 64 else hashlib.blake2s(b"k").digest()
    for msg in (b"", b"abc", bytes(200)):
        assert wg.hmac_blake2s(key, msg) == hmac.digest(key, msg, hashlib.blake2s)


def test_kdf_is_hkdf_expand_chain() -> None:
    ck, data = bytes(range(32)), b"input"
    prk = hmac.digest(ck, data, hashlib.blake2s)
    t1 = hmac.digest(prk, b"\x01", hashlib.blake2s)
    t2 = hmac.digest(prk, t1 + b"\x02", hashlib.blake2s)
    t3 = hmac.digest(prk, t2 + b"\x03", hashlib.blake2s)
    assert wg.kdf(ck, data, 3) == [t1, t2, t3]
    assert wg.kdf(ck, data, 1) == [t1]


def test_x25519_rfc7748_vector() -> None:
    # RFC 7748 section 6.1 (Alice/Bob)
    a = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    b_pub = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    assert wg.public_key(a).hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert wg.dh(a, b_pub).hex() == (
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_low_order_point_is_rejected() -> None:
    with pytest.raises(wg.WireGuardError):
        wg.dh(bytes(range(32)), bytes(32))


def test_xchacha20poly1305_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03 appendix A.3.1: checks the library we rely on for cookie replies
    plaintext = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
                 b"the future, sunscreen would be it.")
    ad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    key = bytes(range(0x80, 0xA0))
    nonce = bytes.fromhex("404142434445464748494a4b4c4d4e4f5051525354555657")
    tag = bytes.fromhex("c0875924c1c7987947deafd8780acf49")
    sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)
    assert sealed[-16:] == tag
    assert sealed[:8].hex() == "bd6d179d3e83d43b"
    assert wg.xaead_open(key, nonce, sealed, ad) == plaintext
    with pytest.raises(wg.WireGuardError):
        wg.xaead_open(key, nonce, sealed, ad + b"x")


def test_chacha20poly1305_rfc8439_vector() -> None:
    # RFC 8439 section 2.8.2; our nonce layout is 0^4 || counter LE, so feed the raw AEAD directly
    key = bytes(range(0x80, 0xA0))
    nonce = bytes.fromhex("070000004041424344454647")
    ad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    plaintext = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
                 b"the future, sunscreen would be it.")
    sealed = ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)
    assert sealed[-16:].hex() == "1ae10b594f09e26a7e902ecbd0600691"
    assert wg.aead_open(bytes(32), 5, wg.aead_seal(bytes(32), 5, b"x", b"a"), b"a") == b"x"


# --- TAI64N ---------------------------------------------------------------------------------


def test_tai64n_layout_and_whitening() -> None:
    ts = wg.tai64n(1_700_000_000 * 10**9 + 123_456_789)
    seconds, nanos = struct.unpack(">QI", ts)
    assert seconds == 0x400000000000000A + 1_700_000_000
    assert nanos == 123_456_789 & ~((1 << 24) - 1)


def test_next_timestamp_follows_clock_when_it_moves_forward() -> None:
    first = wg.next_timestamp(WALL, None)
    later = wg.next_timestamp(WALL + 10**9, first)
    assert later == wg.tai64n(WALL + 10**9)


@pytest.mark.parametrize("step_back_s", [0, 0.001, 1, 3600, 10**6])
def test_next_timestamp_strictly_increases_when_clock_steps_back(step_back_s: float) -> None:
    last = wg.next_timestamp(WALL, None)
    following = wg.next_timestamp(WALL - int(step_back_s * 10**9), last)
    assert following > last
    assert wg.next_timestamp(WALL - int(step_back_s * 10**9), following) > following


def test_next_timestamp_carries_into_seconds() -> None:
    last = struct.pack(">QI", 0x400000000000000A + 5, 999_000_000)
    assert struct.unpack(">QI", wg.next_timestamp(0, last)) == (0x400000000000000A + 6, 0)


def test_initiations_carry_increasing_timestamps(initiator: wg.WireGuardInitiator,
                                                 responder: Responder) -> None:
    stamps = []
    for _ in range(5):
        initiator.initiate(1.0, WALL)  # frozen clock: every one still has to be newer
        stamps.append(initiator.last_timestamp)
        assert responder.handle(out(initiator)[0]) is not None
    assert stamps == sorted(set(stamps))  # type: ignore[type-var]


def test_restart_with_stepped_back_clock_is_accepted(keys: dict[str, bytes],
                                                     responder: Responder) -> None:
    config = wg.InitiatorConfig(keys["client"], wg.public_key(keys["server"]), keys["psk"])
    first = wg.WireGuardInitiator(config)
    assert handshake(first, responder)
    persisted = first.last_timestamp
    # a new process, wall clock an hour behind, seeded with the persisted timestamp
    second = wg.WireGuardInitiator(config, last_timestamp=persisted)
    events = handshake(second, responder, now=2.0)
    assert isinstance(events[0], wg.HandshakeCompleted)
    # and without the persisted timestamp the server would have dropped it
    third = wg.WireGuardInitiator(config)
    third.initiate(3.0, WALL - 3600 * 10**9)
    assert responder.handle(out(third)[0]) is None


# --- handshake ------------------------------------------------------------------------------


def test_handshake_completes_and_keys_agree(initiator: wg.WireGuardInitiator,
                                            responder: Responder) -> None:
    events = handshake(initiator, responder)
    assert len(events) == 1 and isinstance(events[0], wg.HandshakeCompleted)
    assert events[0].remote_index == responder.local_index
    assert not events[0].used_cookie
    kp = initiator.current
    assert kp is not None
    assert (kp.send_key, kp.receive_key) == (responder.receive_key, responder.send_key)
    assert initiator.get_timer() is None


def test_handshake_without_psk(keys: dict[str, bytes]) -> None:
    responder = Responder(keys["server"], wg.public_key(keys["client"]), None)
    conn = wg.WireGuardInitiator(wg.InitiatorConfig(keys["client"], wg.public_key(keys["server"])))
    assert isinstance(handshake(conn, responder)[0], wg.HandshakeCompleted)


def test_initiation_layout(initiator: wg.WireGuardInitiator, keys: dict[str, bytes]) -> None:
    msg = initiator.initiate(1.0, WALL, sender_index=0xDEADBEEF)
    assert len(msg) == 148 and msg[:4] == b"\x01\0\0\0"
    assert struct.unpack_from("<I", msg, 4)[0] == 0xDEADBEEF
    mac1_key = wg.hash_(wg.LABEL_MAC1, wg.public_key(keys["server"]))
    assert msg[116:132] == wg.mac(mac1_key, msg[:116])
    assert msg[132:] == bytes(16)


def test_wrong_psk_is_an_authentication_error(keys: dict[str, bytes]) -> None:
    responder = Responder(keys["server"], wg.public_key(keys["client"]), b"\x01" * 32)
    conn = wg.WireGuardInitiator(
        wg.InitiatorConfig(keys["client"], wg.public_key(keys["server"]), keys["psk"]))
    conn.initiate(1.0, WALL)
    reply = responder.handle(out(conn)[0])
    assert reply is not None
    rejected(conn, reply, 1.1, match="preshared")
    assert conn.current is None


def test_wrong_server_key_gets_silence(keys: dict[str, bytes], responder: Responder) -> None:
    conn = wg.WireGuardInitiator(wg.InitiatorConfig(keys["client"], wg.public_key(b"\x07" * 32)))
    conn.initiate(1.0, WALL)
    assert responder.handle(out(conn)[0]) is None


def test_response_for_other_index_or_tampered_is_rejected(initiator: wg.WireGuardInitiator,
                                                          responder: Responder) -> None:
    initiator.initiate(1.0, WALL)
    reply = responder.handle(out(initiator)[0])
    assert reply is not None
    bad_index = reply[:8] + bytes(4) + reply[12:]
    rejected(initiator, bad_index, 1.1)
    tampered = bytearray(reply)
    tampered[50] ^= 1
    rejected(initiator, bytes(tampered), 1.1, match="mac1")
    initiator.receive_datagram(reply, PEER, 1.1)  # the genuine one still works afterwards
    assert isinstance(initiator.next_event(), wg.HandshakeCompleted)
    rejected(initiator, reply, 1.2)


def test_cookie_reply_then_mac2_retry(initiator: wg.WireGuardInitiator,
                                      responder: Responder) -> None:
    responder.under_load = True
    initiator.initiate(1.0, WALL)
    cookie_reply = responder.handle(out(initiator)[0])
    assert cookie_reply is not None and len(cookie_reply) == 64
    initiator.receive_datagram(cookie_reply, PEER, 1.01)
    assert drain(initiator) == [wg.CookieReceived()]
    retry = initiator.initiate(1.02, WALL)
    assert retry[132:] == wg.mac(responder.cookie(), retry[:132])
    reply = responder.handle(out(initiator)[0])
    assert reply is not None and len(reply) == 92
    initiator.receive_datagram(reply, PEER, 1.03)
    (done,) = drain(initiator)
    assert isinstance(done, wg.HandshakeCompleted) and done.used_cookie
    assert initiator.cookies_received == 1 and responder.cookies_sent == 1


def test_cookie_expires_after_refresh_time(initiator: wg.WireGuardInitiator,
                                           responder: Responder) -> None:
    responder.under_load = True
    initiator.initiate(1.0, WALL)
    reply = responder.handle(out(initiator)[0])
    assert reply is not None
    initiator.receive_datagram(reply, PEER, 1.0)
    late = initiator.initiate(1.0 + wg.COOKIE_REFRESH_TIME, WALL)
    assert late[132:] == bytes(16)


def test_tampered_cookie_reply_is_rejected(initiator: wg.WireGuardInitiator,
                                           responder: Responder) -> None:
    responder.under_load = True
    initiator.initiate(1.0, WALL)
    reply = responder.handle(out(initiator)[0])
    assert reply is not None
    for offset in (10, 40, 63):  # nonce, sealed cookie, tag
        tampered = bytearray(reply)
        tampered[offset] ^= 0x80
        rejected(initiator, bytes(tampered), 1.2)
    assert initiator.next_event() is None


def test_late_response_to_retransmitted_initiation(initiator: wg.WireGuardInitiator,
                                                   responder: Responder) -> None:
    initiator.initiate(1.0, WALL)
    first = out(initiator)[0]
    initiator.initiate(2.0, WALL)  # retransmission: the first one's answer arrives only now
    out(initiator)
    reply = responder.handle(first)
    assert reply is not None
    initiator.receive_datagram(reply, PEER, 2.1)
    done = initiator.next_event()
    assert isinstance(done, wg.HandshakeCompleted)
    assert done.local_index == struct.unpack_from("<I", first, 4)[0]


def test_handshake_timer(initiator: wg.WireGuardInitiator) -> None:
    initiator.initiate(10.0, WALL)
    assert initiator.get_timer() == 10.0 + wg.REKEY_TIMEOUT
    initiator.handle_timer(11.0)
    assert initiator.next_event() is None
    initiator.handle_timer(15.0)
    assert initiator.next_event() == wg.HandshakeTimedOut()
    assert initiator.get_timer() is None


# --- transport ------------------------------------------------------------------------------


def test_icmp_echo_round_trip(initiator: wg.WireGuardInitiator, responder: Responder) -> None:
    handshake(initiator, responder)
    echo = bytes(IP(src="10.201.0.2", dst="10.201.0.1") / ICMP(id=7, seq=1) / b"probe")
    packet = initiator.send_data(echo, 2.0)
    assert len(packet) == 16 + len(echo) + (-len(echo) % 16) + 16
    assert struct.unpack_from("<I", packet, 4)[0] == responder.local_index
    reply_ip = IP(src="10.201.0.1", dst="10.201.0.2") / ICMP(type=0, id=7, seq=1) / b"probe"
    initiator.receive_datagram(responder.seal(bytes(reply_ip)), PEER, 2.1)
    (event,) = drain(initiator)
    assert isinstance(event, wg.DataReceived)
    parsed = IP(event.payload)
    assert parsed[ICMP].type == 0 and parsed[ICMP].seq == 1
    assert bytes(parsed[ICMP].payload) == b"probe"


def test_keepalive_is_32_bytes_and_counters_increase(initiator: wg.WireGuardInitiator,
                                                     responder: Responder) -> None:
    handshake(initiator, responder)
    first = initiator.send_keepalive(2.0)
    second = initiator.send_keepalive(2.0)
    assert len(first) == wg.KEEPALIVE_SIZE == 32
    assert struct.unpack_from("<Q", first, 8)[0] == 0
    assert struct.unpack_from("<Q", second, 8)[0] == 1
    assert responder.handle(first) is None  # the responder opened it: keys agree
    initiator.receive_datagram(responder.seal(b""), PEER, 2.1)
    assert isinstance(initiator.next_event(), wg.KeepaliveReceived)


def test_replayed_transport_packet_is_rejected(initiator: wg.WireGuardInitiator,
                                               responder: Responder) -> None:
    handshake(initiator, responder)
    packet = responder.seal(b"")
    initiator.receive_datagram(packet, PEER, 2.0)
    rejected(initiator, packet, 2.1, match="replay")


def test_send_before_handshake_or_after_expiry(initiator: wg.WireGuardInitiator,
                                               responder: Responder) -> None:
    with pytest.raises(wg.WireGuardError):
        initiator.send_keepalive(0.0)
    handshake(initiator, responder, now=1.0)
    with pytest.raises(wg.WireGuardError, match="expired"):
        initiator.send_keepalive(1.0 + wg.REJECT_AFTER_TIME + 1)


def test_replay_window_semantics() -> None:
    window = wg.ReplayWindow(size=64)
    for counter in (0, 5, 3, 70):
        assert window.would_accept(counter)
        window.accept(counter)
    assert not window.would_accept(5) and not window.would_accept(70)
    assert window.would_accept(69) and window.would_accept(7)
    assert not window.would_accept(6)  # 70 - 6 = 64: fell out of the window
    assert not window.would_accept(wg.REJECT_AFTER_MESSAGES)
    with pytest.raises(wg.WireGuardError):
        window.accept(3)


def test_strip_padding() -> None:
    pkt = bytes(IP(dst="10.0.0.1") / ICMP())
    assert wg.strip_padding(pkt + bytes(4)) == pkt
    with pytest.raises(wg.WireGuardError):
        wg.strip_padding(pkt[:-1])
    with pytest.raises(wg.WireGuardError):
        wg.strip_padding(b"\x00" * 32)


def test_key_codec() -> None:
    raw = bytes(range(32))
    assert wg.decode_key(wg.encode_key(raw)) == raw
    for bad in ("", "!!", wg.encode_key(raw[:31])):
        with pytest.raises(wg.WireGuardError):
            wg.decode_key(bad)


def test_config_validates_key_lengths() -> None:
    with pytest.raises(wg.WireGuardError):
        wg.InitiatorConfig(bytes(31), bytes(32))
    with pytest.raises(wg.WireGuardError):
        wg.InitiatorConfig(bytes(32), bytes(32), bytes(3))


# --- the initiator that retransmits by itself (what the check's driver runs) ----------------


def test_start_retransmits_on_its_timer_and_announces_each_initiation(
        keys: dict[str, bytes], responder: Responder) -> None:
    config = wg.InitiatorConfig(keys["client"], wg.public_key(keys["server"]), keys["psk"])
    conn = wg.WireGuardInitiator(config, remote=PEER, wall_ns=lambda: WALL, retry_interval=0.25)
    conn.start(1.0)
    (first,) = drain(conn)
    assert isinstance(first, wg.InitiationSent) and first.timestamp == conn.last_timestamp
    ((data, addr),) = conn.datagrams_to_send(1.0)
    assert addr == PEER and int.from_bytes(data[4:8], "little") == first.sender_index
    assert conn.get_timer() == 1.25
    conn.handle_timer(1.2)  # not due: nothing
    assert conn.next_event() is None and conn.datagrams_to_send(1.2) == []
    conn.handle_timer(1.25)
    (second,) = drain(conn)
    assert isinstance(second, wg.InitiationSent) and second.sender_index != first.sender_index
    assert second.timestamp > first.timestamp  # frozen wall clock: still strictly newer
    assert conn.get_timer() == 1.5
    # the answer to the first initiation still completes the handshake, and the timer stops
    reply = responder.handle(data)
    assert reply is not None
    conn.receive_datagram(reply, PEER, 1.3)
    assert isinstance(conn.next_event(), wg.HandshakeCompleted)
    assert conn.get_timer() is None


def test_a_cookie_reply_is_answered_at_once_with_mac2(keys: dict[str, bytes],
                                                       responder: Responder) -> None:
    config = wg.InitiatorConfig(keys["client"], wg.public_key(keys["server"]), keys["psk"])
    conn = wg.WireGuardInitiator(config, remote=PEER, wall_ns=lambda: WALL, retry_interval=0.25)
    responder.under_load = True
    conn.start(1.0)
    drain(conn)
    cookie_reply = responder.handle(out(conn)[0])
    assert cookie_reply is not None
    conn.receive_datagram(cookie_reply, PEER, 1.01)
    events = drain(conn)
    assert isinstance(events[0], wg.CookieReceived) and isinstance(events[1], wg.InitiationSent)
    (retry,) = out(conn)
    assert retry[132:] == wg.mac(responder.cookie(), retry[:132])
    assert conn.get_timer() == pytest.approx(1.26)
