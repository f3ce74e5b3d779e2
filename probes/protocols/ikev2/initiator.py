"""IKEv2 initiator state machine (RFC 7296), sans-I/O.

Drive it with the verbs every core has (:mod:`probes.protocols.core`): ``start(now)``, then feed
every datagram with ``receive_datagram(data, addr, now)`` (``addr``: the responder's address and
the port it came from, 500 or the NAT-T port), call ``handle_timer(now)`` when ``get_timer()`` is
due, send what ``datagrams_to_send(now)`` returns (``(bytes, (host, port))``; datagrams for the
NAT-T port already carry the non-ESP marker) and read ``next_event()`` until it returns None.
What arrives on the NAT-T port without the marker is ESP (or a keepalive): an :class:`EspPacket`
event for the CHILD_SA's owner. What is not IKE for us is a :class:`BadDatagram` event.

Exchanges: IKE_SA_INIT (COOKIE and INVALID_KE_PAYLOAD retries, NAT detection and the float to
4500), optionally IKE_AUTH with a PSK (childless per RFC 6023 when the responder offers it and no
CHILD_SA is wanted, else with an ESP proposal), optionally a CREATE_CHILD_SA for a new CHILD_SA
without a KE payload (the policy scan's "no PFS" offer, §1.3.1), and INFORMATIONAL Deletes in
``close(now)``.
Only the initiator retransmits (§2.1): the same bytes, ``retransmit_initial * factor**n`` apart.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import os
from collections import deque
from dataclasses import dataclass

from probes.protocols.core import Address, BadDatagram
from probes.protocols.ikev2 import crypto as c
from probes.protocols.ikev2 import payloads as p
from probes.protocols.ikev2.esp import NON_ESP_MARKER, EspSa
from probes.protocols.ikev2.proposals import (
    ADDKE_TYPES,
    chosen_esp,
    chosen_esp_key_bytes,
    chosen_suite,
    groups_of,
    parse_esp_proposals,
)
from probes.protocols.ikev2.signature import (
    HASH_ALGORITHMS_NOTIFY,
    SIGNATURE_METHODS,
    identity_in_certificate,
    signed_octets,
    verify_auth,
)

NAT_T_PORT = 4500
SPI_LEN = 8
NONCE_LEN = 32


class Failure(enum.StrEnum):
    TIMEOUT = "timeout"
    NO_PROPOSAL_CHOSEN = "no-proposal-chosen"
    INVALID_KE = "invalid-ke"
    AUTH_FAILED = "auth-failed"
    ERROR_NOTIFY = "error-notify"  # any other error notify from the responder
    BAD_PACKET = "bad-packet"  # an answer to our request that we could not accept


class State(enum.Enum):
    IDLE = enum.auto()
    INIT_SENT = enum.auto()
    INIT_DONE = enum.auto()  # SA_INIT answered; no PSK, so no IKE_AUTH (init-level probe)
    AUTH_SENT = enum.auto()
    CHILD_SENT = enum.auto()  # IKE SA established, CREATE_CHILD_SA outstanding
    ESTABLISHED = enum.auto()
    DELETE_SENT = enum.auto()
    CLOSED = enum.auto()
    FAILED = enum.auto()


@dataclass(frozen=True, slots=True)
class ChildRequest:
    """A CHILD_SA to negotiate in IKE_AUTH (tunnel level)."""

    esp_proposal: str = "aes256gcm16-aes128gcm16"
    # the tunnel level speaks ESP itself (AES-GCM only); the policy scan only negotiates the
    # CHILD_SA and may offer anything (its ChildSa then has no ``esp`` when not AES-GCM)
    aead_only: bool = True
    ts_i: tuple[str, ...] = ("0.0.0.0/0",)
    ts_r: tuple[str, ...] = ("0.0.0.0/0",)
    # negotiate it in a CREATE_CHILD_SA of its own after IKE_AUTH, with no KE payload: a
    # responder that insists on PFS for new CHILD_SAs must refuse it (a CHILD_SA made in
    # IKE_AUTH never has a key exchange of its own, so only this shows the policy)
    in_create_child: bool = False
    # ask for an inner address and resolvers (CP CFG_REQUEST: INTERNAL_IP4_ADDRESS and
    # INTERNAL_IP4_DNS), as a remote-access client does; the answer is in AuthCompleted
    request_config: bool = False


@dataclass(frozen=True, slots=True)
class InitiatorConfig:
    local_address: tuple[str, int]  # as the responder should see it, for NAT detection
    remote_address: tuple[str, int]
    proposals: tuple[p.Proposal, ...]
    psk: bytes | None = None  # None: stop after IKE_SA_INIT
    local_id: str = "tunnelwatch-probe"
    remote_id: str | None = None  # when set: sent as IDr and the responder's IDr must match
    # a responder that authenticates with a certificate: the CAs we trust (SHA-1 of their
    # SubjectPublicKeyInfo), asked for in a CERTREQ; the shell judges the chain it sends
    trusted_ca_hashes: tuple[bytes, ...] = ()
    child: ChildRequest | None = None  # None: childless if the responder supports it
    force_nat_t: bool = False  # fake NAT-D so the responder encapsulates ESP in UDP (RFC 3948)
    nat_t_port: int = NAT_T_PORT
    retransmit_initial: float = 0.5
    retransmit_factor: float = 2.0
    retransmit_tries: int = 5  # sends of one request, the first included
    delete_retransmit_initial: float = 0.2  # Deletes run in the short cleanup grace: resend sooner
    max_cookie_rounds: int = 2
    max_ke_rounds: int = 2
    random_bytes: c.RandomBytes = os.urandom


@dataclass(frozen=True, slots=True)
class InitRetried:
    why: str  # "cookie" or "invalid-ke"
    group: int


@dataclass(frozen=True, slots=True)
class InitCompleted:
    suite: c.CipherSuite
    spi_r: bytes
    nat_local: bool  # we look NATed to the responder
    nat_remote: bool  # the responder is behind a NAT
    floated: bool  # moved to the NAT-T port
    childless_supported: bool
    fragmentation_supported: bool
    cookie_rounds: int
    ke_rounds: int


@dataclass(frozen=True, slots=True)
class ChildSa:
    esp: EspSa | None  # None: the responder chose a transform the probe does not speak
    ts_i: tuple[p.TrafficSelector, ...]
    ts_r: tuple[p.TrafficSelector, ...]
    proposal: p.Proposal  # the responder's chosen ESP proposal


@dataclass(frozen=True, slots=True)
class AuthCompleted:
    responder_id: str
    childless: bool  # no CHILD_SA was requested
    child: ChildSa | None
    child_error: str = ""  # the error notify that refused the CHILD_SA, if one did
    # the responder's certificates as it sent them (end entity first), when it signed its AUTH
    # (verified with the first one's key); empty for a PSK responder
    certificates: tuple[bytes, ...] = ()
    # the responder's CP CFG_REPLY, when the CHILD_SA asked (request_config)
    internal_address: str | None = None  # INTERNAL_IP4_ADDRESS: our address inside
    internal_dns: tuple[str, ...] = ()  # INTERNAL_IP4_DNS


@dataclass(frozen=True, slots=True)
class ChildCreated:
    """The answer to our CREATE_CHILD_SA: the CHILD_SA, or why it was refused."""

    child: ChildSa | None
    error: str = ""  # the error notify (or the flaw of the answer) when ``child`` is None
    refused: bool = False  # an error notify said no (not a malformed answer)


@dataclass(frozen=True, slots=True)
class Failed:
    failure: Failure
    detail: str
    notify: int | None = None
    established: bool = False  # the IKE SA existed when this happened (it still needs a Delete)


@dataclass(frozen=True, slots=True)
class Closed:
    acknowledged: bool  # the responder answered our Delete
    by_responder: bool = False


@dataclass(frozen=True, slots=True)
class EspPacket:
    """A datagram on the NAT-T port without the non-ESP marker: ESP, or a NAT keepalive."""

    data: bytes


Event = (InitRetried | InitCompleted | AuthCompleted | ChildCreated | Failed | Closed | EspPacket
         | BadDatagram)


@dataclass(slots=True)
class _Outstanding:
    message_id: int
    datagram: bytes
    port: int
    sends: int = 0
    next_send: float = 0.0


def _id_payload(ptype: int, text: str) -> p.IdPayload:
    try:
        return p.IdPayload(ptype, p.IdType.IPV4_ADDR, ipaddress.IPv4Address(text).packed)
    except ValueError:
        return p.IdPayload(ptype, p.IdType.FQDN, text.encode())


def _id_text(payload: p.IdPayload) -> str:
    if payload.id_type == p.IdType.IPV4_ADDR and len(payload.data) == 4:
        return str(ipaddress.IPv4Address(payload.data))
    return payload.data.decode(errors="replace")


class Initiator:
    def __init__(self, config: InitiatorConfig) -> None:
        self.config = config
        self.state = State.IDLE
        self._rand = config.random_bytes
        self.spi_i = self._rand(SPI_LEN)
        self.spi_r = bytes(SPI_LEN)
        self.nonce_i = self._rand(NONCE_LEN)
        self._groups = groups_of(config.proposals)
        self._ke = c.KeyExchange(self._groups[0])
        self._cookie: bytes | None = None
        self._cookie_rounds = 0
        self._ke_rounds = 0
        self._port = config.remote_address[1]
        self._floated = False
        self._next_msgid = 0
        self._out: _Outstanding | None = None
        self._send_queue: list[tuple[bytes, int]] = []
        self._events: deque[Event] = deque()
        self._init_request = b""
        self._init_response = b""
        self._sk: c.SkCodec | None = None
        self._keys: c.IkeKeys | None = None
        self._suite: c.CipherSuite | None = None
        self._nonce_r = b""
        self._childless_supported = False
        self._child_spis: list[bytes] = []  # CHILD_SAs the responder holds: deleted first
        self._esp_offers: tuple[p.Proposal, ...] = ()  # of the CHILD_SA being negotiated
        self._child_nonce = b""  # our nonce of the outstanding CREATE_CHILD_SA
        self.sa_init_answered = False  # the responder holds state for us from here on
        self._auth_answered = False  # it answered IKE_AUTH: it either dropped the SA or set it up
        self._established = False  # the responder holds an established IKE SA for us
        self.dropped = 0  # datagrams that were not IKE for us (garbage, foreign SPI, bad ICV)

    # --- public API ---------------------------------------------------------------------------
    def start(self, now: float) -> None:
        if self.state is not State.IDLE:
            raise RuntimeError("start() called twice")
        self.state = State.INIT_SENT
        self._send_request(self._build_init(), now)

    def close(self, now: float) -> None:
        """Delete the IKE SA (and with it any CHILD_SA) if the responder holds one."""
        if self._established and self.state in (State.ESTABLISHED, State.FAILED,
                                                State.CHILD_SENT):
            self.state = State.DELETE_SENT
            self._send_next_delete(now)
            return
        if self.state not in (State.CLOSED, State.FAILED, State.DELETE_SENT):
            self.state = State.CLOSED
            self._out = None

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Feed one UDP payload from ``addr`` (from the NAT-T port: marker still on). Bad bytes
        never raise: what does not parse is dropped, as a real initiator would, and told as a
        :class:`BadDatagram` event."""
        if addr[1] != self.config.remote_address[1]:  # the NAT-T port
            if data[:4] != NON_ESP_MARKER:
                self._events.append(EspPacket(data))
                return
            data = data[4:]
        try:
            header, payloads = p.decode_message(data)
        except p.IKEv2Error as exc:
            self._drop(f"not an IKE message: {exc}")
            return
        if header.spi_i != self.spi_i:
            self._drop("an IKE message for another SA")
            return
        if not header.is_response:
            self._answer_peer_request(header, payloads, data, now)
            return
        out = self._out
        if out is None or header.message_id != out.message_id:
            return  # a late duplicate of an answered request
        if header.exchange == p.ExchangeType.IKE_SA_INIT and self.state is State.INIT_SENT:
            try:
                self._on_init_response(header, payloads, data, now)
            except p.IKEv2Error as exc:  # the responder's answer, parsed, but unacceptable
                self._fail(Failure.BAD_PACKET, str(exc))
            return
        if header.exchange not in (p.ExchangeType.IKE_AUTH, p.ExchangeType.INFORMATIONAL,
                                   p.ExchangeType.CREATE_CHILD_SA):
            return
        try:
            inner = self._open(data, payloads)
        except p.IKEv2Error as exc:
            self._drop(f"fails integrity: {exc}")
            return  # not from the responder (§2.21): keep retransmitting
        if header.exchange == p.ExchangeType.IKE_AUTH and self.state is State.AUTH_SENT:
            try:
                self._on_auth_response(header, inner, now)
            except p.IKEv2Error as exc:
                self._fail(Failure.BAD_PACKET, str(exc))
        elif (header.exchange == p.ExchangeType.CREATE_CHILD_SA
              and self.state is State.CHILD_SENT):
            self._on_create_child_response(inner)
        elif header.exchange == p.ExchangeType.INFORMATIONAL and self.state is State.DELETE_SENT:
            self._out = None
            self._next_msgid += 1
            self._send_next_delete(now)

    def _drop(self, why: str) -> None:
        self.dropped += 1
        self._events.append(BadDatagram(why))

    def handle_timer(self, now: float) -> None:
        out = self._out
        if out is None or now < out.next_send:
            return
        if out.sends >= self.config.retransmit_tries:
            self._out = None
            if self.state is State.DELETE_SENT:
                self.state = State.CLOSED
                self._events.append(Closed(acknowledged=False))
            else:
                what = {State.INIT_SENT: "IKE_SA_INIT", State.AUTH_SENT: "IKE_AUTH",
                        State.CHILD_SENT: "CREATE_CHILD_SA"}.get(self.state, "request")
                self._fail(Failure.TIMEOUT, f"no answer to {what} after {out.sends} sends")
            return
        self._transmit(out, now)

    def get_timer(self) -> float | None:
        return None if self._out is None else self._out.next_send

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        del now  # sending is decided by the timer
        queued, self._send_queue = self._send_queue, []
        host = self.config.remote_address[0]
        return [(data, (host, port)) for data, port in queued]

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def remote_port(self) -> int:
        return self._port

    @property
    def floated(self) -> bool:
        return self._floated

    @property
    def half_open(self) -> bool:
        """The responder keeps a half-open IKE SA for us that nothing will clean up early."""
        return self.sa_init_answered and not self._auth_answered

    @property
    def established(self) -> bool:
        return self._established

    # --- messages -----------------------------------------------------------------------------

    def _build_init(self) -> bytes:
        cfg = self.config
        zero_spi = bytes(SPI_LEN)
        local_ip = ipaddress.ip_address(cfg.local_address[0]).packed
        remote_ip = ipaddress.ip_address(cfg.remote_address[0]).packed
        local_port = cfg.local_address[1]
        if cfg.force_nat_t:
            local_port ^= 0xFFFF  # a hash that cannot match: the responder sees us "behind NAT"
        payloads: list[p.Payload] = []
        if self._cookie is not None:
            payloads.append(p.NotifyPayload(p.NotifyType.COOKIE, self._cookie))
        payloads += [
            p.SAPayload(cfg.proposals),
            p.KEPayload(self._ke.group, self._ke.public),
            p.NoncePayload(self.nonce_i),
            p.NotifyPayload(p.NotifyType.NAT_DETECTION_SOURCE_IP,
                            c.nat_detection_hash(self.spi_i, zero_spi, local_ip, local_port)),
            p.NotifyPayload(p.NotifyType.NAT_DETECTION_DESTINATION_IP,
                            c.nat_detection_hash(self.spi_i, zero_spi, remote_ip,
                                                 cfg.remote_address[1])),
        ]
        if cfg.trusted_ca_hashes:  # RFC 7427: lets the responder sign with SHA-2
            payloads.append(p.NotifyPayload(p.NotifyType.SIGNATURE_HASH_ALGORITHMS,
                                            HASH_ALGORITHMS_NOTIFY))
        else:
            # The probe does not reassemble IKE fragments (RFC 7383). A PSK IKE_AUTH answer is
            # small; one with a certificate chain is not (an RSA leaf and its intermediate make
            # strongSwan send 1248-byte fragments), so a probe that asks for certificates does
            # not offer fragmentation and gets one IP-fragmented datagram instead.
            payloads.append(p.NotifyPayload(p.NotifyType.IKEV2_FRAGMENTATION_SUPPORTED))
        if any(t.type in ADDKE_TYPES for prop in cfg.proposals for t in prop.transforms):
            # RFC 9370 §2.2.2: offering additional key exchanges means speaking RFC 9242
            payloads.append(p.NotifyPayload(p.NotifyType.INTERMEDIATE_EXCHANGE_SUPPORTED))
        header = p.Header(self.spi_i, zero_spi, 0, p.ExchangeType.IKE_SA_INIT,
                          p.FLAG_INITIATOR, 0)
        self._init_request = p.encode_message(header, payloads)
        return self._init_request

    def _on_init_response(self, header: p.Header, payloads: list[p.Payload], raw: bytes,
                          now: float) -> None:
        cookie = p.find_notify(payloads, p.NotifyType.COOKIE)
        if cookie is not None:
            if self._cookie_rounds >= self.config.max_cookie_rounds:
                self._fail(Failure.ERROR_NOTIFY, "responder kept asking for a COOKIE",
                           p.NotifyType.COOKIE)
                return
            self._cookie_rounds += 1
            self._cookie = cookie.data
            self._events.append(InitRetried("cookie", self._ke.group))
            self._send_request(self._build_init(), now)
            return
        invalid_ke = p.find_notify(payloads, p.NotifyType.INVALID_KE_PAYLOAD)
        if invalid_ke is not None:
            wanted = int.from_bytes(invalid_ke.data[:2], "big") if len(invalid_ke.data) >= 2 \
                else -1
            if (wanted not in self._groups or wanted == self._ke.group
                    or self._ke_rounds >= self.config.max_ke_rounds):
                self._fail(Failure.INVALID_KE, f"responder wants DH group {wanted}",
                           p.NotifyType.INVALID_KE_PAYLOAD)
                return
            self._ke_rounds += 1
            self._ke = c.KeyExchange(wanted)
            self._events.append(InitRetried("invalid-ke", wanted))
            self._send_request(self._build_init(), now)
            return
        error = p.first_error_notify(payloads)
        if error is not None:
            if error.notify_type == p.NotifyType.NO_PROPOSAL_CHOSEN:
                self._fail(Failure.NO_PROPOSAL_CHOSEN, "responder shares no IKE proposal",
                           error.notify_type)
            else:
                self._fail(Failure.ERROR_NOTIFY, f"IKE_SA_INIT refused with {_notify_name(error)}",
                           error.notify_type)
            return
        sa = next((x for x in payloads if isinstance(x, p.SAPayload)), None)
        ke = next((x for x in payloads if isinstance(x, p.KEPayload)), None)
        nonce = next((x for x in payloads if isinstance(x, p.NoncePayload)), None)
        if sa is None or ke is None or nonce is None or len(sa.proposals) != 1:
            raise p.IKEv2Error("IKE_SA_INIT response lacks SA, KE or Nonce")
        if header.spi_r == bytes(SPI_LEN):
            raise p.IKEv2Error("IKE_SA_INIT response has a zero responder SPI")
        if not 16 <= len(nonce.data) <= 256:
            raise p.IKEv2Error(f"responder nonce of {len(nonce.data)} bytes")
        suite = chosen_suite(sa.proposals[0], self.config.proposals)
        if suite.group != self._ke.group or ke.group != self._ke.group:
            raise p.IKEv2Error("responder KE group differs from the one we sent")
        shared = self._ke.shared_secret(ke.data)
        self.sa_init_answered = True
        self.spi_r = header.spi_r
        self._init_response = raw
        self._nonce_r = nonce.data
        self._suite = suite
        self._keys = c.derive_ike_keys(suite, shared, nonce_i=self.nonce_i, nonce_r=nonce.data,
                                       spi_i=self.spi_i, spi_r=self.spi_r)
        self._sk = c.SkCodec(suite, self._keys, self._rand)
        self._out = None
        self._next_msgid = 1
        nat_local, nat_remote = self._nat_detected(payloads)
        if nat_local or nat_remote or self.config.force_nat_t:
            self._port = self.config.nat_t_port
            self._floated = True
        self._childless_supported = p.find_notify(
            payloads, p.NotifyType.CHILDLESS_IKEV2_SUPPORTED) is not None
        self._events.append(InitCompleted(
            suite, self.spi_r, nat_local, nat_remote, self._floated, self._childless_supported,
            p.find_notify(payloads, p.NotifyType.IKEV2_FRAGMENTATION_SUPPORTED) is not None,
            self._cookie_rounds, self._ke_rounds))
        if self.config.psk is None:
            self.state = State.INIT_DONE
            return
        if suite.additional:  # RFC 9370 wants IKE_INTERMEDIATE first: the probe stops here
            self._fail(Failure.ERROR_NOTIFY, "responder chose additional key exchanges "
                       f"{list(suite.additional)}; the probe does not run IKE_INTERMEDIATE")
            return
        self.state = State.AUTH_SENT
        self._send_request(self._build_auth(), now)

    def _nat_detected(self, payloads: list[p.Payload]) -> tuple[bool, bool]:
        """(we are NATed, the responder is NATed) from the responder's NAT-D notifies (§2.23)."""
        cfg = self.config
        local_ip = ipaddress.ip_address(cfg.local_address[0]).packed
        remote_ip = ipaddress.ip_address(cfg.remote_address[0]).packed
        src = [x.data for x in payloads if isinstance(x, p.NotifyPayload)
               and x.notify_type == p.NotifyType.NAT_DETECTION_SOURCE_IP]
        dst = [x.data for x in payloads if isinstance(x, p.NotifyPayload)
               and x.notify_type == p.NotifyType.NAT_DETECTION_DESTINATION_IP]
        if not src and not dst:
            return False, False
        ours = c.nat_detection_hash(self.spi_i, self.spi_r, local_ip, cfg.local_address[1])
        theirs = c.nat_detection_hash(self.spi_i, self.spi_r, remote_ip, cfg.remote_address[1])
        return bool(dst) and ours not in dst, bool(src) and theirs not in src

    def _build_auth(self) -> bytes:
        cfg = self.config
        assert self._keys is not None and self._suite is not None and cfg.psk is not None
        id_i = _id_payload(p.PayloadType.IDI, cfg.local_id)
        auth = c.psk_auth(self._suite.prf_hash, cfg.psk, message=self._init_request,
                          nonce_peer=self._nonce_r, sk_p=self._keys.sk_pi, id_body=id_i.body())
        inner: list[p.Payload] = [id_i]
        if cfg.trusted_ca_hashes:
            inner.append(p.CertPayload(p.PayloadType.CERTREQ, p.CERT_X509_SIGNATURE,
                                       b"".join(cfg.trusted_ca_hashes)))
        if cfg.remote_id is not None:
            inner.append(_id_payload(p.PayloadType.IDR, cfg.remote_id))
        inner.append(p.AuthPayload(p.AuthMethod.PSK, auth))
        child = cfg.child
        if child is not None and child.in_create_child:
            # its own exchange later; IKE_AUTH carries a plain one only if it must have one
            child = None if self._childless_supported else ChildRequest(
                ts_i=child.ts_i, ts_r=child.ts_r)
        elif child is None and not self._childless_supported:
            child = ChildRequest()
        if child is not None:
            if child.request_config:
                inner.append(p.ConfigPayload(p.ConfigType.REQUEST, (
                    (p.ConfigAttribute.INTERNAL_IP4_ADDRESS, b""),
                    (p.ConfigAttribute.INTERNAL_IP4_DNS, b""))))
            inner += self._child_offer(child)
        return self._build_encrypted(p.ExchangeType.IKE_AUTH, inner)

    def _child_offer(self, child: ChildRequest) -> list[p.Payload]:
        """SA and traffic selectors of a new CHILD_SA; our SPI is remembered for its Delete."""
        spi = self._rand(4)
        self._child_spis.append(spi)
        self._esp_offers = parse_esp_proposals(child.esp_proposal, spi,
                                               aead_only=child.aead_only)
        return [
            p.SAPayload(self._esp_offers),
            p.TSPayload(p.PayloadType.TSI, tuple(p.TrafficSelector.network(x)
                                                 for x in child.ts_i)),
            p.TSPayload(p.PayloadType.TSR, tuple(p.TrafficSelector.network(x)
                                                 for x in child.ts_r)),
        ]

    def _send_create_child(self, child: ChildRequest, now: float) -> None:
        """§1.3.1: SA, Ni, TSi, TSr and no KE payload (no PFS)."""
        self.state = State.CHILD_SENT
        self._child_nonce = self._rand(NONCE_LEN)
        offer = self._child_offer(child)
        inner = [offer[0], p.NoncePayload(self._child_nonce), *offer[1:]]
        self._send_request(self._build_encrypted(p.ExchangeType.CREATE_CHILD_SA, inner), now)

    def _on_create_child_response(self, inner: list[p.Payload]) -> None:
        self._out = None
        self._next_msgid += 1
        self.state = State.ESTABLISHED
        nonce = next((x for x in inner if isinstance(x, p.NoncePayload)), None)
        refused = p.first_error_notify(inner) is not None
        child, error = None, ""
        if not refused and nonce is None:
            error = "CREATE_CHILD_SA answer lacks a nonce"
        elif not refused and any(isinstance(x, p.KEPayload) for x in inner):
            error = "CREATE_CHILD_SA answer has a KE payload though we sent none"
        else:
            child, error = self._child_from(inner, self._child_nonce,
                                            b"" if nonce is None else nonce.data)
        if child is None:
            self._child_spis.pop()  # refused: nothing to delete on the responder
        self._events.append(ChildCreated(child, error, refused))

    def _build_encrypted(self, exchange: int, inner: list[p.Payload], *, response: bool = False,
                         message_id: int | None = None) -> bytes:
        assert self._sk is not None
        first, plaintext = p.encode_chain(inner)
        body_len = self._sk.sealed_length(len(plaintext))
        msgid = self._next_msgid if message_id is None else message_id
        flags = p.FLAG_INITIATOR | (p.FLAG_RESPONSE if response else 0)
        header = p.Header(self.spi_i, self.spi_r, p.PayloadType.SK, exchange, flags, msgid)
        total = p.HEADER_LEN + 4 + body_len
        prefix = header.encode(p.PayloadType.SK, total) + bytes([first, 0]) \
            + (4 + body_len).to_bytes(2, "big")
        return prefix + self._sk.seal(prefix, plaintext)

    def _open(self, raw: bytes, payloads: list[p.Payload]) -> list[p.Payload]:
        if self._sk is None or len(payloads) != 1 or not isinstance(payloads[-1],
                                                                    p.EncryptedPayload):
            raise p.IKEv2Error("expected a message with only an Encrypted payload")
        sk = payloads[-1]
        prefix_len = len(raw) - len(sk.body_bytes)
        return p.decode_chain(sk.inner_first, self._sk.open(raw[:prefix_len], sk.body_bytes))

    def _on_auth_response(self, header: p.Header, inner: list[p.Payload], now: float) -> None:
        del header
        cfg = self.config
        assert self._keys is not None and self._suite is not None and cfg.psk is not None
        self._out = None
        self._next_msgid = 2
        self._auth_answered = True
        id_r = next((x for x in inner if isinstance(x, p.IdPayload)
                     and x.type == p.PayloadType.IDR), None)
        auth = next((x for x in inner if isinstance(x, p.AuthPayload)), None)
        if id_r is None or auth is None:
            error = p.first_error_notify(inner)
            if error is not None and error.notify_type == p.NotifyType.AUTHENTICATION_FAILED:
                self._fail(Failure.AUTH_FAILED, "responder sent AUTHENTICATION_FAILED",
                           error.notify_type)
            elif error is not None:
                self._fail(Failure.ERROR_NOTIFY, f"IKE_AUTH refused with {_notify_name(error)}",
                           error.notify_type)
            else:
                self._fail(Failure.BAD_PACKET, "IKE_AUTH response lacks IDr or AUTH")
            return
        # From here the responder considers the IKE SA established, whatever we think of it.
        self._established = True
        certificates = tuple(x.data for x in inner if isinstance(x, p.CertPayload)
                             and x.type == p.PayloadType.CERT
                             and x.encoding == p.CERT_X509_SIGNATURE)
        problem = self._responder_auth_problem(id_r, auth, certificates)
        if problem:
            self._fail(Failure.AUTH_FAILED, problem)
            return
        responder_id = _id_text(id_r)
        if cfg.remote_id is not None and responder_id != cfg.remote_id:
            self._fail(Failure.AUTH_FAILED, f"responder identified as {responder_id!r}")
            return
        self.state = State.ESTABLISHED
        if auth.method == p.AuthMethod.PSK:
            certificates = ()
        reply = next((x for x in inner if isinstance(x, p.ConfigPayload)
                      and x.cfg_type == p.ConfigType.REPLY), None)
        assigned = reply.ipv4(p.ConfigAttribute.INTERNAL_IP4_ADDRESS) if reply else ()
        dns = reply.ipv4(p.ConfigAttribute.INTERNAL_IP4_DNS) if reply else ()
        if not self._esp_offers:
            self._events.append(AuthCompleted(responder_id, childless=True, child=None,
                                              certificates=certificates))
        else:
            child, error_text = self._child_from(inner, self.nonce_i, self._nonce_r)
            if child is None:
                self._child_spis.clear()  # nothing to delete on the responder
            self._events.append(AuthCompleted(
                responder_id, childless=False, child=child, child_error=error_text,
                certificates=certificates, internal_address=assigned[0] if assigned else None,
                internal_dns=dns))
        if cfg.child is not None and cfg.child.in_create_child:
            self._send_create_child(cfg.child, now)

    def _responder_auth_problem(self, id_r: p.IdPayload, auth: p.AuthPayload,
                                certificates: tuple[bytes, ...]) -> str:
        """Why the responder's AUTH does not prove who it claims to be ("" when it does): the
        PSK's MAC, or a signature by its certificate's key over the same octets (§2.15)."""
        assert self._keys is not None and self._suite is not None
        h = self._suite.prf_hash
        if auth.method == p.AuthMethod.PSK:
            assert self.config.psk is not None
            expected = c.psk_auth(h, self.config.psk, message=self._init_response,
                                  nonce_peer=self.nonce_i, sk_p=self._keys.sk_pr,
                                  id_body=id_r.body())
            return "" if _equal(auth.data, expected) else "responder AUTH payload did not verify"
        if auth.method not in SIGNATURE_METHODS:
            return f"responder authenticates with AUTH method {auth.method}"
        if not certificates:
            return ("responder signs its AUTH but sent no certificate (without a ca_file the "
                    "probe sends no CERTREQ, and strongSwan sends certificates only when asked)")
        octets = signed_octets(self._init_response, self.nonce_i,
                               c.prf(h, self._keys.sk_pr, id_r.body()))
        try:
            verify_auth(auth.method, auth.data, octets, certificates[0])
            if not identity_in_certificate(id_r, certificates[0]):
                return (f"responder identity {_id_text(id_r)!r} is not its certificate's "
                        "(subject or subjectAltName)")
        except p.IKEv2Error as exc:
            return str(exc)
        return ""

    def _child_from(self, inner: list[p.Payload], nonce_i: bytes,
                    nonce_r: bytes) -> tuple[ChildSa | None, str]:
        """The CHILD_SA the responder set up for ``self._esp_offers``; keys from the nonces of
        the exchange that made it (§2.17, no PFS)."""
        assert self._keys is not None and self._suite is not None
        error = p.first_error_notify(inner)
        if error is not None:
            return None, _notify_name(error)
        sa = next((x for x in inner if isinstance(x, p.SAPayload)), None)
        ts_i = next((x for x in inner if isinstance(x, p.TSPayload)
                     and x.type == p.PayloadType.TSI), None)
        ts_r = next((x for x in inner if isinstance(x, p.TSPayload)
                     and x.type == p.PayloadType.TSR), None)
        if sa is None or ts_i is None or ts_r is None or len(sa.proposals) != 1:
            return None, "CHILD_SA answer lacks SA or traffic selectors"
        try:
            offer = next((o for o in self._esp_offers if o.number == sa.proposals[0].number),
                         None)
            if offer is None:
                return None, f"the responder chose ESP proposal #{sa.proposals[0].number}, " \
                             "which was not offered"
            chosen = chosen_esp(sa.proposals[0], offer)
            if chosen.transform(p.TransformType.DH) is not None:
                return None, "the responder chose a DH group for a CHILD_SA without a KE"
            encr = chosen.transform(p.TransformType.ENCR)
            if encr is None or encr.id not in c.AEAD_CIPHERS:
                return ChildSa(None, ts_i.selectors, ts_r.selectors, chosen), ""
            key_bytes = chosen_esp_key_bytes(chosen, offer)
        except p.IKEv2Error as exc:
            return None, str(exc)
        size = key_bytes + c.GCM_SALT_LEN
        keymat = c.child_keymat(self._suite.prf_hash, self._keys.sk_d, nonce_i, nonce_r, 2 * size)
        esp = EspSa(spi_out=sa.proposals[0].spi, key_out=keymat[:size], spi_in=offer.spi,
                    key_in=keymat[size:], random_bytes=self._rand)
        return ChildSa(esp, ts_i.selectors, ts_r.selectors, chosen), ""

    def _answer_peer_request(self, header: p.Header, payloads: list[p.Payload], raw: bytes,
                             now: float) -> None:
        """The responder may ask us things (liveness checks, its own Delete): answer with an empty
        INFORMATIONAL response, as §1.4 requires, or it will retransmit and then give up on us."""
        del now
        if self._sk is None or header.exchange != p.ExchangeType.INFORMATIONAL:
            return
        try:
            inner = self._open(raw, payloads)
        except p.IKEv2Error:
            return
        self._send_queue.append(self._frame(self._build_encrypted(
            p.ExchangeType.INFORMATIONAL, [], response=True, message_id=header.message_id)))
        if any(isinstance(x, p.DeletePayload) and x.protocol == p.ProtocolId.IKE for x in inner):
            self._out = None
            self._established = False
            if self.state not in (State.CLOSED, State.FAILED):
                self.state = State.CLOSED
                self._events.append(Closed(acknowledged=True, by_responder=True))

    def _send_next_delete(self, now: float) -> None:
        """The CHILD_SA first, then the IKE SA, one exchange each: strongSwan acts on only one of
        two Delete payloads sent in one INFORMATIONAL (seen with 5.9.8)."""
        if self._child_spis:
            delete = p.DeletePayload(p.ProtocolId.ESP, (self._child_spis.pop(),))
        elif self._established:
            delete = p.DeletePayload(p.ProtocolId.IKE)
            self._established = False
        else:
            self.state = State.CLOSED
            self._events.append(Closed(acknowledged=True))
            return
        self._send_request(self._build_encrypted(p.ExchangeType.INFORMATIONAL, [delete]), now)

    # --- plumbing -----------------------------------------------------------------------------
    def _frame(self, message: bytes) -> tuple[bytes, int]:
        if self._floated:
            return NON_ESP_MARKER + message, self._port
        return message, self._port

    def _send_request(self, message: bytes, now: float) -> None:
        out = _Outstanding(self._next_msgid, *self._frame(message))
        self._out = out
        self._transmit(out, now)

    def _transmit(self, out: _Outstanding, now: float) -> None:
        self._send_queue.append((out.datagram, out.port))
        initial = self.config.delete_retransmit_initial if self.state is State.DELETE_SENT \
            else self.config.retransmit_initial
        out.next_send = now + initial * self.config.retransmit_factor ** out.sends
        out.sends += 1

    def _fail(self, failure: Failure, detail: str, notify: int | None = None) -> None:
        self._out = None
        self.state = State.FAILED
        self._events.append(Failed(failure, detail, notify, established=self._established))


def _notify_name(notify: p.NotifyPayload) -> str:
    try:
        return p.NotifyType(notify.notify_type).name
    except ValueError:
        return f"notify {notify.notify_type}"


def _equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


__all__ = ["AuthCompleted", "ChildCreated", "ChildRequest", "ChildSa", "Closed", "Event",
           "Failed", "Failure", "InitCompleted", "InitRetried", "Initiator", "InitiatorConfig",
           "State"]
