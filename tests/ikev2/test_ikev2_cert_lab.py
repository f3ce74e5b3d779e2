"""IKEv2 responders that authenticate with a certificate (real strongSwan, a CA, an intermediate
and leaves made by the test): the chain's dates as facts and gauges, and the chain judged
against the configured CA: trusted, not yet valid, expired, from another CA, or not asked for."""

from __future__ import annotations

import re
from typing import Any

import pytest
from cryptography import x509

from probes.checks.ikev2 import AUTH, run_level
from probes.checks.ikev2_policy import run_policy
from probes.lab import Lab
from probes.lab.pki import PKI
from probes.model import Reason
from tests.agent.helpers import NODE_LABELS, exported
from tests.ikev2.test_ikev2_lab import in_agent, params, settled_sas
from tests.ikev2.test_ikev2_policy_lab import WEAK_ESP, WEAK_IKE, policy_params

pytestmark = [pytest.mark.ikev2, pytest.mark.lab]

NODE_ID = "node.lab"  # the leaf's CN and subjectAltName dNSName, strongSwan's local id


def cert_node(lab: Lab, leaf: str = "valid", rsa_bits: int | None = None,
              **kw: Any) -> tuple[Any, Any, Any, PKI, Any]:
    """A strongSwan signing with a leaf (EC P-256, or RSA) of an intermediate CA of the lab's
    root."""
    node, agent = lab.add_host("node"), lab.add_host("agent")
    root = lab.pki()
    inter = root.intermediate("tw-lab-intermediate")
    files = inter.issue(NODE_ID, server=True, expired=leaf == "expired",
                        not_yet_valid=leaf == "not-yet-valid", rsa_bits=rsa_bits)
    ike = lab.start_strongswan(node, local_id=NODE_ID, cert=files,
                               cacerts=(root.ca_file, inter.ca_file), **kw)
    return node, agent, ike, inter, files


def auth(agent: Any, node: Any, ike: Any, **kw: Any) -> Any:
    return in_agent(agent, lambda: run_level(params(node, ike, **kw), 5.0, "auth"))


@pytest.mark.parametrize("rsa_bits", [None, 2048], ids=["ecdsa", "rsa"])
def test_trusted_chain_dates_reported(lab: Lab, rsa_bits: int | None) -> None:
    node, agent, ike, inter, files = cert_node(lab, rsa_bits=rsa_bits)
    result = auth(agent, node, ike, ca_file=str(lab.pki().ca_file))
    assert result.ok, f"{result}\n{ike.exchange_log()}"
    facts = result.facts
    assert facts["responder_auth"] == "certificate"
    # the chain as strongSwan sent it: its leaf, then the intermediate (never the root)
    leaf = x509.load_pem_x509_certificate(files.cert.read_bytes())
    middle = x509.load_pem_x509_certificate(inter.ca_file.read_bytes())
    assert facts["cert_chain_length"] == 2, facts
    assert facts["chain.0.subject"] == f"CN={NODE_ID}"
    assert facts["chain.1.subject"] == "CN=tw-lab-intermediate"
    assert facts["chain.0.not_before"] == leaf.not_valid_before_utc.isoformat()
    assert facts["chain.0.not_after"] == leaf.not_valid_after_utc.isoformat()
    assert facts["chain.1.not_after"] == middle.not_valid_after_utc.isoformat()
    assert facts["node_certificate_expiry_timestamp_seconds"] == \
        leaf.not_valid_after_utc.timestamp()
    assert facts["node_certificate_not_before_timestamp_seconds"] == \
        leaf.not_valid_before_utc.timestamp()
    assert facts["node_certificate_chain_expiry_timestamp_seconds"] == min(
        leaf.not_valid_after_utc.timestamp(), middle.not_valid_after_utc.timestamp())
    # the gauge the NodeCertificateExpiry alert reads, from the IKEv2 check as from OpenVPN's
    assert exported(AUTH, result).get_sample_value(
        "tunnelwatch_node_certificate_expiry_timestamp_seconds",
        {**NODE_LABELS, "check": "ikev2.auth"}) == leaf.not_valid_after_utc.timestamp()
    # what strongSwan itself says it sent
    log = ike.exchange_log()
    assert re.search(rf'sending end entity cert "CN={NODE_ID}"', log), log
    assert re.search(r'sending issuer cert "CN=tw-lab-intermediate"', log), log
    assert settled_sas(ike) == []


@pytest.mark.parametrize(("leaf", "ca", "reason", "says"), [
    ("not-yet-valid", "root", Reason.CERT_VERIFY_FAILED, "not yet valid"),
    ("expired", "root", Reason.CERT_EXPIRED, "expired"),
    ("valid", "other", Reason.CERT_VERIFY_FAILED, "not issued by a trusted CA"),
])
def test_untrusted_chain_named_with_its_dates(lab: Lab, leaf: str, ca: str, reason: Reason,
                                              says: str) -> None:
    node, agent, ike, _, files = cert_node(lab, leaf)
    ca_file = lab.pki().ca_file if ca == "root" else PKI(lab.dir / "other", "other-ca").ca_file
    result = auth(agent, node, ike, ca_file=str(ca_file))
    assert (result.ok, result.reason) == (False, reason), f"{result}\n{ike.exchange_log()}"
    assert says in result.detail
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert result.facts["node_certificate_not_before_timestamp_seconds"] == \
        cert.not_valid_before_utc.timestamp()  # NodeCertificateNotYetValid reads this
    assert settled_sas(ike) == []  # the IKE SA was made, so it was deleted


def test_without_a_ca_file_no_certificate_is_asked_for(lab: Lab) -> None:
    node, agent, ike, _, _ = cert_node(lab)
    result = auth(agent, node, ike)
    assert (result.ok, result.reason) == (False, Reason.AUTH_FAILED), result
    assert "sent no certificate" in result.detail and "ca_file" in result.detail
    assert settled_sas(ike) == []


def test_policy_scan_of_a_certificate_node(lab: Lab) -> None:
    node, agent, ike, _, _ = cert_node(lab, proposals=WEAK_IKE, esp_proposals=WEAK_ESP)
    p = policy_params(node, ike, ca_file=str(lab.pki().ca_file),
                      items=("ike_dh_modp1024", "ike_encr_des"), post_quantum=False)
    result = in_agent(agent, lambda: run_policy(p, 20.0))
    assert result.reason is Reason.WEAK_CRYPTO, result
    assert (result.facts["policy.ike_dh_modp1024"], result.facts["policy.ike_encr_des"]) == (
        "accepted", "refused")
    assert settled_sas(ike) == []
