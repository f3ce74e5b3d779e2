"""A sans-I/O OpenVPN client session: hard reset, TLS, key-method 2, PUSH_REPLY, data, EXIT.

Drive it with the verbs every core has (:mod:`probes.protocols.core`)::

    session.start(now)
    send(session.datagrams_to_send(now))          # repeat after every call below
    session.receive_datagram(data, server, now)   # or handle_timer(now) at get_timer()
    while (event := session.next_event()) is not None: ...

It never touches a socket or a clock. ``datagrams_to_send`` returns ``(packet, server)`` pairs
without TCP framing; the transport adds it (:func:`~probes.protocols.openvpn.packet.frame_tcp`).
A packet that does not parse or authenticate is a :class:`BadDatagram` event, never an
exception.

The stateless 2.6 server (mudp.c) keeps nothing until our *third* packet ACKs its reset (message
id 0) under the server's session id with message ids <= 1, so the first TLS packet (id 1) always
carries that ACK, also when retransmitted. For the same reason a reset-only session (no
``ssl_context``) never ACKs: its ACK alone would make the server allocate an instance that then
waits a whole hand-window for a TLS handshake that never comes.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import ssl
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from probes.protocols.core import Address, BadDatagram
from probes.protocols.openvpn import keymethod as km
from probes.protocols.openvpn.data import PING_STRING, DataChannel, Framing
from probes.protocols.openvpn.packet import (
    DATA_OPCODES,
    HEADER_LEN,
    MAX_ACKS,
    SID_LEN,
    ControlPacket,
    Opcode,
    OpenVPNError,
    parse_body,
    split_first_byte,
)
from probes.protocols.openvpn.reliable import ReliableReceiver, ReliableSender
from probes.protocols.openvpn.wrap import NoWrap, TlsCryptV2, Wrapper
from probes.protocols.tlswire import (
    ALERT_HANDSHAKE_FAILURE,
    TLS10,
    TLS12,
    ServerFlight,
    TlsWireError,
    alert,
)

DEFAULT_TLS_MTU = 1250
EARLY_NEG_FLAGS_TLV = 0x0001
EARLY_NEG_FLAG_RESEND_WKC = 0x0001
X509_V_ERR_CERT_HAS_EXPIRED = 10
PUSH_REQUEST_AFTER = 1.0  # seconds to wait for an unprompted PUSH_REPLY before asking


class TlsFailure(enum.StrEnum):
    VERIFY = "verify"  # server chain did not verify against our CA
    EXPIRED = "expired"  # server certificate expired
    EKU = "eku"  # server certificate lacks TLS Web Server Authentication
    PEER_REJECTED = "peer-rejected"  # the server's alert says our certificate was refused
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class ResetAnswered:
    server_session_id: bytes
    early_negotiation_flags: int


@dataclass(frozen=True, slots=True)
class TlsEstablished:
    version: str
    cipher: str
    peer_certificate_der: bytes
    not_after: float  # Unix seconds
    subject: str = ""  # RFC 4514
    group: str = ""  # the key exchange group, read off the server's flight ("" unknown)
    chain: tuple[bytes, ...] = ()  # every certificate the server presented (DER), leaf first


@dataclass(frozen=True, slots=True)
class HelloAnswered:
    """The server's answer to a ClientHello of ``SessionOptions.hello``: its ServerHello (the
    offer accepted) or an alert (refused), in ``flight``."""

    flight: ServerFlight


@dataclass(frozen=True, slots=True)
class TlsFailed:
    failure: TlsFailure
    detail: str
    # what the server presented, when its certificate is what failed (its dates still matter:
    # a certificate not valid yet is an alert of its own)
    chain: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class ExitAcknowledged:
    """The server acknowledged our goodbye (EXIT, or the alert ending a hello offer): it has
    let our instance go, and a check waiting for that can stop now."""


@dataclass(frozen=True, slots=True)
class KeyExchanged:
    server_options: str


@dataclass(frozen=True, slots=True)
class PushReplyReceived:
    reply: km.PushReply


@dataclass(frozen=True, slots=True)
class AuthFailed:
    detail: str


@dataclass(frozen=True, slots=True)
class ControlMessage:
    text: str


@dataclass(frozen=True, slots=True)
class DataReceived:
    payload: bytes


@dataclass(frozen=True, slots=True)
class ServerMisbehaved:
    """The authenticated server sent something OpenVPN does not allow (e.g. a malformed
    key-method 2 message). Unlike a :class:`BadDatagram` this cannot be spoofed noise."""

    detail: str


Event = (ResetAnswered | TlsEstablished | TlsFailed | KeyExchanged | PushReplyReceived
         | AuthFailed | ControlMessage | DataReceived | BadDatagram | ServerMisbehaved
         | HelloAnswered | ExitAcknowledged)


class Stage(enum.IntEnum):
    IDLE = 0
    RESET_SENT = 1
    TLS = 2
    KEY_EXCHANGE = 3
    ACTIVE = 4
    FAILED = 5


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """What the session does beyond the reset. ``ssl_context`` None stops after the reset;
    ``hello`` (TLS records: a ClientHello of :mod:`probes.protocols.tlswire`) replaces the TLS
    handshake by that one offer, answered by a :class:`HelloAnswered` event."""

    ssl_context: ssl.SSLContext | None = None
    hello: bytes | None = None
    key_exchange: bool = True  # send key-method 2 after TLS
    want_push: bool = True
    username: str | None = None
    password: str | None = None
    ciphers: tuple[str, ...] = ("AES-256-GCM", "CHACHA20-POLY1305")
    tls_ekm: bool = False  # advertise TLS key export (needs an exporter in the shell)
    proto_name: str = "UDPv4"
    tls_mtu: int = DEFAULT_TLS_MTU
    retransmit: bool = True
    initial_timeout: float = 1.0
    client_version: str = "2.6.14"


def _parse_early_negotiation(payload: bytes) -> int:
    flags = 0
    pos = 0
    while len(payload) - pos >= 4:
        tlv_type, length = struct.unpack_from("!HH", payload, pos)
        pos += 4
        if len(payload) - pos < length:
            raise OpenVPNError("truncated TLV in server reset")
        if tlv_type == EARLY_NEG_FLAGS_TLV and length == 2:
            (flags,) = struct.unpack_from("!H", payload, pos)
        pos += length
    return flags


def _classify_ssl_error(exc: ssl.SSLError) -> TlsFailed:
    if isinstance(exc, ssl.SSLCertVerificationError):
        failure = (TlsFailure.EXPIRED if exc.verify_code == X509_V_ERR_CERT_HAS_EXPIRED
                   else TlsFailure.VERIFY)
        return TlsFailed(failure, exc.verify_message or str(exc))
    reason = (exc.reason or "").upper()
    rejected = ("CERTIFICATE_REVOKED", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED",
                "UNKNOWN_CA", "CERTIFICATE_EXPIRED", "CERTIFICATE_UNKNOWN",
                "UNSUPPORTED_CERTIFICATE", "ACCESS_DENIED")
    if "ALERT" in reason and any(word in reason for word in rejected):
        return TlsFailed(TlsFailure.PEER_REJECTED, reason.lower())
    return TlsFailed(TlsFailure.OTHER, reason.lower() or str(exc))


def presented_chain(tls: ssl.SSLObject) -> tuple[bytes, ...]:
    """Every certificate the server presented (DER, leaf first), as OpenSSL received them.

    ``SSLObject.get_unverified_chain`` is public from Python 3.13; 3.10-3.12 have the same
    method on the object underneath (``_sslobj``). Empty when neither is there."""
    getter = getattr(tls, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(tls, "_sslobj", None), "get_unverified_chain", None)
    if getter is None:
        return ()
    try:
        chain = getter() or []
        return tuple(ssl.PEM_cert_to_DER_cert(c.public_bytes()) for c in chain)
    except (ValueError, ssl.SSLError, AttributeError):
        return ()


def _check_server_certificate(der: bytes) -> tuple[x509.Certificate, str | None]:
    """(certificate, problem): the chain is verified by OpenSSL; EKU is ours to check, like
    ``--remote-cert-tls server``."""
    cert = x509.load_der_x509_certificate(der)
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return cert, "server certificate has no extended key usage"
    if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        return cert, "server certificate lacks serverAuth extended key usage"
    return cert, None


class ClientSession:
    def __init__(self, wrapper: Wrapper | None = None, options: SessionOptions | None = None,
                 *, remote: Address = ("", 0),
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.remote = remote  # the server, as the caller's transport knows it
        self.wrapper: Wrapper = wrapper if wrapper is not None else NoWrap()
        self.options = options if options is not None else SessionOptions()
        self._random = random_bytes
        self.session_id = random_bytes(SID_LEN)
        self.server_session_id: bytes | None = None
        self.stage = Stage.IDLE
        self._sender = ReliableSender(initial_timeout=self.options.initial_timeout,
                                      retransmit=self.options.retransmit)
        self._receiver = ReliableReceiver()
        self._events: deque[Event] = deque()
        self._data_out: list[bytes] = []
        self._resend_wkc = False
        self._tls: ssl.SSLObject | None = None
        # the server's TLS bytes read as they pass (the group OpenSSL does not tell us; the
        # answer to a hello offer); None once they stopped parsing (informational only)
        self.flight: ServerFlight | None = ServerFlight()
        self._hello_answered = False
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._key_source = km.ClientKeySource(random_bytes(km.PRE_MASTER_LEN),
                                              random_bytes(km.RANDOM_LEN),
                                              random_bytes(km.RANDOM_LEN))
        self.server_key_method: km.ServerKeyMethod2 | None = None
        self.push_reply: km.PushReply | None = None
        self._push_partial: km.PushReply | None = None
        self._push_request_at: float | None = None
        self._exit_message_id: int | None = None
        self.data_channel: DataChannel | None = None
        self.bad_packets = 0
        self.tls_bytes_received = 0  # in-order TLS bytes from the server

    # --- driving -------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        opcode = (Opcode.CONTROL_HARD_RESET_CLIENT_V3 if isinstance(self.wrapper, TlsCryptV2)
                  else Opcode.CONTROL_HARD_RESET_CLIENT_V2)
        self._sender.queue(opcode, b"")
        self.stage = Stage.RESET_SENT

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        timers = [t for t in (self._sender.timer(), self._push_request_at) if t is not None]
        return min(timers, default=None)

    def handle_timer(self, now: float) -> None:
        if self._push_request_at is not None and now >= self._push_request_at:
            self._push_request_at = None
            if self.push_reply is None and self.stage == Stage.ACTIVE:
                self._write_plaintext(b"PUSH_REQUEST\x00")

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        return [(packet, self.remote) for packet in self._packets_to_send(now)]

    def _packets_to_send(self, now: float) -> list[bytes]:
        out = self._data_out
        self._data_out = []
        for message_id, opcode, payload in self._sender.due(now):
            acks = self._take_acks()
            if message_id == 1 and 0 not in acks and self.server_session_id is not None:
                acks = (0, *acks[:MAX_ACKS - 1])  # the stateless server's admission ticket
            out.append(self._wrap(ControlPacket(
                opcode, self.session_id, 0, acks,
                (self.server_session_id or b"") if acks else b"", message_id, payload)))
        while (self._receiver.has_acks and self.server_session_id is not None
               and self._speaks_tls):
            out.append(self._wrap(ControlPacket(
                Opcode.ACK_V1, self.session_id, 0, self._receiver.take_acks(),
                self.server_session_id, None)))
        return out

    @property
    def retransmissions(self) -> int:
        return self._sender.retransmissions

    @property
    def fewest_sends_unacknowledged(self) -> int:
        """Sends of the least-tried control packet the server has not ACKed (0: none)."""
        return self._sender.fewest_sends_unacked

    @property
    def _speaks_tls(self) -> bool:
        return self.options.ssl_context is not None or self.options.hello is not None

    def _take_acks(self) -> tuple[int, ...]:
        if self.server_session_id is None:
            return ()
        return self._receiver.take_acks()

    def _wrap(self, packet: ControlPacket) -> bytes:
        packet.validate()
        return self.wrapper.wrap(packet.header(), packet.body())

    # --- receiving -----------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        try:
            self._receive(data, now)
        except OpenVPNError as exc:
            self.bad_packets += 1
            self._events.append(BadDatagram(str(exc)))

    def _receive(self, data: bytes, now: float) -> None:
        if not data:
            raise OpenVPNError("empty datagram")
        opcode, _ = split_first_byte(data[0])
        if opcode in DATA_OPCODES:
            self._receive_data(data)
            return
        opcode, key_id, sid, body = self.wrapper.unwrap(data)
        packet = parse_body(opcode, key_id, sid, body)
        if opcode == Opcode.CONTROL_HARD_RESET_SERVER_V2 and self.server_session_id is None:
            self.server_session_id = sid
        elif self.server_session_id is None:
            raise OpenVPNError(f"{opcode.name} before the server's reset")
        elif sid != self.server_session_id:
            raise OpenVPNError("packet from another server session")
        if opcode not in (Opcode.CONTROL_HARD_RESET_SERVER_V2, Opcode.CONTROL_V1,
                          Opcode.ACK_V1, Opcode.CONTROL_SOFT_RESET_V1):
            raise OpenVPNError(f"unexpected {opcode.name} from a server")
        if packet.acks:
            if packet.remote_session_id != self.session_id:
                raise OpenVPNError("ACK for a session that is not ours")
            leaving = self._exit_message_id is not None and not self.exit_acknowledged
            self._sender.ack(packet.acks)
            if leaving and self.exit_acknowledged:
                self._events.append(ExitAcknowledged())
        if packet.message_id is None:
            return
        for _, op, payload in self._receiver.receive(packet.message_id, opcode, packet.payload):
            if op == Opcode.CONTROL_HARD_RESET_SERVER_V2:
                self._on_server_reset(payload, now)
            elif op == Opcode.CONTROL_V1 and self.stage >= Stage.TLS:
                self._read_flight(payload)
                if self._tls is not None:
                    self._incoming.write(payload)
                self.tls_bytes_received += len(payload)
        self._pump_tls(now)

    def _read_flight(self, payload: bytes) -> None:
        flight = self.flight
        if flight is None or flight.done:
            return
        try:
            flight.feed(payload)
        except TlsWireError as exc:
            self.flight = None
            if self.options.hello is not None:  # the answer to our offer is not TLS
                self.stage = Stage.FAILED
                self._events.append(ServerMisbehaved(f"answer to the ClientHello: {exc}"))
            return
        if (self.options.hello is not None and not self._hello_answered
                and (flight.hello is not None or flight.alert is not None)):
            self._hello_answered = True
            self._events.append(HelloAnswered(flight))

    def _receive_data(self, data: bytes) -> None:
        if self.data_channel is None:
            return  # data before we have keys: not ours to judge
        plaintext = self.data_channel.decrypt(data)
        if plaintext != PING_STRING:
            self._events.append(DataReceived(plaintext))

    def _on_server_reset(self, payload: bytes, now: float) -> None:
        flags = _parse_early_negotiation(payload)
        self._resend_wkc = bool(flags & EARLY_NEG_FLAG_RESEND_WKC)
        assert self.server_session_id is not None
        self._events.append(ResetAnswered(self.server_session_id, flags))
        if self.options.hello is not None:
            self.stage = Stage.TLS
            self._outgoing.write(self.options.hello)  # queued by _pump_tls
            return
        if self.options.ssl_context is None:
            return
        self.stage = Stage.TLS
        self._tls = self.options.ssl_context.wrap_bio(self._incoming, self._outgoing,
                                                      server_side=False)

    # --- TLS and the plaintext control channel -------------------------------------------------

    def _fail(self, event: TlsFailed) -> None:
        self.stage = Stage.FAILED
        self._events.append(event)

    def _pump_tls(self, now: float) -> None:
        tls = self._tls
        if tls is None or self.stage == Stage.FAILED:
            self._flush_tls()  # a hello offer, or an alert ending it
            return
        if self.stage == Stage.TLS:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                failed = _classify_ssl_error(exc)
                if isinstance(exc, ssl.SSLCertVerificationError):
                    failed = dataclasses.replace(failed, chain=presented_chain(tls))
                self._fail(failed)
            else:
                self._on_handshake_done()
        if self.stage in (Stage.KEY_EXCHANGE, Stage.ACTIVE):
            self._read_plaintext(tls, now)
        self._flush_tls()

    def _on_handshake_done(self) -> None:
        assert self._tls is not None
        der = self._tls.getpeercert(binary_form=True) or b""
        try:
            cert, problem = _check_server_certificate(der)
        except ValueError as exc:
            self._fail(TlsFailed(TlsFailure.VERIFY, f"unparsable server certificate: {exc}"))
            return
        if problem is not None:
            self._fail(TlsFailed(TlsFailure.EKU, problem))
            return
        cipher = (self._tls.cipher() or ("",))[0]
        flight = self.flight
        self._events.append(TlsEstablished(
            self._tls.version() or "", cipher, der, cert.not_valid_after_utc.timestamp(),
            cert.subject.rfc4514_string(), group=flight.group_label if flight else "",
            chain=presented_chain(self._tls) or (der,)))
        self.stage = Stage.KEY_EXCHANGE
        if self.options.key_exchange:
            self._write_plaintext(km.encode_client_key_method_2(
                self._key_source, self._options_string(), self._peer_info(),
                self.options.username, self.options.password))

    def _read_plaintext(self, tls: ssl.SSLObject, now: float) -> None:
        while True:
            try:
                message = tls.read(65536)  # one TLS record: one OpenVPN message
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                self._fail(TlsFailed(TlsFailure.OTHER, "server closed TLS"))
                return
            except ssl.SSLError as exc:
                self._fail(_classify_ssl_error(exc))
                return
            if not message:
                return
            try:
                self._on_plaintext(message, now)
            except OpenVPNError as exc:
                self.stage = Stage.FAILED
                self._events.append(ServerMisbehaved(str(exc)))
                return

    def _on_plaintext(self, message: bytes, now: float) -> None:
        if self.server_key_method is None:
            self.server_key_method = km.decode_server_key_method_2(message)
            self.stage = Stage.ACTIVE
            self._events.append(KeyExchanged(self.server_key_method.options))
            if self.options.want_push:
                self._push_request_at = now + PUSH_REQUEST_AFTER
            return
        text = km.control_text(message)
        if text.startswith("PUSH_REPLY"):
            part = km.parse_push_reply(text)
            merged = part if self._push_partial is None else self._push_partial.merged(part)
            if part.continues:
                self._push_partial = merged
                return
            self._push_partial = None
            self.push_reply = merged
            self._push_request_at = None
            self._events.append(PushReplyReceived(merged))
        elif text.startswith("AUTH_FAILED"):
            self._events.append(AuthFailed(text))
        else:
            self._events.append(ControlMessage(text))

    def _write_plaintext(self, data: bytes) -> None:
        if self._tls is None:
            return
        self._tls.write(data)
        self._flush_tls()

    def _flush_tls(self) -> None:
        data = self._outgoing.read()
        chunk = self._control_payload_budget()
        for pos in range(0, len(data), chunk):
            wkc = self._resend_wkc and self._sender.next_id == 1
            opcode = Opcode.CONTROL_WKC_V1 if wkc else Opcode.CONTROL_V1
            self._sender.queue(opcode, data[pos:pos + chunk])

    def _control_payload_budget(self) -> int:
        fixed = HEADER_LEN + self.wrapper.overhead + 1 + 4 * MAX_ACKS + SID_LEN + 4
        return max(self.options.tls_mtu - fixed, 64)

    def _options_string(self) -> str:
        cipher = self.options.ciphers[0] if self.options.ciphers else "AES-256-GCM"
        return (f"V4,dev-type tun,link-mtu 1549,tun-mtu 1500,proto {self.options.proto_name},"
                f"cipher {cipher},auth [null-digest],keysize 256,key-method 2,tls-client")

    def _peer_info(self) -> str:
        proto = km.IV_PROTO_DATA_V2 | km.IV_PROTO_CC_EXIT_NOTIFY
        if self.options.want_push:
            proto |= km.IV_PROTO_REQUEST_PUSH
        if self.options.tls_ekm:
            proto |= km.IV_PROTO_TLS_KEY_EXPORT
        lines = [f"IV_VER={self.options.client_version}", "IV_PLAT=linux", f"IV_PROTO={proto}",
                 f"IV_CIPHERS={':'.join(self.options.ciphers)}", "IV_NCP=2",
                 # we frame but never compress: a server configured for compression then
                 # pushes a stub (comp-lzo no, compress stub / stub-v2) instead of refusing us
                 "IV_LZO_STUB=1", "IV_COMP_STUB=1", "IV_COMP_STUBv2=1",
                 "IV_GUI_VER=tunnelwatch"]
        return "\n".join(lines) + "\n"

    # --- leaving, data channel -----------------------------------------------------------------

    def end_hello(self, now: float) -> bool:
        """End a hello offer with a fatal alert, so that the server drops the instance it made
        for us at once (as it does on any TLS failure) instead of waiting out its hand-window.
        False when no offer was made (nothing to end)."""
        if self.options.hello is None or self.stage != Stage.TLS:
            return False
        hello = self.flight.hello if self.flight is not None else None
        version = min(hello.version, TLS12) if hello is not None else TLS10
        self._outgoing.write(alert(ALERT_HANDSHAKE_FAILURE, version))
        self._flush_tls()
        self._exit_message_id = self._sender.next_id - 1  # exit_acknowledged: the alert's ACK
        self.stage = Stage.FAILED
        return True

    def send_exit(self, now: float) -> bool:
        """Queue ``EXIT`` so the server frees our instance (and pool address) now, not at
        ping-restart. Returns False when there is no TLS session to say it in."""
        if self._tls is None or self.stage not in (Stage.KEY_EXCHANGE, Stage.ACTIVE):
            return False
        if self._exit_message_id is None:
            self._write_plaintext(b"EXIT\x00")
            self._exit_message_id = self._sender.next_id - 1
        return True

    def resend_unacknowledged(self, now: float) -> None:
        """Retransmit every unacknowledged control packet at the next ``datagrams_to_send``."""
        self._sender.expedite(now)

    @property
    def exit_acknowledged(self) -> bool:
        return self._exit_message_id is not None and self._sender.is_acked(self._exit_message_id)

    @property
    def tls_object(self) -> ssl.SSLObject | None:
        return self._tls

    def start_data_channel(self, key2: bytes | None = None,
                           framing: Framing = Framing.NONE) -> DataChannel:
        """Install data-channel keys: ``key2`` from TLS-EKM, or the key-method-2 PRF.
        ``framing`` is our configured compression framing; a pushed one wins."""
        reply = self.push_reply
        if reply is None or self.server_key_method is None or self.server_session_id is None:
            raise OpenVPNError("no PUSH_REPLY yet")
        cipher = reply.cipher or "AES-256-GCM"
        if key2 is None:
            key2 = km.openvpn_prf_key2(self._key_source, self.server_key_method,
                                       self.session_id, self.server_session_id)
        pushed = reply.compression
        if pushed is not None:
            framing = Framing(pushed)
        self.data_channel = DataChannel(key2, cipher, reply.peer_id, framing=framing)
        return self.data_channel

    def send_data(self, payload: bytes) -> None:
        if self.data_channel is None:
            raise OpenVPNError("data channel not started")
        self._data_out.append(self.data_channel.encrypt(payload))
