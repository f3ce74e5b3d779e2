"""OpenVPN control-channel packet codec and TCP length framing.

Plain layout (``doc_protocol_overview.h``)::

    op<<3|key_id │ own sid 8 │ ack_len u8 │ ack pids u32BE[] │ remote sid 8 (iff acks) │
    msg_pid u32 (not in ACK_V1) │ payload

The wrapping layers (tls-auth, tls-crypt) sit between the session id and the ACK array; this module
splits a packet into its clear *header* (``op│sid``) and its *body* (everything after) so that a
wrapper only has to protect the body.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

SID_LEN = 8
MAX_ACKS = 8  # RELIABLE_ACK_SIZE: a peer never sends more, and we refuse more
HEADER_LEN = 1 + SID_LEN
TCP_MAX_PACKET = 0xFFFF


class OpenVPNError(ValueError):
    """Bytes that are not a valid OpenVPN packet (or fail to authenticate). The only error the
    core raises on input it receives."""


class Opcode(enum.IntEnum):
    CONTROL_SOFT_RESET_V1 = 3
    CONTROL_V1 = 4
    ACK_V1 = 5
    DATA_V1 = 6
    CONTROL_HARD_RESET_CLIENT_V2 = 7
    CONTROL_HARD_RESET_SERVER_V2 = 8
    DATA_V2 = 9
    CONTROL_HARD_RESET_CLIENT_V3 = 10
    CONTROL_WKC_V1 = 11


DATA_OPCODES = frozenset({Opcode.DATA_V1, Opcode.DATA_V2})
CONTROL_OPCODES = frozenset(set(Opcode) - DATA_OPCODES)


def split_first_byte(first: int) -> tuple[Opcode, int]:
    """``op<<3|key_id`` to (opcode, key id); unknown opcodes are an :class:`OpenVPNError`."""
    try:
        return Opcode(first >> 3), first & 0x07
    except ValueError:
        raise OpenVPNError(f"unknown opcode {first >> 3}") from None


@dataclass(frozen=True, slots=True)
class ControlPacket:
    """One control-channel packet with the wrapping already removed."""

    opcode: Opcode
    session_id: bytes
    key_id: int = 0
    acks: tuple[int, ...] = ()
    remote_session_id: bytes = b""
    message_id: int | None = None  # None only for ACK_V1
    payload: bytes = b""

    def header(self) -> bytes:
        return bytes([(self.opcode << 3) | self.key_id]) + self.session_id

    def body(self) -> bytes:
        """Everything after ``op│sid``: what the wrappers protect."""
        parts = [bytes([len(self.acks)])]
        parts += [struct.pack("!I", pid) for pid in self.acks]
        if self.acks:
            parts.append(self.remote_session_id)
        if self.message_id is not None:
            parts.append(struct.pack("!I", self.message_id))
        parts.append(self.payload)
        return b"".join(parts)

    def encode(self) -> bytes:
        self.validate()
        return self.header() + self.body()

    def validate(self) -> None:
        if len(self.session_id) != SID_LEN:
            raise OpenVPNError("session id must be 8 bytes")
        if len(self.acks) > MAX_ACKS:
            raise OpenVPNError("too many acks")
        if self.acks and len(self.remote_session_id) != SID_LEN:
            raise OpenVPNError("acks need the remote session id")
        if (self.message_id is None) != (self.opcode == Opcode.ACK_V1):
            raise OpenVPNError("ACK_V1 and only ACK_V1 has no message packet-id")
        if self.opcode == Opcode.ACK_V1 and self.payload:
            raise OpenVPNError("ACK_V1 carries no payload")


def parse_header(data: bytes) -> tuple[Opcode, int, bytes]:
    """The clear ``op│sid`` prefix: (opcode, key id, session id)."""
    if len(data) < HEADER_LEN:
        raise OpenVPNError("packet shorter than op and session id")
    opcode, key_id = split_first_byte(data[0])
    if opcode in DATA_OPCODES:
        raise OpenVPNError("data packet where a control packet was expected")
    return opcode, key_id, bytes(data[1:HEADER_LEN])


def parse_body(opcode: Opcode, key_id: int, session_id: bytes, body: bytes) -> ControlPacket:
    """Decode the (unwrapped) body of a control packet."""
    if not body:
        raise OpenVPNError("missing ack array length")
    n_acks = body[0]
    if n_acks > MAX_ACKS:
        raise OpenVPNError(f"ack array of {n_acks} exceeds {MAX_ACKS}")
    pos = 1
    need = pos + 4 * n_acks + (SID_LEN if n_acks else 0)
    if len(body) < need:
        raise OpenVPNError("truncated ack array")
    acks = struct.unpack_from(f"!{n_acks}I", body, pos)
    pos += 4 * n_acks
    remote = b""
    if n_acks:
        remote = bytes(body[pos:pos + SID_LEN])
        pos += SID_LEN
    message_id: int | None = None
    if opcode != Opcode.ACK_V1:
        if len(body) < pos + 4:
            raise OpenVPNError("truncated message packet-id")
        (message_id,) = struct.unpack_from("!I", body, pos)
        pos += 4
    payload = bytes(body[pos:])
    if opcode == Opcode.ACK_V1 and payload:
        raise OpenVPNError("trailing bytes after ACK_V1")
    return ControlPacket(opcode, session_id, key_id, tuple(acks), remote, message_id, payload)


def decode_plain(data: bytes) -> ControlPacket:
    """Decode an unwrapped control packet (``--tls-auth``/``--tls-crypt`` not in use)."""
    opcode, key_id, sid = parse_header(data)
    return parse_body(opcode, key_id, sid, data[HEADER_LEN:])


# --- TCP framing -------------------------------------------------------------------------------

def frame_tcp(packet: bytes) -> bytes:
    """Prefix one packet with its u16 big-endian length (the TCP stream format)."""
    if not 0 < len(packet) <= TCP_MAX_PACKET:
        raise OpenVPNError(f"cannot frame a packet of {len(packet)} bytes")
    return struct.pack("!H", len(packet)) + packet


@dataclass(slots=True)
class TcpDeframer:
    """Reassemble length-prefixed packets from arbitrary stream chunks."""

    _buffer: bytearray = field(default_factory=bytearray)

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        out: list[bytes] = []
        while len(self._buffer) >= 2:
            (length,) = struct.unpack_from("!H", self._buffer)
            if length == 0:
                raise OpenVPNError("zero-length TCP frame")
            if len(self._buffer) < 2 + length:
                break
            out.append(bytes(self._buffer[2:2 + length]))
            del self._buffer[:2 + length]
        return out

    @property
    def pending(self) -> int:
        return len(self._buffer)
