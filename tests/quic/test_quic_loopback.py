"""QUIC checks against the MASQUE server on loopback: no root, and no IPv6 at all.

``socket.socket`` is patched to refuse ``AF_INET6`` (like a kernel booted with ipv6.disable=1),
the case where ``aioquic.asyncio.connect`` fails because it always binds a dual-stack socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from probes.checks import mtu, quic
from probes.checks.base import execute
from probes.lab.pki import PKI, CertFiles
from probes.model import Reason

pytestmark = pytest.mark.quic


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Loopback:
    port: int
    echo_port: int
    ca_file: Path


@contextlib.contextmanager
def _server(cert: CertFiles, *extra: str) -> Iterator[int]:
    """A MASQUE server on 127.0.0.1 (our own child, stopped by PID); yields its port."""
    port = _free_udp_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "probes.lab.masque", "--listen", f"127.0.0.1:{port}",
         "--cert", str(cert.cert), "--key", str(cert.key), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15.0)
        if not ready or b"ready" not in proc.stdout.readline():
            pytest.fail("MASQUE server did not start")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def loopback(pki: PKI) -> Iterator[Loopback]:
    echo_port = _free_udp_port()
    with _server(pki.issue("masque.lab", server=True), "--echo", f"127.0.0.1:{echo_port}") as port:
        yield Loopback(port, echo_port, pki.ca_file)


class _NoIPv6Socket(socket.socket):
    def __init__(self, family: Any = -1, type: Any = -1, proto: int = -1,
                 fileno: int | None = None) -> None:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        super().__init__(family, type, proto, fileno)


@pytest.fixture
def no_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "socket", _NoIPv6Socket)
    with pytest.raises(OSError):
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)


def _params(env: Loopback, **overrides: Any) -> quic.QuicParams:
    fields: dict[str, Any] = {"host": "127.0.0.1", "port": env.port,
                              "server_name": "masque.lab", "ca_file": str(env.ca_file)}
    fields.update(overrides)
    return quic.QuicParams(**fields)


@pytest.mark.usefixtures("no_ipv6")
def test_handshake_and_connect_udp_work_without_ipv6(loopback: Loopback) -> None:
    hs = asyncio.run(execute(quic.HANDSHAKE, _params(loopback), 5.0))
    assert hs.ok, hs
    udp = asyncio.run(execute(quic.CONNECT_UDP, _params(
        loopback, target=f"127.0.0.1:{loopback.echo_port}", echo_count=4, echo_interval=0.01),
        5.0))
    assert udp.ok, udp
    assert udp.quality is not None and udp.quality.received == 4


def test_connect_ip_address_assign_on_loopback(loopback: Loopback) -> None:
    result = asyncio.run(execute(quic.CONNECT_IP, _params(loopback), 5.0))
    assert result.ok, result
    assert result.facts["assigned"] == "10.200.0.2/32"


def test_insecure_mode_skips_verification(loopback: Loopback, tmp_path: Path) -> None:
    other = PKI(tmp_path)
    strict = asyncio.run(execute(quic.HANDSHAKE, _params(loopback, ca_file=str(other.ca_file)),
                                 5.0))
    assert strict.reason is Reason.CERT_VERIFY_FAILED
    lax = asyncio.run(execute(quic.HANDSHAKE, _params(loopback, ca_file=None, verify=False), 5.0))
    assert lax.ok, lax


def test_connect_ip_pings_the_gateway_inside_the_tunnel(loopback: Loopback) -> None:
    result = asyncio.run(execute(quic.CONNECT_IP, _params(
        loopback, ip_ping="10.200.0.1", echo_count=4, echo_interval=0.01), 5.0))
    assert result.ok, result
    assert result.quality is not None and result.quality.received == 4
    assert result.facts["ping"] == "10.200.0.1"


def test_connect_ip_ping_to_a_silent_address_is_tunnel_no_reply(loopback: Loopback) -> None:
    result = asyncio.run(execute(quic.CONNECT_IP, _params(
        loopback, ip_ping="10.200.0.77", echo_count=2, echo_interval=0.01), 5.0))
    assert result.reason is Reason.TUNNEL_NO_REPLY, result


@pytest.mark.parametrize("max_size", [None, 9000])
def test_mtu_probe_on_loopback_needs_no_root(loopback: Loopback, max_size: int | None) -> None:
    # loopback's 64 KiB MTU: the largest IPv4 packet passes, nothing is a black hole
    params = mtu.MtuParams(host="127.0.0.1", port=loopback.echo_port, max_size=max_size)
    result = asyncio.run(execute(mtu.UDP, params, 5.0))
    assert result.ok, result
    assert result.facts["path_mtu"] == (max_size or 65535)
    assert result.facts["probes"] == 1


def test_expired_server_certificate_is_cert_expired(pki: PKI, loopback: Loopback) -> None:
    with _server(pki.issue("expired.lab", server=True, expired=True)) as port:
        result = asyncio.run(execute(quic.HANDSHAKE, _params(
            loopback, port=port, server_name="expired.lab"), 5.0))
    assert result.reason is Reason.CERT_EXPIRED, result


def test_malformed_address_assign_is_bad_packet(pki: PKI, loopback: Loopback) -> None:
    cert = pki.issue("masque.lab", server=True)
    with _server(cert, "--bad-capsules") as port:
        result = asyncio.run(execute(quic.CONNECT_IP, _params(loopback, port=port), 5.0))
    assert result.reason is Reason.BAD_PACKET, result
    assert "prefix length" in result.detail
