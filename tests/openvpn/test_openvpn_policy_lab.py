"""The OpenVPN policy scan against a real OpenVPN 2.6 server configured weak (TLS 1.0 allowed,
an RSA certificate, tls-auth with its default SHA1 digest) and as the lab runs it (strict)."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from probes.checks.base import CheckResult
from probes.checks.openvpn_policy import OpenVPNPolicyParams, run_policy
from probes.checks.openvpn_telemetry import Telemetry, read_management_socket
from probes.lab import Host, Lab
from probes.lab.openvpn import OpenVPNServer
from probes.model import Reason
from probes.protocols.openvpn.policy import DEFAULT_ITEMS
from tests.openvpn.test_lab_openvpn import params_for

pytestmark = [pytest.mark.openvpn, pytest.mark.lab]

WEAK_ACCEPTS = {"tls_version_1_0", "tls_version_1_1", "tls_kx_rsa", "tls_auth_sha1",
                "data_cipher_bf_cbc", "data_cipher_none"}
# OpenVPN 2.6 on OpenSSL 3.0 takes BF-CBC only with the legacy provider loaded, and `none` only
# when data-ciphers names it (it warns loudly either way)
WEAK_SERVER = ["--tls-version-min", "1.0", "--tls-cipher", "DEFAULT:@SECLEVEL=0",
               "--providers", "legacy", "default",
               "--data-ciphers", "AES-256-GCM:BF-CBC:none"]


def scan(agent: Host, server: OpenVPNServer, timeout: float = 40.0, **kw: Any) -> CheckResult:
    base = params_for(server)
    params = OpenVPNPolicyParams(**msgspec.structs.asdict(base), **kw)
    with agent.entered():
        return asyncio.run(run_policy(params, timeout))


def no_clients(server: OpenVPNServer, within: float = 20.0) -> bool:
    """The status file (rewritten every second) lists no client. A client instance refused with
    AUTH_FAILED (a data cipher offer) stays for the server's delayed exit (5 s) and leaves the
    status file up to ~12 s later."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if "CLIENT_LIST\t" not in server.status().replace("HEADER\tCLIENT_LIST", ""):
            return True
        time.sleep(0.2)
    return False


def test_weak_server_each_accepted_choice_named(lab: Lab) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    server = lab.start_openvpn(node, proto="udp", wrap="tls-auth", server_rsa_bits=2048,
                               extra=WEAK_SERVER)
    result = scan(agent, server)
    assert result.reason is Reason.WEAK_CRYPTO, (result, server.log()[-2000:])
    accepted = {n for n in DEFAULT_ITEMS if result.facts[f"policy.{n}"] == "accepted"}
    assert accepted == WEAK_ACCEPTS, result.facts
    assert result.facts["policy.tls_auth_md5"] == "refused"
    assert str(result.facts["chosen.tls_version_1_0"]).startswith("TLSv1 ")
    assert "_RSA_WITH_" in str(result.facts["chosen.tls_kx_rsa"])
    assert result.facts["chosen.data_cipher_bf_cbc"] == "cipher BF-CBC"
    assert result.facts["chosen.data_cipher_none"] == "cipher none"
    # the server says so too: it pushed each of them
    for cipher in ("BF-CBC", "none"):
        assert re.search(rf"PUSH_REPLY,.*cipher {cipher},", server.log()), cipher
    # OpenSSL 3.0 has no ML-KEM: the hybrid group is refused (the negative path)
    assert result.facts["post_quantum"] == "refused", result.facts
    assert result.facts["node_pq_key_exchange_accepted"] == 0
    assert no_clients(server), server.status()


def test_strict_server_yields_nothing(lab: Lab) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    server = lab.start_openvpn(node, proto="udp", wrap="tls-crypt")
    result = scan(agent, server)
    assert result.ok and result.reason is Reason.OK, (result, server.log()[-2000:])
    assert result.facts["policy.tls_version_1_0"] == "refused"
    assert result.facts["policy.tls_auth_sha1"] == "n/a"
    for name in ("data_cipher_bf_cbc", "data_cipher_none"):
        assert result.facts[f"policy.{name}"] == "refused", result.facts
        assert "cipher negotiation failed" in str(result.facts[f"refusal.{name}"])
    assert result.facts["post_quantum"] == "refused"
    assert no_clients(server), server.status()


def management(server: OpenVPNServer) -> Telemetry:
    """``status 3`` and ``load-stats`` from the server's management interface."""
    return asyncio.run(read_management_socket(str(server.management_socket), 5.0))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


SCANS = 50


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fifty_scans_leave_no_client(lab: Lab) -> None:
    """The acceptance run: 50 full scans of a weak server (every kind of offer, accepted and
    refused), then its management interface lists no client and counts none, and the server
    did not grow."""
    node, agent = lab.add_host("node"), lab.add_host("agent")
    server = lab.start_openvpn(node, proto="udp", wrap="tls-auth", server_rsa_bits=2048,
                               extra=WEAK_SERVER)
    pid = int((server.dir / "pid").read_text())  # --writepid: openvpn's own
    rss_before = rss_kib(pid)
    started = time.monotonic()
    for n in range(SCANS):
        result = scan(agent, server)
        assert result.reason is Reason.WEAK_CRYPTO, (n, result, server.log()[-2000:])
        assert result.facts["node_policy_weak_accepted"] == len(WEAK_ACCEPTS), (n, result.facts)
        if n % 10 == 9:
            assert no_clients(server), (n, server.status())
            view = management(server)
            assert view.status.clients == () and view.load is not None \
                and view.load.clients == 0, (n, view)
    took = time.monotonic() - started
    view = management(server)
    assert view.status.clients == () and view.load is not None and view.load.clients == 0, view
    growth = rss_kib(pid) - rss_before
    print(f"\n{SCANS} OpenVPN scans in {took:.1f} s ({took / SCANS:.2f} s a scan); server RSS "
          f"{rss_before} KiB -> +{growth} KiB; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    assert growth < 16 * 1024, growth
