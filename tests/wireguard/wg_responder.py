"""A minimal in-memory WireGuard responder for unit tests and the benchmark.

Written from the protocol description (the WireGuard paper, section 5.4), independently of the
initiator's control flow: it checks mac1/mac2, the timestamp rule and the Noise transcript, and it
answers with a response, a cookie reply when "under load", or transport data. The primitives
(BLAKE2s, HKDF, ChaCha20-Poly1305) are shared with the core; the real interop proof is the lab test
against wireguard-go.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from nacl import bindings as sodium

from probes.protocols import wireguard as wg


@dataclass
class Responder:
    private_key: bytes
    peer_public_key: bytes
    preshared_key: bytes | None = None
    under_load: bool = False
    cookie_secret: bytes = field(default_factory=lambda: os.urandom(32))
    source: bytes = b"198.51.100.7:40000"  # what the cookie binds to
    last_timestamp: bytes = b""
    send_key: bytes = b""
    receive_key: bytes = b""
    local_index: int = 0x11223344
    remote_index: int = 0
    send_counter: int = 0
    cookies_sent: int = 0

    @property
    def public_key(self) -> bytes:
        return wg.public_key(self.private_key)

    def cookie(self) -> bytes:
        return wg.mac(self.cookie_secret, self.source)

    def handle(self, data: bytes) -> bytes | None:
        """Answer one datagram; None means 'silently dropped', like the real server."""
        if data[0] == wg.MESSAGE_INITIATION:
            return self._initiation(data)
        if data[0] == wg.MESSAGE_TRANSPORT:
            return self._transport(data)
        return None

    def _initiation(self, msg: bytes) -> bytes | None:
        if len(msg) != wg.INITIATION_SIZE:
            return None
        if wg.mac(wg.hash_(wg.LABEL_MAC1, self.public_key), msg[:116]) != msg[116:132]:
            return None
        if self.under_load and wg.mac(self.cookie(), msg[:132]) != msg[132:148]:
            return self._cookie_reply(msg)
        sender = struct.unpack_from("<I", msg, 4)[0]
        ephemeral = msg[8:40]
        c = wg.INITIAL_CHAINING_KEY
        h = wg.hash_(wg.INITIAL_HASH, self.public_key)
        h = wg.hash_(h, ephemeral)
        (c,) = wg.kdf(c, ephemeral, 1)
        c, k = wg.kdf(c, wg.dh(self.private_key, ephemeral), 2)
        static = wg.aead_open(k, 0, msg[40:88], h)
        if static != self.peer_public_key:
            return None
        h = wg.hash_(h, msg[40:88])
        c, k = wg.kdf(c, wg.dh(self.private_key, static), 2)
        timestamp = wg.aead_open(k, 0, msg[88:116], h)
        h = wg.hash_(h, msg[88:116])
        if timestamp <= self.last_timestamp:
            return None  # replayed or stale: the server drops it
        self.last_timestamp = timestamp

        e_priv = os.urandom(32)
        e_pub = wg.public_key(e_priv)
        header = struct.pack("<B3xII", wg.MESSAGE_RESPONSE, self.local_index, sender) + e_pub
        (c,) = wg.kdf(c, e_pub, 1)
        h = wg.hash_(h, e_pub)
        (c,) = wg.kdf(c, wg.dh(e_priv, ephemeral), 1)
        (c,) = wg.kdf(c, wg.dh(e_priv, static), 1)
        c, tau, k = wg.kdf(c, self.preshared_key or bytes(32), 3)
        h = wg.hash_(h, tau)
        empty = wg.aead_seal(k, 0, b"", h)
        body = header + empty
        mac1 = wg.mac(wg.hash_(wg.LABEL_MAC1, static), body)
        self.receive_key, self.send_key = wg.kdf(c, b"", 2)
        self.remote_index = sender
        self.send_counter = 0
        return body + mac1 + bytes(16)

    def _cookie_reply(self, msg: bytes) -> bytes:
        self.cookies_sent += 1
        nonce = os.urandom(24)
        key = wg.hash_(wg.LABEL_COOKIE, self.public_key)
        sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
            self.cookie(), msg[116:132], nonce, key)
        return struct.pack("<B3xI", wg.MESSAGE_COOKIE_REPLY, struct.unpack_from("<I", msg, 4)[0]) \
            + nonce + sealed

    def _transport(self, msg: bytes) -> bytes | None:
        counter = struct.unpack_from("<Q", msg, 8)[0]
        plain = wg.aead_open(self.receive_key, counter, msg[16:], b"")
        if not plain:
            return None  # keepalive
        return self.seal(plain)

    def seal(self, plain: bytes) -> bytes:
        """Encrypt ``plain`` (already padded or not) towards the initiator."""
        padded = plain + bytes(-len(plain) % 16)
        out = struct.pack("<B3xIQ", wg.MESSAGE_TRANSPORT, self.remote_index, self.send_counter) \
            + wg.aead_seal(self.send_key, self.send_counter, padded, b"")
        self.send_counter += 1
        return out
