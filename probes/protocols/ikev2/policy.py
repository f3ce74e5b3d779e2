"""What the IKEv2 policy scan offers: one deprecated choice at a time, alone in its transform
type, with everything else as broad as the probe speaks (so that the only reason to refuse the
offer is the deprecated choice), and the post-quantum offer.

The defaults follow current guidance (docs/crypto-policy.md names the sources): RFC 8247 (IKEv2
algorithm requirements: DES, 3DES-for-new, MD5, SHA-1 integrity, PRF_HMAC_MD5, and groups 1, 2
and 5 are MUST NOT / SHOULD NOT), RFC 8221 (the same for ESP), NIST SP 800-131A rev. 2 and
BSI TR-02102-3 (DH of at least 2048 bits, no SHA-1 in integrity of new deployments).

Pure data and string building: the check (:mod:`probes.checks.ikev2_policy`) runs the offers.
"""

from __future__ import annotations

from dataclasses import dataclass

# every transform the probe can finish an exchange with (the broad background of each offer)
_CBC = ("aes128", "aes256", "3des", "des")
_GCM = ("aes128gcm16", "aes256gcm16")
_INTEG = ("sha256", "sha384", "sha512", "sha1", "md5")
_PRF = ("prfsha256", "prfsha384", "prfsha512", "prfsha1", "prfmd5")
# the first group is the one the KE payload carries: a strong one, so a responder that also
# accepts it answers without an INVALID_KE round
_GROUPS = ("ecp256", "curve25519", "ecp384", "modp2048", "modp1536", "modp1024", "modp768")
_ESP_INTEG = ("sha256", "sha384", "sha512", "sha1", "md5")


def _join(*parts: tuple[str, ...]) -> str:
    return "-".join(token for part in parts for token in part)


def _ike(*, cbc: tuple[str, ...] = _CBC, gcm: tuple[str, ...] = _GCM,
         integ: tuple[str, ...] = _INTEG, prf: tuple[str, ...] = _PRF,
         groups: tuple[str, ...] = _GROUPS) -> tuple[str, ...]:
    """IKE proposals: an AEAD one (when ``gcm``) and a CBC + HMAC one (when ``cbc``)."""
    out = []
    if gcm:
        out.append(_join(gcm, prf, groups))
    if cbc:
        out.append(_join(cbc, integ, prf, groups))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class WeakItem:
    """One deprecated choice: its name (a metric label), what it is, and what is offered.
    ``esp``: the ESP proposal(s) of the CHILD_SA (an IKE_AUTH, so it needs the PSK), made in a
    CREATE_CHILD_SA of its own without a key exchange when ``create_child``."""

    name: str
    what: str
    ike: tuple[str, ...]
    esp: str | None = None
    create_child: bool = False


_BROAD_IKE = _ike()

WEAK_ITEMS: tuple[WeakItem, ...] = (
    WeakItem("ike_encr_des", "DES encryption (IKE SA)", _ike(cbc=("des",), gcm=())),
    WeakItem("ike_encr_3des", "3DES encryption (IKE SA)", _ike(cbc=("3des",), gcm=())),
    WeakItem("ike_integ_md5", "HMAC-MD5-96 integrity (IKE SA)", _ike(integ=("md5",), gcm=())),
    WeakItem("ike_integ_sha1", "HMAC-SHA1-96 integrity (IKE SA)", _ike(integ=("sha1",), gcm=())),
    WeakItem("ike_prf_md5", "PRF HMAC-MD5 (IKE SA)", _ike(prf=("prfmd5",))),
    WeakItem("ike_prf_sha1", "PRF HMAC-SHA1 (IKE SA)", _ike(prf=("prfsha1",))),
    WeakItem("ike_dh_modp768", "DH group 1, 768-bit MODP (IKE SA)", _ike(groups=("modp768",))),
    WeakItem("ike_dh_modp1024", "DH group 2, 1024-bit MODP (IKE SA)",
             _ike(groups=("modp1024",))),
    WeakItem("ike_dh_modp1536", "DH group 5, 1536-bit MODP (IKE SA)",
             _ike(groups=("modp1536",))),
    WeakItem("esp_encr_des", "DES encryption (ESP)", _BROAD_IKE, _join(("des",), _ESP_INTEG)),
    WeakItem("esp_encr_3des", "3DES encryption (ESP)", _BROAD_IKE,
             _join(("3des",), _ESP_INTEG)),
    WeakItem("esp_integ_md5", "HMAC-MD5-96 integrity (ESP)", _BROAD_IKE,
             _join(_CBC, ("md5",))),
    WeakItem("esp_integ_sha1", "HMAC-SHA1-96 integrity (ESP)", _BROAD_IKE,
             _join(_CBC, ("sha1",))),
    # every cipher and integrity algorithm, no DH group and no KE payload: the missing key
    # exchange is the only reason left to refuse
    WeakItem("esp_no_pfs", "CHILD_SA without PFS (CREATE_CHILD_SA, no key exchange)",
             _BROAD_IKE, f"{_join(_GCM)},{_join(_CBC, _ESP_INTEG)}", create_child=True),
)
ITEMS_BY_NAME = {item.name: item for item in WEAK_ITEMS}
DEFAULT_ITEMS = tuple(item.name for item in WEAK_ITEMS)

# Post-quantum readiness: a hybrid exchange, ML-KEM-768 as Additional Key Exchange 1 (RFC 9370,
# draft-ietf-ipsecme-ikev2-mlkem) on top of a classical group, required (no NONE alternative):
# a responder that cannot do it must refuse, one that can must choose it.
PQ_ITEM = "ike_mlkem768"
PQ_PROPOSALS = (_join(_GCM, ("prfsha256", "prfsha384", "prfsha512"),
                      ("ecp256", "curve25519", "ecp384", "modp2048"), ("ke1_mlkem768",)),)
