"""Key-method 2 messages, control-channel strings (PUSH_REPLY, AUTH_FAILED) and the OpenVPN PRF.

Client key-method-2 message (ssl.c ``key_method_2_write``)::

    u32 0 │ u8 2 │ pre_master 48 │ random1 32 │ random2 32 │ str options │ str user │ str pass │
    str peer_info

where ``str`` is a u16 length including the NUL, then the string and its NUL; an empty string is
just ``0000``. The server's message has no pre_master.
"""

from __future__ import annotations

import hmac
import ipaddress
import struct
from dataclasses import dataclass

from probes.protocols.openvpn.packet import OpenVPNError

KEY_METHOD_2 = 2
PRE_MASTER_LEN = 48
RANDOM_LEN = 32

# IV_PROTO bits (ssl.h)
IV_PROTO_DATA_V2 = 1 << 1
IV_PROTO_REQUEST_PUSH = 1 << 2
IV_PROTO_TLS_KEY_EXPORT = 1 << 3
IV_PROTO_CC_EXIT_NOTIFY = 1 << 7

EKM_LABEL = b"EXPORTER-OpenVPN-datakeys"
KEY2_LEN = 256  # two (cipher 64 + hmac 64) keys


def encode_string(value: str | None) -> bytes:
    if not value:
        return b"\x00\x00"
    raw = value.encode() + b"\x00"
    if len(raw) > 0xFFFF:
        raise OpenVPNError("string too long for key-method 2")
    return struct.pack("!H", len(raw)) + raw


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    if len(data) < pos + 2:
        raise OpenVPNError("truncated string length")
    (length,) = struct.unpack_from("!H", data, pos)
    pos += 2
    if len(data) < pos + length:
        raise OpenVPNError("truncated string")
    raw = data[pos:pos + length]
    return raw.rstrip(b"\x00").decode("utf-8", "replace"), pos + length


@dataclass(frozen=True, slots=True)
class ClientKeySource:
    pre_master: bytes
    random1: bytes
    random2: bytes


def encode_client_key_method_2(source: ClientKeySource, options: str, peer_info: str,
                               username: str | None = None, password: str | None = None) -> bytes:
    return b"".join((
        struct.pack("!IB", 0, KEY_METHOD_2),
        source.pre_master, source.random1, source.random2,
        encode_string(options), encode_string(username), encode_string(password),
        encode_string(peer_info),
    ))


@dataclass(frozen=True, slots=True)
class ServerKeyMethod2:
    random1: bytes
    random2: bytes
    options: str
    peer_info: str = ""


def decode_server_key_method_2(data: bytes) -> ServerKeyMethod2:
    if len(data) < 5 + 2 * RANDOM_LEN:
        raise OpenVPNError("key-method 2 message too short")
    zero, method = struct.unpack_from("!IB", data)
    if zero != 0 or method != KEY_METHOD_2:
        raise OpenVPNError(f"not a key-method 2 message (method {method})")
    pos = 5
    random1 = bytes(data[pos:pos + RANDOM_LEN])
    random2 = bytes(data[pos + RANDOM_LEN:pos + 2 * RANDOM_LEN])
    pos += 2 * RANDOM_LEN
    options, pos = _read_string(data, pos)
    # a server may add (empty) user/pass strings and peer info; read them when present
    trailing: list[str] = []
    while pos < len(data) and len(trailing) < 3:
        value, pos = _read_string(data, pos)
        trailing.append(value)
    return ServerKeyMethod2(random1, random2, options, trailing[-1] if len(trailing) == 3 else "")


