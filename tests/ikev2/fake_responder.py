"""A small in-memory IKEv2 PSK responder for the initiator's unit tests.

It reuses the codec and crypto under test, so it proves the state machine (retries, timers,
message ids, failure paths), not the wire format: the lab tests against strongSwan do that.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from probes.protocols.ikev2 import crypto as c
from probes.protocols.ikev2 import payloads as p
from probes.protocols.ikev2.proposals import chosen_suite, parse_ike_proposal

ZERO = bytes(8)


@dataclass
class FakeResponder:
    psk: bytes = b"secret"
    proposal: str = "aes256gcm16-prfsha256-ecp256"
    responder_id: str = "node.test"
    address: tuple[str, int] = ("192.0.2.1", 500)
    peer: tuple[str, int] = ("198.51.100.7", 40000)  # the initiator, as we see it
    demand_cookie: bool = False
    refuse_child: bool = False
    childless: bool = True
    wrong_auth: bool = False  # sign with another PSK: the initiator must catch it
    behind_nat: bool = False  # fake our own NAT-D source (as strongSwan with kernel-libipsec)
    require_pfs: bool = False  # refuse a CREATE_CHILD_SA whose proposals carry no DH group
    # a hostile answer to CREATE_CHILD_SA: "no-nonce", "with-ke", "unoffered", "two-proposals"
    hostile_child: str = ""
    created: int = 0  # CHILD_SAs made by CREATE_CHILD_SA
    # a CP request is answered with this inner address and these resolvers (a pool)
    assign: tuple[str, tuple[str, ...]] = ("10.9.0.7", ("10.9.0.53",))
    seen: list[p.Header] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)  # protocol ids of Delete payloads received
    _spi_r: bytes = b""
    _sk: c.SkCodec | None = None
    _keys: c.IkeKeys | None = None
    _suite: c.CipherSuite | None = None
    _init_response: bytes = b""
    _nonce_i: bytes = b""
    _nonce_r: bytes = b""
    _request: bytes = b""
    _answered: dict[bytes, bytes | None] = field(default_factory=dict)

    def handle(self, datagram: bytes) -> bytes | None:
        data = datagram[4:] if datagram[:4] == bytes(4) else datagram
        # a retransmitted request gets the same answer again (RFC 7296 §2.1), as from a real
        # responder: a loaded test machine retransmits, and a new SA per copy is not IKE
        if data in self._answered:
            return self._answered[data]
        answer = self._handle(data)
        self._answered[data] = answer
        return answer

    def _handle(self, data: bytes) -> bytes | None:
        header, payloads = p.decode_message(data)
        self.seen.append(header)
        if header.exchange == p.ExchangeType.IKE_SA_INIT:
            return self._init(header, payloads, data)
        return self._encrypted(header, payloads, data)

    def _reply(self, header: p.Header, payloads: list[p.Payload], spi_r: bytes = ZERO) -> bytes:
        h = p.Header(header.spi_i, spi_r, 0, header.exchange, p.FLAG_RESPONSE, header.message_id)
        return p.encode_message(h, payloads)

    def _init(self, header: p.Header, payloads: list[p.Payload], raw: bytes) -> bytes:
        mine = parse_ike_proposal(self.proposal, 1)
        group = next(t.id for t in mine.transforms if t.type == p.TransformType.DH)
        cookie = p.find_notify(payloads, p.NotifyType.COOKIE)
        if self.demand_cookie and (cookie is None or cookie.data != b"cookie-" + header.spi_i):
            return self._reply(header, [p.NotifyPayload(p.NotifyType.COOKIE,
                                                        b"cookie-" + header.spi_i)])
        sa = next(x for x in payloads if isinstance(x, p.SAPayload))
        chosen = next((pr for pr in sa.proposals if all(
            any(t == o for o in pr.transforms) for t in mine.transforms)), None)
        if chosen is None:
            return self._reply(header, [p.NotifyPayload(p.NotifyType.NO_PROPOSAL_CHOSEN)])
        ke = next(x for x in payloads if isinstance(x, p.KEPayload))
        if ke.group != group:
            return self._reply(header, [p.NotifyPayload(p.NotifyType.INVALID_KE_PAYLOAD,
                                                        group.to_bytes(2, "big"))])
        self._suite = chosen_suite(p.Proposal(1, p.ProtocolId.IKE, mine.transforms),
                                   (chosen,))
        self._spi_r = os.urandom(8)
        self._nonce_i = next(x for x in payloads if isinstance(x, p.NoncePayload)).data
        self._nonce_r = os.urandom(32)
        own = c.KeyExchange(group)
        keys = c.derive_ike_keys(self._suite, own.shared_secret(ke.data), nonce_i=self._nonce_i,
                                 nonce_r=self._nonce_r, spi_i=header.spi_i, spi_r=self._spi_r)
        # the responder's codec: swap directions
        self._keys = keys
        self._sk = c.SkCodec(self._suite, c.IkeKeys(keys.sk_d, keys.sk_ar, keys.sk_ai,
                                                    keys.sk_er, keys.sk_ei, keys.sk_pr,
                                                    keys.sk_pi), os.urandom)
        self._request = raw
        src_port = self.address[1] + (1 if self.behind_nat else 0)
        out: list[p.Payload] = [
            p.SAPayload((p.Proposal(1, p.ProtocolId.IKE, mine.transforms),)),
            p.KEPayload(group, own.public), p.NoncePayload(self._nonce_r),
            p.NotifyPayload(p.NotifyType.NAT_DETECTION_SOURCE_IP, c.nat_detection_hash(
                header.spi_i, self._spi_r, ipaddress.ip_address(self.address[0]).packed,
                src_port)),
            p.NotifyPayload(p.NotifyType.NAT_DETECTION_DESTINATION_IP, c.nat_detection_hash(
                header.spi_i, self._spi_r, ipaddress.ip_address(self.peer[0]).packed,
                self.peer[1])),
        ]
        if self.childless:
            out.append(p.NotifyPayload(p.NotifyType.CHILDLESS_IKEV2_SUPPORTED))
        self._init_response = self._reply(header, out, self._spi_r)
        return self._init_response

    def _seal(self, header: p.Header, inner: list[p.Payload]) -> bytes:
        assert self._sk is not None
        first, plaintext = p.encode_chain(inner)
        body_len = self._sk.sealed_length(len(plaintext))
        h = p.Header(header.spi_i, self._spi_r, 0, header.exchange, p.FLAG_RESPONSE,
                     header.message_id)
        prefix = h.encode(p.PayloadType.SK, p.HEADER_LEN + 4 + body_len) \
            + bytes([first, 0]) + (4 + body_len).to_bytes(2, "big")
        return prefix + self._sk.seal(prefix, plaintext)

    def _encrypted(self, header: p.Header, payloads: list[p.Payload], raw: bytes) -> bytes:
        assert self._sk is not None and self._suite is not None and self._keys is not None
        sk = payloads[0]
        assert isinstance(sk, p.EncryptedPayload)
        inner = p.decode_chain(sk.inner_first,
                               self._sk.open(raw[:len(raw) - len(sk.body_bytes)], sk.body_bytes))
        if header.exchange == p.ExchangeType.INFORMATIONAL:
            self.deleted += [x.protocol for x in inner if isinstance(x, p.DeletePayload)]
            return self._seal(header, [])
        if header.exchange == p.ExchangeType.CREATE_CHILD_SA:
            return self._seal(header, self._create_child(inner))
        id_i = next(x for x in inner if isinstance(x, p.IdPayload) and x.type == p.PayloadType.IDI)
        auth = next(x for x in inner if isinstance(x, p.AuthPayload))
        h = self._suite.prf_hash
        expect = c.psk_auth(h, self.psk, message=self._request, nonce_peer=self._nonce_r,
                            sk_p=self._keys.sk_pi, id_body=id_i.body())
        if auth.data != expect:
            return self._seal(header, [p.NotifyPayload(p.NotifyType.AUTHENTICATION_FAILED)])
        id_r = p.IdPayload(p.PayloadType.IDR, p.IdType.FQDN, self.responder_id.encode())
        psk = b"not-" + self.psk if self.wrong_auth else self.psk
        mine = c.psk_auth(h, psk, message=self._init_response, nonce_peer=self._nonce_i,
                          sk_p=self._keys.sk_pr, id_body=id_r.body())
        out: list[p.Payload] = [id_r, p.AuthPayload(p.AuthMethod.PSK, mine)]
        if any(isinstance(x, p.ConfigPayload) and x.cfg_type == p.ConfigType.REQUEST
               for x in inner):
            address, dns = self.assign
            out.append(p.ConfigPayload(p.ConfigType.REPLY, (
                (p.ConfigAttribute.INTERNAL_IP4_ADDRESS, ipaddress.IPv4Address(address).packed),
                *((p.ConfigAttribute.INTERNAL_IP4_DNS, ipaddress.IPv4Address(a).packed)
                  for a in dns))))
        child = next((x for x in inner if isinstance(x, p.SAPayload)), None)
        if child is not None:
            if self.refuse_child:
                out.append(p.NotifyPayload(p.NotifyType.NO_PROPOSAL_CHOSEN))
            else:
                out += self._child_answer(child.proposals[0])
        return self._seal(header, out)

    @staticmethod
    def _child_answer(offer: p.Proposal) -> list[p.Payload]:
        """The first cipher of ``offer`` (and its ESN transform): an AEAD one in every offer the
        tests make, so no integrity algorithm is needed."""
        return [
            p.SAPayload((p.Proposal(offer.number, p.ProtocolId.ESP,
                                    (offer.transforms[0], offer.transforms[-1]),
                                    b"\x11\x22\x33\x44"),)),
            p.TSPayload(p.PayloadType.TSI, (p.TrafficSelector.network("10.9.0.0/16"),)),
            p.TSPayload(p.PayloadType.TSR, (p.TrafficSelector.network("10.8.0.1/32"),)),
        ]

    def _create_child(self, inner: list[p.Payload]) -> list[p.Payload]:
        sa = next(x for x in inner if isinstance(x, p.SAPayload))
        with_ke = any(isinstance(x, p.KEPayload) for x in inner)
        if self.require_pfs and not with_ke:
            return [p.NotifyPayload(p.NotifyType.NO_PROPOSAL_CHOSEN)]
        self.created += 1
        answer = self._child_answer(sa.proposals[0])
        nonce: list[p.Payload] = [p.NoncePayload(os.urandom(32))]
        if self.hostile_child == "no-nonce":
            nonce = []
        elif self.hostile_child == "with-ke":
            nonce.append(p.KEPayload(19, os.urandom(64)))
        elif self.hostile_child == "unoffered":  # a proposal number we never sent
            chosen = answer[0]
            assert isinstance(chosen, p.SAPayload)
            answer[0] = p.SAPayload((p.Proposal(7, p.ProtocolId.ESP,
                                                chosen.proposals[0].transforms, b"spi!"),))
        elif self.hostile_child == "two-proposals":
            answer[0] = p.SAPayload(sa.proposals)
        return [answer[0], *nonce, *answer[1:]]
