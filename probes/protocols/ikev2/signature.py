"""A responder's certificate authentication (RFC 7296 §2.15, RFC 7427, RFC 4754), pure.

The responder signs ``<its IKE_SA_INIT message> | Ni | prf(SK_pr, IDr')`` with the key of its
end-entity certificate; :func:`verify_auth` checks that signature with the public key of the
first certificate it sent, and :func:`identity_in_certificate` that the identity it claimed
(IDr) is the certificate's. Whether the certificate is to be trusted (issuer, dates) is the
shell's question: it needs the wall clock and the operator's CA file.

Signature algorithms: RFC 7427 "Digital Signature" with RSA PKCS#1 v1.5, ECDSA (SHA-256/384/512)
or Ed25519 (strongSwan's choice when the initiator sends SIGNATURE_HASH_ALGORITHMS), and the
older fixed methods RSA (PKCS#1 v1.5 with SHA-1) and ECDSA with SHA-256/384/512 on its curve.
RSASSA-PSS is refused as unsupported (strongSwan signs with it only when ``rsa_pss = yes``).
"""

from __future__ import annotations

import hashlib
import ipaddress

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from probes.protocols.ikev2.payloads import AuthMethod, IdPayload, IdType, IKEv2Error

# RFC 7427 Appendix A: the AlgorithmIdentifier DER the AUTH data starts with
_ALGORITHMS: dict[bytes, tuple[str, hashes.HashAlgorithm | None]] = {
    bytes.fromhex("300d06092a864886f70d01010b0500"): ("rsa", hashes.SHA256()),
    bytes.fromhex("300d06092a864886f70d01010c0500"): ("rsa", hashes.SHA384()),
    bytes.fromhex("300d06092a864886f70d01010d0500"): ("rsa", hashes.SHA512()),
    bytes.fromhex("300a06082a8648ce3d040302"): ("ecdsa", hashes.SHA256()),
    bytes.fromhex("300a06082a8648ce3d040303"): ("ecdsa", hashes.SHA384()),
    bytes.fromhex("300a06082a8648ce3d040304"): ("ecdsa", hashes.SHA512()),
    bytes.fromhex("300506032b6570"): ("ed25519", None),
}
_ECDSA_METHODS: dict[int, hashes.HashAlgorithm] = {
    AuthMethod.ECDSA_256: hashes.SHA256(), AuthMethod.ECDSA_384: hashes.SHA384(),
    AuthMethod.ECDSA_521: hashes.SHA512()}
SIGNATURE_METHODS = frozenset({AuthMethod.RSA, AuthMethod.DIGITAL_SIGNATURE, *_ECDSA_METHODS})
# SIGNATURE_HASH_ALGORITHMS (RFC 7427 §4): SHA2-256, SHA2-384, SHA2-512, Identity (Ed25519)
HASH_ALGORITHMS_NOTIFY = bytes.fromhex("0002000300040005")


def signed_octets(init_message: bytes, nonce_peer: bytes, maced_id: bytes) -> bytes:
    """§2.15: what the responder signs (``maced_id`` = prf(SK_pr, IDr'))."""
    return init_message + nonce_peer + maced_id


def ca_hash(ca_der: bytes) -> bytes:
    """CERTREQ's name of a CA we trust: SHA-1 of its SubjectPublicKeyInfo (§3.7)."""
    spki = x509.load_der_x509_certificate(ca_der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha1(spki).digest()  # noqa: S324 - the RFC's identifier, not a security choice


def _certificate(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion) as exc:
        raise IKEv2Error(f"responder certificate does not parse: {exc}") from None


def verify_auth(method: int, data: bytes, octets: bytes, leaf_der: bytes) -> None:
    """Raise :class:`IKEv2Error` unless ``data`` is a signature of ``octets`` by the key of
    ``leaf_der`` in AUTH method ``method``."""
    try:
        key = _certificate(leaf_der).public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise IKEv2Error(f"responder certificate's public key: {exc}") from None
    if method == AuthMethod.DIGITAL_SIGNATURE:
        if not data or len(data) < 1 + data[0]:
            raise IKEv2Error("Digital Signature AUTH data is truncated")
        algorithm = _ALGORITHMS.get(data[1:1 + data[0]])
        if algorithm is None:
            raise IKEv2Error("responder signs with an algorithm the probe does not verify "
                             "(RSASSA-PSS or unknown)")
        scheme, digest = algorithm
        signature = data[1 + data[0]:]
    elif method == AuthMethod.RSA:
        # §3.8: PKCS#1 v1.5 with SHA-1, the method's definition (RFC 7427 replaces it)
        scheme, digest, signature = "rsa", hashes.SHA1(), data  # noqa: S303
    elif method in _ECDSA_METHODS:
        if len(data) % 2:
            raise IKEv2Error("ECDSA AUTH data is not r | s")
        half = len(data) // 2  # RFC 4754: r and s, each the curve's size
        scheme, digest = "ecdsa", _ECDSA_METHODS[method]
        signature = encode_dss_signature(int.from_bytes(data[:half], "big"),
                                         int.from_bytes(data[half:], "big"))
    else:
        raise IKEv2Error(f"responder authenticates with method {method}, not a signature")
    try:
        if scheme == "rsa" and isinstance(key, rsa.RSAPublicKey) and digest is not None:
            key.verify(signature, octets, padding.PKCS1v15(), digest)
        elif scheme == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey) \
                and digest is not None:
            key.verify(signature, octets, ec.ECDSA(digest))
        elif scheme == "ed25519" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, octets)
        else:
            raise IKEv2Error(f"a {scheme} signature does not fit the certificate's "
                             f"{type(key).__name__}")
    except InvalidSignature:
        raise IKEv2Error("responder AUTH signature did not verify with its certificate's key"
                         ) from None


def identity_in_certificate(id_r: IdPayload, leaf_der: bytes) -> bool:
    """Whether the identity the responder claimed is its certificate's: the subject DN, or a
    subjectAltName of the ID's type (dNSName, iPAddress, rfc822Name)."""
    cert = _certificate(leaf_der)
    if id_r.id_type == IdType.DER_ASN1_DN:
        try:
            return id_r.data == cert.subject.public_bytes()
        except ValueError as exc:
            raise IKEv2Error(f"responder certificate's subject: {exc}") from None
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    except ValueError as exc:  # extensions parse lazily
        raise IKEv2Error(f"responder certificate's extensions: {exc}") from None
    if id_r.id_type == IdType.FQDN:
        return id_r.data.decode(errors="replace").lower() in {
            n.lower() for n in names.get_values_for_type(x509.DNSName)}
    if id_r.id_type == IdType.RFC822_ADDR:
        return id_r.data.decode(errors="replace") in names.get_values_for_type(x509.RFC822Name)
    if id_r.id_type in (IdType.IPV4_ADDR, IdType.IPV6_ADDR) and len(id_r.data) in (4, 16):
        return ipaddress.ip_address(id_r.data) in names.get_values_for_type(x509.IPAddress)
    return False
