"""The client session core against an in-memory server peer: no sockets, no clock."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable

import pytest

from probes.protocols.core import BadDatagram
from probes.protocols.openvpn.data import PING_STRING, DataChannel
from probes.protocols.openvpn.packet import Opcode, decode_plain
from probes.protocols.openvpn.session import (
    AuthFailed,
    ClientSession,
    DataReceived,
    Event,
    ExitAcknowledged,
    KeyExchanged,
    PushReplyReceived,
    ResetAnswered,
    ServerMisbehaved,
    SessionOptions,
    Stage,
    TlsEstablished,
    TlsFailed,
    TlsFailure,
)
from probes.protocols.openvpn.wrap import ReplayCounter, TlsCrypt, TlsCryptV2
from tests.openvpn.conftest import client_context, server_context
from tests.openvpn.fake_server import FakeServer
from tests.openvpn.pki import Issued, ScratchPki

pytestmark = pytest.mark.openvpn


PEER = ("", 0)  # a session's one server, as the tests' transport knows it


def packets(session: ClientSession, now: float) -> list[bytes]:
    """What the session sends now (all of it to its one server)."""
    return [data for data, _ in session.datagrams_to_send(now)]


def drive(session: ClientSession, server: FakeServer, now: float = 0.0,
          drop: Callable[[int, bytes], bool] = lambda i, d: False) -> list[Event]:
    """Exchange datagrams until both sides go quiet; ``drop(i, d)`` loses client datagram i."""
    events: list[Event] = []
    sent = 0
    for _ in range(50):
        outgoing = packets(session, now)
        replies: list[bytes] = []
        for data in outgoing:
            sent += 1
            if not drop(sent, data):
                replies += server.receive(data)
        for data in replies:
            session.receive_datagram(data, PEER, now)
        while (event := session.next_event()) is not None:
            events.append(event)
        if not outgoing and not replies:
            timer = session.get_timer()
            if timer is None or timer > now + 30:
                break
            now = timer
            session.handle_timer(now)
    return events


@pytest.fixture
def contexts(pki: ScratchPki, server_cert: Issued, client_cert: Issued
             ) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    return client_context(pki.ca_file, client_cert), server_context(pki.ca_file, server_cert)


def test_full_session_unwrapped(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    client_ctx, server_ctx = contexts
    session = ClientSession(options=SessionOptions(ssl_context=client_ctx))
    server = FakeServer(server_ctx)
    session.start(0.0)
    events = drive(session, server)
    kinds = [type(e) for e in events]
    assert kinds == [ResetAnswered, TlsEstablished, KeyExchanged, PushReplyReceived]
    push = events[-1]
    assert isinstance(push, PushReplyReceived) and push.reply.ifconfig == ("10.8.0.2",
                                                                          "255.255.255.0")
    assert session.stage == Stage.ACTIVE
    established = events[1]
    assert isinstance(established, TlsEstablished) and established.subject == "CN=server"
    assert established.not_after > 0 and established.version == "TLSv1.3"
    assert server.first_control_acks == (0,)  # the stateless server's admission ticket
    assert server.key_method is not None and b"IV_PROTO=" in server.key_method
    assert session.send_exit(0.0)
    drive(session, server)
    assert server.messages == [b"EXIT\x00"] and session.exit_acknowledged


def test_tls_crypt_v2_early_negotiation_sends_wkc_once(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    client_ctx, server_ctx = contexts
    kc, wkc = os.urandom(256), os.urandom(40) + (42).to_bytes(2, "big")
    session = ClientSession(TlsCryptV2(kc, wkc, ReplayCounter(1)),
                            SessionOptions(ssl_context=client_ctx))
    server = FakeServer(server_ctx, TlsCrypt(kc, ReplayCounter(1), server=True),
                        wkc_len=len(wkc), early_neg=True)
    session.start(0.0)
    events = drive(session, server)
    assert isinstance(events[0], ResetAnswered) and events[0].early_negotiation_flags == 1
    assert isinstance(events[-1], PushReplyReceived)
    assert server.opcodes[0] == Opcode.CONTROL_HARD_RESET_CLIENT_V3
    assert server.opcodes[1] == Opcode.CONTROL_WKC_V1
    assert Opcode.CONTROL_WKC_V1 not in server.opcodes[2:]


def test_lost_third_packet_is_resent_still_acking_the_reset(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    client_ctx, server_ctx = contexts
    key = os.urandom(256)
    session = ClientSession(TlsCrypt(key, ReplayCounter(1)), SessionOptions(ssl_context=client_ctx))
    server = FakeServer(server_ctx, TlsCrypt(key, ReplayCounter(1), server=True))
    session.start(0.0)
    events = drive(session, server, drop=lambda i, d: i in (1, 2))  # the reset, then packet id 1
    assert isinstance(events[-1], PushReplyReceived)
    assert session.retransmissions >= 2
    assert server.first_control_acks is not None and 0 in server.first_control_acks


def test_reset_only_session_stops_after_the_reset() -> None:
    session = ClientSession()
    session.start(0.0)
    (reset,) = packets(session, 0.0)
    assert decode_plain(reset).opcode == Opcode.CONTROL_HARD_RESET_CLIENT_V2
    reply = bytes([0x40]) + b"S" * 8 + b"\x01" + bytes(4) + session.session_id + bytes(4)
    session.receive_datagram(reply, PEER, 0.01)
    session.receive_datagram(reply, PEER, 0.02)  # a retransmitted reset is not ACKed either
    assert isinstance(session.next_event(), ResetAnswered)
    # no ACK: it would be the stateless server's admission ticket and cost it an instance
    assert packets(session, 0.03) == []
    assert session.get_timer() is None


@pytest.mark.parametrize(("which", "failure"), [
    ("wrong-ca", TlsFailure.VERIFY), ("expired", TlsFailure.EXPIRED), ("no-eku", TlsFailure.EKU),
])
def test_server_certificate_failures(tmp_path: object, pki: ScratchPki, client_cert: Issued,
                                     which: str, failure: TlsFailure) -> None:
    from pathlib import Path

    other = ScratchPki(Path(str(tmp_path)) / "other", cn="other-ca")
    server_cert = {"wrong-ca": lambda: other.server("s-other"),
                   "expired": lambda: pki.server("s-expired", expired=True),
                   "no-eku": lambda: pki.issue("s-noeku", None)}[which]()
    ca = pki.ca_file
    session = ClientSession(options=SessionOptions(ssl_context=client_context(ca, client_cert)))
    server_ctx = server_context(other.ca_file if which == "wrong-ca" else ca, server_cert)
    server_ctx.load_verify_locations(ca)
    session.start(0.0)
    events = drive(session, FakeServer(server_ctx))
    failed = [e for e in events if isinstance(e, TlsFailed)]
    assert failed and failed[0].failure == failure
    assert session.stage == Stage.FAILED and not session.send_exit(0.0)


def test_auth_failed_is_an_event(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    client_ctx, server_ctx = contexts
    session = ClientSession(options=SessionOptions(ssl_context=client_ctx, username="u",
                                                   password="p"))
    server = FakeServer(server_ctx, push="AUTH_FAILED,bad password")
    session.start(0.0)
    events = drive(session, server)
    assert any(isinstance(e, AuthFailed) and "bad password" in e.detail for e in events)
    assert server.key_method is not None and b"\x00\x02u\x00\x00\x02p\x00" in server.key_method


def test_push_request_is_sent_when_the_server_waits(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    client_ctx, server_ctx = contexts
    session = ClientSession(options=SessionOptions(ssl_context=client_ctx))
    server = FakeServer(server_ctx, push="INFO,hello")
    session.start(0.0)
    drive(session, server)
    assert b"PUSH_REQUEST\x00" in server.messages


def test_garbage_and_foreign_packets_are_events_not_exceptions(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    session = ClientSession(options=SessionOptions(ssl_context=contexts[0]))
    session.start(0.0)
    packets(session, 0.0)
    for junk in (b"", b"\xff" * 30, bytes([0x20]) + bytes(20), bytes([0x40]) + bytes(8)):
        session.receive_datagram(junk, PEER, 0.0)
    reply = bytes([0x40]) + b"S" * 8 + b"\x01" + bytes(4) + b"N" * 8 + bytes(4)  # not our sid
    session.receive_datagram(reply, PEER, 0.0)
    events = []
    while (event := session.next_event()) is not None:
        events.append(event)
    assert len(events) == 5 and all(isinstance(e, BadDatagram) for e in events)
    assert session.bad_packets == 5


def test_the_exit_ack_is_an_event(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """A check waits for the server to have its EXIT: the ACK must wake it (an event), not only
    change a property it would read after its next wake-up (the EXIT phase then took 250 ms)."""
    client_ctx, server_ctx = contexts
    session = ClientSession(options=SessionOptions(ssl_context=client_ctx))
    server = FakeServer(server_ctx)
    session.start(0.0)
    assert ExitAcknowledged not in {type(e) for e in drive(session, server)}
    assert session.send_exit(1.0)
    (exit_packet,) = packets(session, 1.0)
    for reply in server.receive(exit_packet):
        session.receive_datagram(reply, PEER, 1.0)
    assert session.exit_acknowledged
    assert list(iter(session.next_event, None)) == [ExitAcknowledged()]


def test_data_channel_through_the_session(contexts: tuple[ssl.SSLContext, ssl.SSLContext]
                                          ) -> None:
    client_ctx, server_ctx = contexts
    session = ClientSession(options=SessionOptions(ssl_context=client_ctx))
    session.start(0.0)
    drive(session, FakeServer(server_ctx))
    key2 = os.urandom(256)
    session.start_data_channel(key2)
    peer = DataChannel(key2, "AES-256-GCM", 3, server=True)
    session.send_data(b"echo")
    (wire,) = packets(session, 1.0)
    assert peer.decrypt(wire) == b"echo"
    session.receive_datagram(peer.encrypt(PING_STRING), PEER, 1.0)
    session.receive_datagram(peer.encrypt(b"reply"), PEER, 1.0)
    assert session.next_event() == DataReceived(b"reply")
    assert session.next_event() is None
    prf_session = ClientSession(options=SessionOptions(ssl_context=client_ctx))
    prf_session.start(0.0)
    drive(prf_session, FakeServer(server_ctx))
    assert prf_session.start_data_channel().peer_id == 3  # PRF path from key-method 2


def test_malformed_key_method_from_the_server_is_misbehaviour(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    client_ctx, server_ctx = contexts
    session = ClientSession(options=SessionOptions(ssl_context=client_ctx))
    server = FakeServer(server_ctx, reply_to_key_method=False)
    session.start(0.0)
    drive(session, server)
    server.tls.write(b"\x00\x00\x00\x00\x07 not key-method 2")
    server._pump()
    events: list[Event] = []
    for data in server.flush():
        session.receive_datagram(data, PEER, 1.0)
    while (event := session.next_event()) is not None:
        events.append(event)
    assert any(isinstance(e, ServerMisbehaved) for e in events)
    assert session.stage == Stage.FAILED
