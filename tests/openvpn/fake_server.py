"""A minimal in-memory OpenVPN server peer for the session core's unit tests.

It speaks the server side with the same codec (wrappers built with ``server=True``) and a real
Python TLS server over memory BIOs. Not a model of OpenVPN's server: just enough to exercise the
client's reset, reliability, TLS, key-method 2, PUSH_REPLY and EXIT paths without a network.
"""

from __future__ import annotations

import os
import ssl
import struct

from probes.protocols.openvpn.keymethod import encode_string
from probes.protocols.openvpn.packet import ControlPacket, Opcode, parse_body
from probes.protocols.openvpn.reliable import ReliableReceiver, ReliableSender
from probes.protocols.openvpn.wrap import NoWrap, Wrapper

PUSH = ("PUSH_REPLY,route-gateway 10.8.0.1,topology subnet,ping 10,ifconfig 10.8.0.2 "
        "255.255.255.0,peer-id 3,cipher AES-256-GCM,protocol-flags cc-exit")


class FakeServer:
    def __init__(self, context: ssl.SSLContext, wrapper: Wrapper | None = None, *,
                 wkc_len: int = 0, early_neg: bool = False, push: str = PUSH,
                 reply_to_key_method: bool = True) -> None:
        self.wrapper = wrapper if wrapper is not None else NoWrap()
        self.sid = os.urandom(8)
        self.client_sid: bytes | None = None
        self.wkc_len = wkc_len
        self.early_neg = early_neg
        self.push = push
        self.reply_to_key_method = reply_to_key_method
        self.sender = ReliableSender(initial_timeout=60)
        self.receiver = ReliableReceiver()
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_side=True)
        self.handshake_done = False
        self.tls_error: ssl.SSLError | None = None
        self.key_method: bytes | None = None
        self.messages: list[bytes] = []
        self.opcodes: list[Opcode] = []
        self.first_control_acks: tuple[int, ...] | None = None

    def receive(self, data: bytes) -> list[bytes]:
        opcode = Opcode(data[0] >> 3)
        if opcode in (Opcode.CONTROL_HARD_RESET_CLIENT_V3, Opcode.CONTROL_WKC_V1):
            (length,) = struct.unpack("!H", data[-2:])
            assert length == self.wkc_len
            data = data[:-length]
        self.opcodes.append(opcode)
        op, key_id, sid, body = self.wrapper.unwrap(data)
        packet = parse_body(op, key_id, sid, body)
        self.client_sid = sid
        self.sender.ack(packet.acks)
        if packet.message_id == 1 and self.first_control_acks is None:
            self.first_control_acks = packet.acks
        if packet.message_id is not None:
            for _, in_op, payload in self.receiver.receive(packet.message_id, op, packet.payload):
                if in_op in (Opcode.CONTROL_HARD_RESET_CLIENT_V2,
                             Opcode.CONTROL_HARD_RESET_CLIENT_V3):
                    tlv = struct.pack("!HHH", 1, 2, 1) if self.early_neg else b""
                    self.sender.queue(Opcode.CONTROL_HARD_RESET_SERVER_V2, tlv)
                else:
                    self._in.write(payload)
        self._pump()
        return self.flush()

    def _pump(self) -> None:
        if not self.handshake_done:
            try:
                self.tls.do_handshake()
                self.handshake_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:  # the client refused us: remember, stay quiet
                self.tls_error = exc
                return
        if self.handshake_done:
            while True:
                try:
                    message = self.tls.read(65536)
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    break
                if self.key_method is None:
                    self.key_method = message
                    if self.reply_to_key_method:
                        self.tls.write(struct.pack("!IB", 0, 2) + os.urandom(64)
                                       + encode_string("V4,dev-type tun,tls-server")
                                       + encode_string(None) + encode_string(None))
                        self.tls.write(self.push.encode() + b"\x00")
                else:
                    self.messages.append(message)
        data = self._out.read()
        for pos in range(0, len(data), 1000):
            self.sender.queue(Opcode.CONTROL_V1, data[pos:pos + 1000])

    def flush(self) -> list[bytes]:
        out = []
        assert self.client_sid is not None
        for message_id, op, payload in self.sender.due(0.0):
            acks = self.receiver.take_acks()
            out.append(self._wrap(ControlPacket(op, self.sid, 0, acks,
                                                self.client_sid if acks else b"",
                                                message_id, payload)))
        if self.receiver.has_acks:
            out.append(self._wrap(ControlPacket(Opcode.ACK_V1, self.sid, 0,
                                                self.receiver.take_acks(), self.client_sid)))
        return out

    def _wrap(self, packet: ControlPacket) -> bytes:
        return self.wrapper.wrap(packet.header(), packet.body())
