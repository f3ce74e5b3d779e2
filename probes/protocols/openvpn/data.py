"""The data channel: DATA_V2 (and DATA_V1) packets sealed with AES-256-GCM or CHACHA20-POLY1305.

OpenVPN 2.6 AEAD layout (crypto.c ``openvpn_encrypt_aead``)::

    op<<3|key_id │ peer-id u24 │ packet-id u32 │ tag 16 │ ciphertext

IV = packet-id ‖ implicit IV (the first 8 bytes of the direction's HMAC key); the additional data
is ``op│peer-id│packet-id`` for DATA_V2 and just the packet-id for DATA_V1.
Key block: ``keys[0]`` = cipher [0:64] + hmac [64:128], ``keys[1]`` = [128:192] + [192:256];
the client sends with ``keys[0]`` (KEY_DIRECTION_NORMAL in ``generate_key_expansion``).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from probes.protocols.openvpn.keymethod import KEY2_LEN
from probes.protocols.openvpn.packet import Opcode, OpenVPNError, split_first_byte

# a keepalive ping inside the tunnel (ping.c), not an IP packet
PING_STRING = bytes.fromhex("2a187bf3641eb4cb07ed2d0a981fc748")
TAG_LEN = 16
SUPPORTED_CIPHERS = ("AES-256-GCM", "CHACHA20-POLY1305")

# compression framing bytes (comp.h, lzo.c, comp-lz4.c): we never compress, but a server set up
# for compression expects its framing on every packet and drops packets without it
NO_COMPRESS_BYTE = 0xFA
NO_COMPRESS_BYTE_SWAP = 0xFB
V2_INDICATOR = 0x50
V2_UNCOMPRESSED = 0x00


class Framing(enum.StrEnum):
    """How the plaintext is framed for compression (``--comp-lzo`` / ``--compress``)."""

    NONE = "none"
    LZO = "comp-lzo"  # --comp-lzo, --compress lzo: one prefix byte, 0xFA when not compressed
    SWAP = "compress"  # --compress [stub|lz4]: first byte moved to the end, 0xFB put first
    V2 = "compress-v2"  # --compress stub-v2|lz4-v2: only a leading 0x50 needs an escape


def frame(framing: Framing, payload: bytes) -> bytes:
    if framing == Framing.LZO:
        return bytes([NO_COMPRESS_BYTE]) + payload
    if framing == Framing.SWAP:
        if not payload:
            return bytes([NO_COMPRESS_BYTE_SWAP])
        return bytes([NO_COMPRESS_BYTE_SWAP]) + payload[1:] + payload[:1]
    if framing == Framing.V2 and payload[:1] == bytes([V2_INDICATOR]):
        return bytes([V2_INDICATOR, V2_UNCOMPRESSED]) + payload
    return payload


def unframe(framing: Framing, data: bytes) -> bytes:
    """The plaintext packet; :class:`OpenVPNError` if the peer compressed it (we cannot)."""
    if framing == Framing.NONE or not data:
        return data
    if framing == Framing.V2:
        if data[0] != V2_INDICATOR:
            return data
        if data[1:2] != bytes([V2_UNCOMPRESSED]):
            raise OpenVPNError("peer sent a compressed packet (v2 framing)")
        return data[2:]
    if data[0] == NO_COMPRESS_BYTE:
        return data[1:]
    if framing == Framing.SWAP and data[0] == NO_COMPRESS_BYTE_SWAP:
        return data[-1:] + data[1:-1] if len(data) > 1 else b""
    raise OpenVPNError(f"peer sent a compressed packet (framing byte {data[0]:#04x})")


@dataclass(slots=True)
class DataChannel:
    key2: bytes
    cipher: str
    peer_id: int | None  # None: DATA_V1
    key_id: int = 0
    server: bool = False  # True only for test peers
    framing: Framing = Framing.NONE
    next_packet_id: int = 1
    _seal: AESGCM | ChaCha20Poly1305 = field(init=False)
    _open: AESGCM | ChaCha20Poly1305 = field(init=False)
    _iv_out: bytes = field(init=False, default=b"")
    _iv_in: bytes = field(init=False, default=b"")

    def __post_init__(self) -> None:
        if len(self.key2) != KEY2_LEN:
            raise OpenVPNError("data-channel key block must be 256 bytes")
        name = self.cipher.upper()
        if name == "AES-256-GCM":
            make: type[AESGCM] | type[ChaCha20Poly1305] = AESGCM
        elif name == "CHACHA20-POLY1305":
            make = ChaCha20Poly1305
        else:
            raise OpenVPNError(f"data cipher {self.cipher!r} not supported")
        k0 = (self.key2[0:32], self.key2[64:72])
        k1 = (self.key2[128:160], self.key2[192:200])
        out, inn = (k1, k0) if self.server else (k0, k1)
        self._seal, self._iv_out = make(out[0]), out[1]
        self._open, self._iv_in = make(inn[0]), inn[1]

    def _header(self) -> bytes:
        if self.peer_id is None:
            return bytes([(Opcode.DATA_V1 << 3) | self.key_id])
        return struct.pack("!I", (((Opcode.DATA_V2 << 3) | self.key_id) << 24) | self.peer_id)

    def encrypt(self, plaintext: bytes) -> bytes:
        plaintext = frame(self.framing, plaintext)
        packet_id = struct.pack("!I", self.next_packet_id)
        self.next_packet_id += 1
        header = self._header()
        ad = header + packet_id if self.peer_id is not None else packet_id
        sealed = self._seal.encrypt(packet_id + self._iv_out, plaintext, ad)
        # the library appends the tag; OpenVPN 2.6 puts it before the ciphertext
        return header + packet_id + sealed[-TAG_LEN:] + sealed[:-TAG_LEN]

    def decrypt(self, packet: bytes) -> bytes:
        if not packet:
            raise OpenVPNError("empty data packet")
        opcode, _key_id = split_first_byte(packet[0])
        header_len = {Opcode.DATA_V2: 4, Opcode.DATA_V1: 1}.get(opcode)
        if header_len is None:
            raise OpenVPNError("not a data packet")
        if len(packet) < header_len + 4 + TAG_LEN:
            raise OpenVPNError("data packet too short")
        header = bytes(packet[:header_len])
        packet_id = bytes(packet[header_len:header_len + 4])
        tag = bytes(packet[header_len + 4:header_len + 4 + TAG_LEN])
        ciphertext = bytes(packet[header_len + 4 + TAG_LEN:])
        ad = header + packet_id if opcode == Opcode.DATA_V2 else packet_id
        try:
            plaintext = self._open.decrypt(packet_id + self._iv_in, ciphertext + tag, ad)
        except InvalidTag:
            raise OpenVPNError("data packet failed authentication") from None
        return unframe(self.framing, plaintext)
