"""ESP with AES-GCM-16 (RFC 4303, RFC 4106) in UDP encapsulation (RFC 3948), tunnel mode.

Only what the tunnel probe needs: seal an inner IPv4 packet, open the responder's packets, a
64-packet anti-replay window. No ESN: the probe sends a handful of packets per SA.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from probes.protocols.ikev2.crypto import GCM_ICV_LEN, GCM_IV_LEN, GCM_SALT_LEN, RandomBytes
from probes.protocols.ikev2.payloads import IKEv2Error

NEXT_HEADER_IPV4 = 4
NON_ESP_MARKER = b"\x00\x00\x00\x00"
NAT_KEEPALIVE = b"\xff"
REPLAY_WINDOW = 64
_ESP_HEADER = 8


@dataclass(slots=True)
class EspSa:
    """One CHILD_SA pair: ``spi_out``/``key_out`` towards the responder, ``*_in`` from it.
    Keys are AES key ‖ 4-byte salt."""

    spi_out: bytes
    key_out: bytes
    spi_in: bytes
    key_in: bytes
    random_bytes: RandomBytes
    seq_out: int = 0
    _highest_in: int = 0
    _seen: int = field(default=0)  # bitmap of the window below _highest_in

    def seal(self, inner: bytes, next_header: int = NEXT_HEADER_IPV4) -> bytes:
        """Returns the UDP payload (it starts with the non-zero SPI, so no marker)."""
        self.seq_out += 1
        header = self.spi_out + struct.pack("!I", self.seq_out)
        pad_len = (-(len(inner) + 2)) % 4
        plaintext = inner + bytes(range(1, pad_len + 1)) + bytes([pad_len, next_header])
        iv = self.random_bytes(GCM_IV_LEN)
        key, salt = self.key_out[:-GCM_SALT_LEN], self.key_out[-GCM_SALT_LEN:]
        return header + iv + AESGCM(key).encrypt(salt + iv, plaintext, header)

    def open(self, packet: bytes) -> tuple[int, bytes]:
        """Returns (next header, inner packet); raises IKEv2Error on anything unacceptable."""
        if len(packet) < _ESP_HEADER + GCM_IV_LEN + GCM_ICV_LEN + 2:
            raise IKEv2Error("ESP packet too short")
        if packet[:4] != self.spi_in:
            raise IKEv2Error("ESP packet for an unknown SPI")
        seq = struct.unpack_from("!I", packet, 4)[0]
        if seq == 0 or self._replayed(seq):
            raise IKEv2Error(f"ESP sequence number {seq} replayed or out of window")
        iv = packet[_ESP_HEADER:_ESP_HEADER + GCM_IV_LEN]
        key, salt = self.key_in[:-GCM_SALT_LEN], self.key_in[-GCM_SALT_LEN:]
        try:
            plaintext = AESGCM(key).decrypt(salt + iv, packet[_ESP_HEADER + GCM_IV_LEN:],
                                            packet[:_ESP_HEADER])
        except InvalidTag:
            raise IKEv2Error("ESP packet failed authentication") from None
        if len(plaintext) < 2 or plaintext[-2] + 2 > len(plaintext):
            raise IKEv2Error("ESP trailer is malformed")
        self._accept(seq)
        return plaintext[-1], plaintext[:-(plaintext[-2] + 2)]

    def _replayed(self, seq: int) -> bool:
        if seq > self._highest_in:
            return False
        behind = self._highest_in - seq
        return behind >= REPLAY_WINDOW or bool(self._seen >> behind & 1)

    def _accept(self, seq: int) -> None:
        if seq > self._highest_in:
            shift = seq - self._highest_in
            self._seen = ((self._seen << shift) | 1) & ((1 << REPLAY_WINDOW) - 1)
            self._highest_in = seq
        else:
            self._seen |= 1 << (self._highest_in - seq)


def classify_nat_t(datagram: bytes) -> tuple[str, bytes]:
    """Demultiplex UDP 4500 (RFC 3948 §2.2): ("ike", message), ("esp", packet) or
    ("keepalive", b""). Raises IKEv2Error for a datagram that is none of these."""
    if datagram == NAT_KEEPALIVE:
        return "keepalive", b""
    if len(datagram) < 4:
        raise IKEv2Error("UDP 4500 datagram too short")
    if datagram[:4] == NON_ESP_MARKER:
        return "ike", datagram[4:]
    return "esp", datagram
