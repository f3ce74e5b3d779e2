from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.openvpn.pki import Issued, ScratchPki


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ovpn-pki")


@pytest.fixture(scope="session")
def pki(pki_dir: Path) -> ScratchPki:
    return ScratchPki(pki_dir)


@pytest.fixture(scope="session")
def server_cert(pki: ScratchPki) -> Issued:
    return pki.server()


@pytest.fixture(scope="session")
def client_cert(pki: ScratchPki) -> Issued:
    return pki.client()


def client_context(ca: Path, client: Issued) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(client.cert, client.key)
    return ctx


def server_context(ca: Path, server: Issued) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(server.cert, server.key)
    return ctx


def openvpn_genkey(kind: str, out: Path, pre: tuple[str, ...] = ()) -> str:
    """Run ``openvpn [pre] --genkey KIND OUT`` when the binary is here; skip the test otherwise."""
    binary = shutil.which("openvpn") or shutil.which("openvpn", path="/usr/sbin")
    if binary is None:
        pytest.skip("openvpn binary not installed")
    subprocess.run([binary, *pre, "--genkey", kind, str(out)], check=True, capture_output=True)
    return out.read_text()