def control_text(message: bytes) -> str:
    """A control-channel message is a NUL-terminated string."""
    return message.split(b"\x00", 1)[0].decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class PushReply:
    """Options the server pushed, in order, as ``(name, args)``."""

    options: tuple[tuple[str, tuple[str, ...]], ...]

    def get(self, name: str) -> tuple[str, ...] | None:
        for opt, args in self.options:
            if opt == name:
                return args
        return None

    @property
    def ifconfig(self) -> tuple[str, str] | None:
        args = self.get("ifconfig")
        return (args[0], args[1]) if args is not None and len(args) >= 2 else None

    @property
    def topology(self) -> str:
        args = self.get("topology")
        return args[0] if args else "net30"

    @property
    def server_tunnel_address(self) -> str | None:
        """Where in-tunnel echoes go: route-gateway (subnet) or the ifconfig remote (net30/p2p)."""
        gateway = self.get("route-gateway")
        if gateway:
            return gateway[0]
        ifconfig = self.ifconfig
        if ifconfig is not None and self.topology != "subnet":
            return ifconfig[1]
        return None

    @property
    def dns_servers(self) -> tuple[str, ...]:
        """The IPv4 resolvers pushed, in order: ``dhcp-option DNS <addr>`` and OpenVPN 2.6's
        ``dns server <n> address <addr> ...`` (anything not an IPv4 address skipped)."""
        found: list[str] = []
        for opt, args in self.options:
            if opt == "dhcp-option" and len(args) >= 2 and args[0].upper() == "DNS":
                candidates: tuple[str, ...] = args[1:2]
            elif opt == "dns" and len(args) >= 4 and args[0] == "server" and args[2] == "address":
                candidates = args[3:]
            else:
                continue
            for text in candidates:
                try:
                    found.append(str(ipaddress.IPv4Address(text.split(":", 1)[0])))
                except ValueError:
                    continue
        return tuple(dict.fromkeys(found))

    @property
    def peer_id(self) -> int | None:
        args = self.get("peer-id")
        if not args:
            return None
        try:
            value = int(args[0])
        except ValueError:
            raise OpenVPNError(f"bad peer-id {args[0]!r}") from None
        if not 0 <= value < 1 << 24:
            raise OpenVPNError(f"peer-id {value} out of range")
        return value

    @property
    def cipher(self) -> str | None:
        args = self.get("cipher")
        return args[0].upper() if args else None

    @property
    def uses_tls_ekm(self) -> bool:
        derivation = self.get("key-derivation")
        flags = self.get("protocol-flags") or ()
        return (derivation is not None and "tls-ekm" in derivation) or "tls-ekm" in flags

    @property
    def compression(self) -> str | None:
        """Compression framing the server pushed, as a :class:`~.data.Framing` value, or None
        when it pushed none (then only our own configuration can know)."""
        if self.get("comp-lzo") is not None:
            return "comp-lzo"
        args = self.get("compress")
        if args is None:
            return None
        algorithm = args[0] if args else "stub"
        if algorithm.endswith("-v2"):
            return "compress-v2"
        return "comp-lzo" if algorithm == "lzo" else "compress"

    @property
    def continues(self) -> bool:
        args = self.get("push-continuation")
        return args is not None and len(args) > 0 and args[0] == "2"

    def merged(self, more: PushReply) -> PushReply:
        return PushReply(self.options + more.options)


def parse_push_reply(text: str) -> PushReply:
    if not text.startswith("PUSH_REPLY"):
        raise OpenVPNError("not a PUSH_REPLY")
    options: list[tuple[str, tuple[str, ...]]] = []
    for item in text.split(",")[1:]:
        words = item.split()
        if words:
            options.append((words[0], tuple(words[1:])))
    return PushReply(tuple(options))


# --- key derivation ------------------------------------------------------------------------------

def _p_hash(digest: str, secret: bytes, seed: bytes, length: int) -> bytes:
    out = b""
    a = seed
    while len(out) < length:
        a = hmac.new(secret, a, digest).digest()
        out += hmac.new(secret, a + seed, digest).digest()
    return out[:length]


def tls1_prf(secret: bytes, seed: bytes, length: int) -> bytes:
    """TLS 1.0 PRF: P_MD5 over the first half of the secret XOR P_SHA1 over the second."""
    half = (len(secret) + 1) // 2
    md5 = _p_hash("md5", secret[:half], seed, length)
    sha1 = _p_hash("sha1", secret[len(secret) - half:], seed, length)
    return bytes(x ^ y for x, y in zip(md5, sha1, strict=True))


def openvpn_prf_key2(client: ClientKeySource, server: ServerKeyMethod2,
                     client_sid: bytes, server_sid: bytes) -> bytes:
    """The 256-byte data-channel key block of key-method 2 without TLS-EKM (ssl.c)."""
    master = tls1_prf(client.pre_master,
                      b"OpenVPN master secret" + client.random1 + server.random1, PRE_MASTER_LEN)
    seed = b"OpenVPN key expansion" + client.random2 + server.random2 + client_sid + server_sid
    return tls1_prf(master, seed, KEY2_LEN)


