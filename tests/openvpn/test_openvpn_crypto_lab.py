"""What an OpenVPN server negotiated, as the probe reports it, against what the server itself
logs; certificate dates of the presented chain, also when the certificate does not verify."""

from __future__ import annotations

import re
import time

import pytest

from probes.checks.openvpn import Level
from probes.lab import Lab
from probes.model import Reason
from tests.openvpn.test_lab_openvpn import params_for, probe

pytestmark = [pytest.mark.openvpn, pytest.mark.lab]


# every lab mode: both transports, every control-channel wrapping
@pytest.mark.parametrize(("proto", "tls_max", "wrap"), [
    ("udp", "1.3", "tls-crypt"), ("udp", "1.2", "tls-auth"), ("udp", "1.3", "tls-crypt-v2"),
    ("tcp", "1.3", "tls-crypt"), ("tcp", "1.2", "tls-crypt-v2"), ("tcp", "1.3", "tls-auth")])
def test_negotiated_facts_match_the_server_log(lab: Lab, proto: str, tls_max: str,
                                               wrap: str) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    server = lab.start_openvpn(node, proto=proto, wrap=wrap, extra=["--tls-version-max", tls_max])
    result = probe(agent, params_for(server), Level.TUNNEL)
    assert result.ok, (result.reason, result.detail)
    log = server.log()
    # "Control Channel: TLSv1.3, cipher TLSv1.3 TLS_AES_256_GCM_SHA384, peer certificate: ..."
    control = re.search(r"Control Channel: (TLSv[\d.]+), cipher \S+ (\S+?),", log)
    assert control is not None, log[-3000:]
    assert result.facts["crypto.tls_version"] == control.group(1)
    assert result.facts["crypto.tls_cipher_suite"] == control.group(2)
    # the server logs the client's key share ("peer temporary key: 253 bits X25519")
    tmp_key = re.search(r"peer temporary key: \d+ bits? (\S+?)[,\s]", log)
    if tmp_key is not None:
        assert str(result.facts["crypto.tls_group"]).lower() in (
            tmp_key.group(1).lower(), {"prime256v1": "secp256r1"}.get(tmp_key.group(1), "-"))
    else:
        assert result.facts["crypto.tls_group"] != "unknown"
    # the data cipher the server pushed: "SENT CONTROL [..]: 'PUSH_REPLY,..,cipher AES-256-GCM"
    data = re.search(r"PUSH_REPLY,.*?cipher ([^,']+)", log)
    assert data is not None, log[-3000:]
    assert result.facts["crypto.data_cipher"] == data.group(1)
    expect_wrap = "tls-auth-SHA1" if wrap == "tls-auth" else wrap
    assert result.facts["crypto.control_channel_wrap"] == expect_wrap
    # the chain as presented: the server sends its leaf only
    assert result.facts["chain.0.subject"] == f"CN={server.name}-server"
    assert float(result.facts["node_certificate_not_before_timestamp_seconds"]) < time.time()
    assert float(result.facts["node_certificate_chain_expiry_timestamp_seconds"]) > time.time()


def test_not_yet_valid_certificate_reports_its_start(lab: Lab) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    server = lab.start_openvpn(node, proto="udp", wrap="tls-crypt", not_yet_valid_cert=True)
    result = probe(agent, params_for(server), Level.TLS)
    assert (result.ok, result.reason) == (False, Reason.CERT_VERIFY_FAILED), result.detail
    assert "not yet valid" in result.detail
    start = float(result.facts["node_certificate_not_before_timestamp_seconds"])
    assert start > time.time() + 86400  # the NodeCertificateNotYetValid alert reads this
