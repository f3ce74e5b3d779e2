"""The responder's certificate AUTH without a lab: each signature method the probe verifies, a
tampered one refused, identities bound to the certificate, and hostile AUTH data and
certificates ending in IKEv2Error only (fuzzed). The lab (test_ikev2_cert_lab.py) runs it
against strongSwan."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.checks.certs import chain_facts, verify_chain
from probes.protocols.ikev2 import IKEv2Error
from probes.protocols.ikev2 import payloads as p
from probes.protocols.ikev2.signature import identity_in_certificate, verify_auth

pytestmark = pytest.mark.ikev2

OCTETS = b"IKE_SA_INIT response | Ni | prf(SK_pr, IDr')"
SHA256_RSA = bytes.fromhex("300d06092a864886f70d01010b0500")
ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
ED25519 = bytes.fromhex("300506032b6570")
PSS = bytes.fromhex("3041" "06092a864886f70d01010a" "3034")  # RSASSA-PSS: not verified


def _cert(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
          names: list[x509.GeneralName]) -> bytes:
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node.test")])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(key.public_key()).serial_number(1)
               .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.SubjectAlternativeName(names), critical=False))
    digest = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, digest).public_bytes(serialization.Encoding.DER)


_NAMES: list[x509.GeneralName] = [x509.DNSName("node.test"),
                                  x509.IPAddress(ipaddress.ip_address("192.0.2.1"))]
_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_EC = ec.generate_private_key(ec.SECP256R1())
_ED = ed25519.Ed25519PrivateKey.generate()
RSA_CERT, EC_CERT, ED_CERT = (_cert(k, _NAMES) for k in (_RSA, _EC, _ED))


def _ds(algorithm: bytes, signature: bytes) -> bytes:
    return bytes([len(algorithm)]) + algorithm + signature


def _raw_ecdsa(der: bytes) -> bytes:
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


CASES = {
    "ds-rsa-sha256": (p.AuthMethod.DIGITAL_SIGNATURE, RSA_CERT, _ds(
        SHA256_RSA, _RSA.sign(OCTETS, padding.PKCS1v15(), hashes.SHA256()))),
    "ds-ecdsa-sha256": (p.AuthMethod.DIGITAL_SIGNATURE, EC_CERT, _ds(
        ECDSA_SHA256, _EC.sign(OCTETS, ec.ECDSA(hashes.SHA256())))),
    "ds-ed25519": (p.AuthMethod.DIGITAL_SIGNATURE, ED_CERT, _ds(ED25519, _ED.sign(OCTETS))),
    "rsa-sha1": (p.AuthMethod.RSA, RSA_CERT, _RSA.sign(
        OCTETS, padding.PKCS1v15(), hashes.SHA1())),
    "ecdsa-256": (p.AuthMethod.ECDSA_256, EC_CERT, _raw_ecdsa(
        _EC.sign(OCTETS, ec.ECDSA(hashes.SHA256())))),
}


@pytest.mark.parametrize("case", CASES)
def test_each_method_verifies_and_tampering_is_caught(case: str) -> None:
    method, cert, data = CASES[case]
    verify_auth(method, data, OCTETS, cert)
    with pytest.raises(IKEv2Error, match="did not verify"):
        verify_auth(method, data, OCTETS + b"!", cert)
    with pytest.raises(IKEv2Error):
        verify_auth(method, data[:-1] + bytes([data[-1] ^ 1]), OCTETS, cert)


def test_wrong_key_type_unknown_algorithms_and_psk_refused() -> None:
    _, _, rsa_sig = CASES["ds-rsa-sha256"]
    with pytest.raises(IKEv2Error, match="does not fit"):
        verify_auth(p.AuthMethod.DIGITAL_SIGNATURE, rsa_sig, OCTETS, EC_CERT)
    with pytest.raises(IKEv2Error, match="RSASSA-PSS or unknown"):
        verify_auth(p.AuthMethod.DIGITAL_SIGNATURE, _ds(PSS, b"sig"), OCTETS, RSA_CERT)
    with pytest.raises(IKEv2Error, match="not a signature"):
        verify_auth(p.AuthMethod.PSK, b"mac", OCTETS, RSA_CERT)
    with pytest.raises(IKEv2Error, match="does not parse"):
        verify_auth(p.AuthMethod.RSA, b"sig", OCTETS, b"not a certificate")


def test_identity_must_be_the_certificates() -> None:
    def idr(id_type: int, data: bytes) -> p.IdPayload:
        return p.IdPayload(p.PayloadType.IDR, id_type, data)

    subject = x509.load_der_x509_certificate(EC_CERT).subject.public_bytes()
    assert identity_in_certificate(idr(p.IdType.FQDN, b"NODE.test"), EC_CERT)
    assert identity_in_certificate(idr(p.IdType.DER_ASN1_DN, subject), EC_CERT)
    assert identity_in_certificate(idr(p.IdType.IPV4_ADDR, bytes([192, 0, 2, 1])), EC_CERT)
    assert not identity_in_certificate(idr(p.IdType.FQDN, b"other.test"), EC_CERT)
    assert not identity_in_certificate(idr(p.IdType.IPV4_ADDR, bytes([192, 0, 2, 2])), EC_CERT)
    assert not identity_in_certificate(idr(p.IdType.KEY_ID, b"node.test"), EC_CERT)


@given(st.sampled_from([1, 2, 9, 10, 11, 14, 99]), st.binary(max_size=300),
       st.sampled_from([RSA_CERT, EC_CERT, ED_CERT]), st.binary(max_size=40),
       st.integers(0, 5), st.integers(0, 255))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hostile_auth_data_and_certificates_raise_only_ikev2error(
        method: int, data: bytes, cert: bytes, junk: bytes, cut: int, flip: int) -> None:
    broken = cert[:len(cert) - cut * 37] + junk if cut else cert
    for leaf in (cert, broken, bytes([flip]) + cert[1:]):
        with contextlib.suppress(IKEv2Error):
            verify_auth(method, data, OCTETS, leaf)
        with contextlib.suppress(IKEv2Error):
            identity_in_certificate(p.IdPayload(p.PayloadType.IDR, data[0] if data else 2,
                                                data[1:]), leaf)


@given(st.lists(st.sampled_from([RSA_CERT, EC_CERT, ED_CERT]), min_size=1, max_size=3),
       st.integers(0, 2000), st.integers(0, 255), st.binary(max_size=20))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hostile_chains_give_facts_and_reasons_never_exceptions(
        chain: list[bytes], at: int, value: int, junk: bytes) -> None:
    """A presented chain with a byte changed or cut: its facts ("unparsable" where it does not
    parse) and a verdict with a reason."""
    first = bytearray(chain[0])
    first[at % len(first)] = value
    presented = (bytes(first[:len(first) - len(junk)]) + junk, *chain[1:])
    facts = chain_facts(presented)
    assert facts["cert_chain_length"] == len(presented)
    verdict = verify_chain(presented, (x509.load_der_x509_certificate(EC_CERT),),
                           dt.datetime.now(dt.UTC))
    assert verdict is None or verdict[1]
