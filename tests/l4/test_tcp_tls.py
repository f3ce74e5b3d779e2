"""TCP checks on loopback: the TLS phase (verified, wrong name, expired), and the one-shot CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from probes.checks import l4
from probes.lab.pki import PKI, CertFiles
from probes.model import Reason

pytestmark = pytest.mark.l4


async def _accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await reader.read(1)  # hold the connection until the client closes it
    writer.close()


async def _tls_server(files: CertFiles) -> asyncio.Server:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(files.cert, files.key)
    return await asyncio.start_server(_accept, "127.0.0.1", 0, ssl=ctx)


@pytest.fixture
async def pki(tmp_path: Path) -> AsyncIterator[PKI]:
    yield PKI(tmp_path / "pki")


async def test_tls_phase_verifies_names_and_expiry(pki: PKI) -> None:
    good = await _tls_server(pki.issue("vpn.example.net", server=True))
    expired = await _tls_server(pki.issue("old.example.net", server=True, expired=True))
    try:
        port = good.sockets[0].getsockname()[1]
        ok = await l4.run_tcp(l4.TcpParams(host="127.0.0.1", port=port, tls=True,
                                           server_name="vpn.example.net",
                                           ca_file=str(pki.ca_file)), 3.0)
        assert ok.ok, ok
        assert set(ok.phases) == {"connect", "tls"} and ok.facts["tls_version"]
        assert float(ok.facts["cert_not_after"]) > 0
        assert ok.facts["node_certificate_expiry_timestamp_seconds"] == ok.facts["cert_not_after"]
        wrong = await l4.run_tcp(l4.TcpParams(host="127.0.0.1", port=port, tls=True,
                                              server_name="other.example.net",
                                              ca_file=str(pki.ca_file)), 3.0)
        assert wrong.reason is Reason.CERT_VERIFY_FAILED
        unverified = await l4.run_tcp(l4.TcpParams(host="127.0.0.1", port=port, tls=True,
                                                   verify=False), 3.0)
        assert unverified.ok
        old_port = expired.sockets[0].getsockname()[1]
        old = await l4.run_tcp(l4.TcpParams(host="127.0.0.1", port=old_port, tls=True,
                                            server_name="old.example.net",
                                            ca_file=str(pki.ca_file)), 3.0)
        assert old.reason is Reason.CERT_EXPIRED
    finally:
        good.close()
        expired.close()


async def test_tls_against_plain_tcp_is_tls_failed() -> None:
    async def garbage(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-not-tls\r\n" * 4)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        result = await l4.run_tcp(l4.TcpParams(host="127.0.0.1", port=port, tls=True), 2.0)
        assert result.reason is Reason.TLS_FAILED, result
    finally:
        server.close()


def test_probe_cli_json_contract() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "probes.cli", "probe", "tcp", "127.0.0.1",
                          str(closed), "--json"],
                         check=False, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    doc = json.loads(out.stdout)
    assert doc["ok"] is False and doc["reason"] == "refused" and "connect" in doc["phases"]
    bad = subprocess.run([sys.executable, "-m", "probes.cli", "probe", "udp", "127.0.0.1", "9",
                          "--send-hex", "zz"],
                         check=False, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2
