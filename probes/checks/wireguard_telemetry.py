"""WireGuard node telemetry from ``wg show <interface> dump``, locally or over SSH.

The node's own view complements the probes: how many peers it has, how many handshook recently
(active), and bytes moved. The dump is tab-separated (wireguard-tools ``show.c``)::

    <private-key> <public-key> <listen-port> <fwmark|off>                     (interface line)
    <public-key> <psk|(none)> <endpoint|(none)> <allowed-ips|(none)> <latest-handshake>
        <rx-bytes> <tx-bytes> <persistent-keepalive|off>                      (one line per peer)

``wg show all dump`` prefixes every line with the interface name; both forms are accepted. The
private key on the interface line is never kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from probes.checks.remote import NodeShell, TelemetryError, node_output

# a peer with a handshake younger than this is "active": wireguard-go rejects keys older than
# REJECT_AFTER_TIME (180 s), so an older handshake means no usable session
ACTIVE_WITHIN_SECONDS = 180.0
_WG_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class PeerTelemetry:
    public_key: str
    has_preshared_key: bool
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    latest_handshake: int  # Unix seconds; 0 = never
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int | None

    def handshake_age(self, now: float) -> float | None:
        return None if self.latest_handshake == 0 else max(0.0, now - self.latest_handshake)


@dataclass(frozen=True, slots=True)
class InterfaceTelemetry:
    interface: str
    public_key: str
    listen_port: int
    peers: tuple[PeerTelemetry, ...] = field(default_factory=tuple)

    def active_peers(self, now: float, within: float = ACTIVE_WITHIN_SECONDS) -> int:
        return sum(1 for p in self.peers
                   if (age := p.handshake_age(now)) is not None and age < within)

    @property
    def rx_bytes(self) -> int:
        return sum(p.rx_bytes for p in self.peers)

    @property
    def tx_bytes(self) -> int:
        return sum(p.tx_bytes for p in self.peers)

    def summary(self, now: float) -> dict[str, Any]:
        return {"interface": self.interface, "public_key": self.public_key,
                "listen_port": self.listen_port, "peers": len(self.peers),
                "active_peers": self.active_peers(now), "rx_bytes": self.rx_bytes,
                "tx_bytes": self.tx_bytes}


def _int(text: str, what: str, line_no: int) -> int:
    if not (text.isascii() and text.isdigit()):  # rejects signs, spaces, non-ASCII digits
        raise TelemetryError(f"line {line_no}: {what} is not a non-negative integer: {text!r}")
    return int(text)


def _key(text: str, line_no: int) -> str:
    if len(text) != 44 or not text.endswith("="):
        raise TelemetryError(f"line {line_no}: not a base64 WireGuard key")
    return text


def parse_dump(text: str, interface: str = "") -> list[InterfaceTelemetry]:
    """Parse ``wg show <if> dump`` (pass the interface name) or ``wg show all dump``."""
    result: list[InterfaceTelemetry] = []
    current: dict[str, Any] | None = None
    peers: list[PeerTelemetry] = []

    def finish() -> None:
        if current is not None:
            result.append(InterfaceTelemetry(current["name"], current["key"], current["port"],
                                             tuple(peers)))

    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if interface == "" and cols and len(cols) in (5, 9):
            name, cols = cols[0], cols[1:]
        elif interface != "" and len(cols) in (4, 8):
            name = interface
        else:
            raise TelemetryError(f"line {line_no}: unexpected number of fields ({len(cols)})")
        if len(cols) == 4:  # interface line; cols[0] is the private key: dropped unread
            finish()
            peers = []
            port = _int(cols[2], "listen port", line_no)
            if port > 65535:
                raise TelemetryError(f"line {line_no}: listen port out of range")
            current = {"name": name, "key": _key(cols[1], line_no), "port": port}
            continue
        if current is None or current["name"] != name:
            raise TelemetryError(f"line {line_no}: peer line before its interface line")
        public, psk, endpoint, allowed, handshake, rx, tx, keepalive = cols
        peers.append(PeerTelemetry(
            public_key=_key(public, line_no),
            has_preshared_key=psk != "(none)",
            endpoint=None if endpoint == "(none)" else endpoint,
            allowed_ips=() if allowed == "(none)" else tuple(allowed.split(",")),
            latest_handshake=_int(handshake, "latest handshake", line_no),
            rx_bytes=_int(rx, "rx bytes", line_no),
            tx_bytes=_int(tx, "tx bytes", line_no),
            persistent_keepalive=None if keepalive == "off" else _int(keepalive, "keepalive",
                                                                      line_no)))
    finish()
    if interface and not result:
        raise TelemetryError("empty dump")
    return result


def dump_command(interface: str) -> list[str]:
    return ["wg", "show", interface, "dump"]


async def collect(interface: str, shell: NodeShell | None = None, *,
                  timeout: float = _WG_TIMEOUT_SECONDS) -> InterfaceTelemetry:
    """``wg show <interface> dump`` here (needs CAP_NET_ADMIN or the UAPI socket), or on the
    node over SSH (its user must be allowed to run ``wg show``)."""
    out = await node_output(dump_command(interface), shell, error=TelemetryError,
                            timeout=timeout)
    return parse_dump(out, interface)[0]
