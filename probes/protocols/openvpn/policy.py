"""What the OpenVPN policy scan offers (:mod:`probes.checks.openvpn_policy` runs it): the
deprecated TLS versions and key exchanges as ClientHello offers, the tls-auth digests as hard
resets, the weak data-channel ciphers as a whole session whose only cipher is that one.
Sources: RFC 8996 (TLS 1.0 and 1.1 deprecated), RFC 9325 / BCP 195 (forward secrecy, no RSA key
transport), NIST SP 800-52 rev. 2, OpenVPN 2.6's own defaults (tls-version-min 1.2,
data-ciphers AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305), SWEET32 (CVE-2016-6329: 64-bit block
ciphers such as BF-CBC)."""

from __future__ import annotations

from probes.protocols.tlswire import (
    SUITES,
    TLS10,
    TLS11,
    TLS12,
    HelloOffer,
    KeyExchange,
)

_GROUPS = (29, 23, 24)  # x25519, secp256r1, secp384r1
_PRE_TLS12 = tuple(code for code, s in SUITES.items()
                   if s.kx != KeyExchange.TLS13 and "GCM" not in s.name
                   and "CHACHA" not in s.name and not s.name.endswith(("SHA256", "SHA384")))
_RSA_KX = tuple(code for code, s in SUITES.items() if s.kx == KeyExchange.RSA)

HELLO_ITEMS: dict[str, tuple[str, HelloOffer]] = {
    "tls_version_1_0": ("TLS 1.0", HelloOffer((TLS10,), _PRE_TLS12, _GROUPS)),
    "tls_version_1_1": ("TLS 1.1", HelloOffer((TLS11,), _PRE_TLS12, _GROUPS)),
    "tls_kx_rsa": ("RSA key transport, no forward secrecy", HelloOffer((TLS12,), _RSA_KX)),
}
DIGEST_ITEMS = {"tls_auth_md5": "MD5", "tls_auth_sha1": "SHA1"}
# offered as the only cipher (IV_CIPHERS and the OCC options string): taken when pushed
CIPHER_ITEMS = {"data_cipher_bf_cbc": "BF-CBC", "data_cipher_none": "none"}
# the ciphers first: a server refuses one with AUTH_FAILED and keeps that client instance for its
# delayed exit (5 s in OpenVPN 2.6), which the hello offers after it outlast
DEFAULT_ITEMS = (*CIPHER_ITEMS, *HELLO_ITEMS, *DIGEST_ITEMS)
