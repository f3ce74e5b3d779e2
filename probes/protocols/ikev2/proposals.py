"""Proposal strings in strongSwan's notation (``aes256gcm16-prfsha256-ecp256``) to SA proposals,
the responder's chosen proposal back to a :class:`CipherSuite`, and transforms back to names.

Several tokens of one transform type in one string mean "any of these", as in strongSwan.
``ke1_mlkem768`` (strongSwan 6's notation) adds ML-KEM-768 as Additional Key Exchange 1
(RFC 9370), for the post-quantum offer of the policy scan.
"""

from __future__ import annotations

from probes.protocols.ikev2 import crypto as c
from probes.protocols.ikev2.payloads import (
    IKEv2Error,
    Proposal,
    ProtocolId,
    Transform,
    TransformType,
)

_ENCR_TOKENS = {
    "aes128": (c.ENCR_AES_CBC, 128), "aes192": (c.ENCR_AES_CBC, 192),
    "aes256": (c.ENCR_AES_CBC, 256),
    "aes128gcm16": (c.ENCR_AES_GCM_16, 128), "aes192gcm16": (c.ENCR_AES_GCM_16, 192),
    "aes256gcm16": (c.ENCR_AES_GCM_16, 256),
    "aes128gcm128": (c.ENCR_AES_GCM_16, 128), "aes256gcm128": (c.ENCR_AES_GCM_16, 256),
    "3des": (c.ENCR_3DES, None), "des": (c.ENCR_DES, None),
}
_INTEG_TOKENS = {"md5": c.AUTH_HMAC_MD5_96, "sha1": c.AUTH_HMAC_SHA1_96,
                 "sha256": c.AUTH_HMAC_SHA2_256_128, "sha384": c.AUTH_HMAC_SHA2_384_192,
                 "sha512": c.AUTH_HMAC_SHA2_512_256}
_PRF_TOKENS = {"prfmd5": c.PRF_HMAC_MD5, "prfsha1": c.PRF_HMAC_SHA1,
               "prfsha256": c.PRF_HMAC_SHA2_256, "prfsha384": c.PRF_HMAC_SHA2_384,
               "prfsha512": c.PRF_HMAC_SHA2_512}
_INTEG_TO_PRF = {c.AUTH_HMAC_MD5_96: c.PRF_HMAC_MD5, c.AUTH_HMAC_SHA1_96: c.PRF_HMAC_SHA1,
                 c.AUTH_HMAC_SHA2_256_128: c.PRF_HMAC_SHA2_256,
                 c.AUTH_HMAC_SHA2_384_192: c.PRF_HMAC_SHA2_384,
                 c.AUTH_HMAC_SHA2_512_256: c.PRF_HMAC_SHA2_512}
_GROUP_TOKENS = {"modp768": c.GROUP_MODP_768, "modp1024": c.GROUP_MODP_1024,
                 "modp1536": c.GROUP_MODP_1536, "modp2048": c.GROUP_MODP_2048,
                 "ecp256": c.GROUP_ECP_256, "ecp384": c.GROUP_ECP_384,
                 "curve25519": c.GROUP_CURVE25519, "x25519": c.GROUP_CURVE25519}
# Key Exchange Method ids of ML-KEM (draft-ietf-ipsecme-ikev2-mlkem; IANA "Transform Type 4")
KE_MLKEM512, KE_MLKEM768, KE_MLKEM1024 = 35, 36, 37
MLKEM_METHODS = frozenset({KE_MLKEM512, KE_MLKEM768, KE_MLKEM1024})
_ADDKE_METHODS = {"mlkem512": KE_MLKEM512, "mlkem768": KE_MLKEM768, "mlkem1024": KE_MLKEM1024}
ADDKE_TYPES = range(TransformType.ADDKE1, TransformType.ADDKE7 + 1)
ESN_NONE = 0

DEFAULT_IKE_PROPOSALS = (
    "aes128gcm16-aes256gcm16-prfsha256-prfsha384-prfsha512-curve25519-ecp256-ecp384-modp2048",
    "aes128-aes256-sha256-sha384-sha512-curve25519-ecp256-ecp384-modp2048",
)
DEFAULT_ESP_PROPOSAL = "aes256gcm16-aes128gcm16"


def _addke(token: str) -> Transform | None:
    """``ke<n>_<method>``: Additional Key Exchange n (RFC 9370), e.g. ``ke1_mlkem768``."""
    head, _, method = token.partition("_")
    if not (head.startswith("ke") and head[2:].isdigit() and method in _ADDKE_METHODS):
        return None
    n = int(head[2:])
    if not 1 <= n <= len(ADDKE_TYPES):
        return None
    return Transform(ADDKE_TYPES[n - 1], _ADDKE_METHODS[method])


def parse_ike_proposal(text: str, number: int) -> Proposal:
    """One IKE proposal; raises IKEv2Error naming the first unknown or missing piece."""
    encr: list[Transform] = []
    integ: list[Transform] = []
    prfs: list[Transform] = []
    groups: list[Transform] = []
    addke: list[Transform] = []
    for token in text.lower().split("-"):
        if token in _ENCR_TOKENS:
            tid, bits = _ENCR_TOKENS[token]
            encr.append(Transform(TransformType.ENCR, tid, bits))
        elif token in _INTEG_TOKENS:
            integ.append(Transform(TransformType.INTEG, _INTEG_TOKENS[token]))
        elif token in _PRF_TOKENS:
            prfs.append(Transform(TransformType.PRF, _PRF_TOKENS[token]))
        elif token in _GROUP_TOKENS:
            groups.append(Transform(TransformType.DH, _GROUP_TOKENS[token]))
        elif (extra := _addke(token)) is not None:
            addke.append(extra)
        else:
            raise IKEv2Error(f"unknown algorithm {token!r} in proposal {text!r}")
    if not encr or not groups:
        raise IKEv2Error(f"proposal {text!r} needs an encryption algorithm and a DH group")
    aead = {t.id in c.AEAD_CIPHERS for t in encr}
    if len(aead) > 1:
        raise IKEv2Error(f"proposal {text!r} mixes AEAD and non-AEAD ciphers")
    if aead == {True}:
        if integ:
            raise IKEv2Error(f"AEAD proposal {text!r} must not name an integrity algorithm")
        if not prfs:
            prfs = [Transform(TransformType.PRF, c.PRF_HMAC_SHA2_256)]
    else:
        if not integ:
            raise IKEv2Error(f"proposal {text!r} needs an integrity algorithm")
        if not prfs:  # strongSwan derives the PRF from the integrity algorithms
            prfs = [Transform(TransformType.PRF, _INTEG_TO_PRF[t.id]) for t in integ]
    return Proposal(number, ProtocolId.IKE, tuple(encr + prfs + integ + groups + addke))


def parse_ike_proposals(texts: tuple[str, ...] | list[str]) -> tuple[Proposal, ...]:
    if not texts:
        raise IKEv2Error("at least one IKE proposal is needed")
    return tuple(parse_ike_proposal(t, i + 1) for i, t in enumerate(texts))


def parse_esp_proposal(text: str, spi: bytes, *, aead_only: bool = True) -> Proposal:
    """An ESP proposal. The tunnel level speaks ESP itself, with AES-GCM only (``aead_only``);
    the policy scan only negotiates a CHILD_SA, so it may offer any cipher, integrity
    algorithm and (for PFS in CREATE_CHILD_SA) DH group."""
    encr: list[Transform] = []
    integ: list[Transform] = []
    groups: list[Transform] = []
    for token in text.lower().split("-"):
        if token in _ENCR_TOKENS and (not aead_only or _ENCR_TOKENS[token][0]
                                      in c.AEAD_CIPHERS):
            tid, bits = _ENCR_TOKENS[token]
            encr.append(Transform(TransformType.ENCR, tid, bits))
        elif not aead_only and token in _INTEG_TOKENS:
            integ.append(Transform(TransformType.INTEG, _INTEG_TOKENS[token]))
        elif not aead_only and token in _GROUP_TOKENS:
            groups.append(Transform(TransformType.DH, _GROUP_TOKENS[token]))
        elif token != "noesn":  # noqa: S105 - an algorithm token, not a secret
            only = "only AES-GCM-16 is supported, " if aead_only else ""
            raise IKEv2Error(f"ESP proposal {text!r}: {only}not {token!r}")
    if not encr:
        raise IKEv2Error(f"ESP proposal {text!r} names no cipher")
    if not aead_only and (not integ) != all(t.id in c.AEAD_CIPHERS for t in encr):
        raise IKEv2Error(f"ESP proposal {text!r}: an integrity algorithm goes with a non-AEAD "
                         "cipher, and only with one")
    return Proposal(1, ProtocolId.ESP,
                    (*encr, *integ, *groups, Transform(TransformType.ESN, ESN_NONE)), spi)


def parse_esp_proposals(text: str, spi: bytes, *, aead_only: bool = True
                        ) -> tuple[Proposal, ...]:
    """Comma-separated ESP proposals (an AEAD one and a CBC + HMAC one cannot be one proposal),
    numbered from 1, all with our ``spi``."""
    return tuple(Proposal(i + 1, ProtocolId.ESP, parse_esp_proposal(part, spi,
                                                                    aead_only=aead_only).transforms,
                          spi)
                 for i, part in enumerate(text.split(",")))


def groups_of(proposals: tuple[Proposal, ...]) -> list[int]:
    """DH groups in preference order, without repeats."""
    out: list[int] = []
    for p in proposals:
        for t in p.transforms:
            if t.type == TransformType.DH and t.id not in out:
                out.append(t.id)
    return out


def _offered(proposals: tuple[Proposal, ...], t: Transform) -> bool:
    return any(t in p.transforms for p in proposals)


def chosen_suite(chosen: Proposal, offered: tuple[Proposal, ...]) -> c.CipherSuite:
    """Validate the responder's single chosen IKE proposal against what we offered."""
    by_type: dict[int, Transform] = {}
    for t in chosen.transforms:
        if t.type in by_type:
            raise IKEv2Error(f"chosen proposal has two transforms of type {t.type}")
        if not _offered(offered, t):
            raise IKEv2Error(f"responder chose transform {t.type}/{t.id} that was not offered")
        by_type[t.type] = t
    encr, prf, group = (by_type.get(TransformType.ENCR), by_type.get(TransformType.PRF),
                        by_type.get(TransformType.DH))
    integ = by_type.get(TransformType.INTEG)
    if encr is None or prf is None or group is None:
        raise IKEv2Error("chosen proposal lacks encryption, PRF or DH group")
    if (encr.id in c.AEAD_CIPHERS) == (integ is not None):
        raise IKEv2Error("chosen proposal has the wrong integrity transform for its cipher")
    return c.CipherSuite(encr.id, _key_bytes(encr), prf.id,
                         None if integ is None else integ.id, group.id,
                         tuple(by_type[t].id for t in ADDKE_TYPES if t in by_type))


def _key_bytes(encr: Transform) -> int:
    fixed = c.CBC_CIPHERS.get(encr.id, (0, None))[1]
    if fixed is not None:
        return fixed
    if encr.key_length is None:
        raise IKEv2Error(f"cipher {encr.id} chosen without a key length")
    return encr.key_length // 8


def chosen_esp(chosen: Proposal, offered: Proposal) -> Proposal:
    """The responder's chosen ESP proposal, checked against our offer (one SPI of 4 bytes, only
    transforms we offered, one of each type)."""
    seen: set[int] = set()
    for t in chosen.transforms:
        if t not in offered.transforms or t.type in seen:
            raise IKEv2Error(f"responder chose ESP transform {t.type}/{t.id} that was not "
                             "offered (or two of one type)")
        seen.add(t.type)
    if TransformType.ENCR not in seen:
        raise IKEv2Error("responder's ESP proposal has no cipher")
    if len(chosen.spi) != 4:
        raise IKEv2Error("responder's ESP SPI is not 4 bytes")
    return chosen


def chosen_esp_key_bytes(chosen: Proposal, offered: Proposal) -> int:
    """Key length in bytes of the responder's chosen ESP AES-GCM transform."""
    encr = chosen_esp(chosen, offered).transform(TransformType.ENCR)
    if encr is None or encr.key_length is None:
        raise IKEv2Error("responder chose an ESP cipher without a key length")
    return encr.key_length // 8


# --- names (strongSwan's tokens: what operators write in their configs) ------------------------

_ENCR_NAMES = {(tid, bits): name for name, (tid, bits) in _ENCR_TOKENS.items()
               if "gcm128" not in name}
_INTEG_NAMES = {tid: name for name, tid in _INTEG_TOKENS.items()}
_PRF_NAMES = {tid: name for name, tid in _PRF_TOKENS.items()}
_GROUP_NAMES = {tid: name for name, tid in _GROUP_TOKENS.items() if name != "curve25519"}
_GROUP_NAMES.update({tid: name for name, tid in _ADDKE_METHODS.items()})


def encr_name(encr: int, key_bits: int | None) -> str:
    """A cipher as strongSwan writes it (``aes256gcm16``, ``3des``); "unknown" otherwise, so
    that a metric label stays one of a known few."""
    fixed = c.CBC_CIPHERS.get(encr, (0, None))[1]
    return _ENCR_NAMES.get((encr, None if fixed else key_bits), "unknown")


def integ_name(integ: int | None) -> str:
    return "none" if integ is None else _INTEG_NAMES.get(integ, "unknown")


def prf_name(prf: int) -> str:
    return _PRF_NAMES.get(prf, "unknown")


def group_name(group: int | None) -> str:
    return "none" if group is None else _GROUP_NAMES.get(group, "unknown")


def suite_label(suite: c.CipherSuite) -> str:
    """The IKE SA's algorithms in strongSwan's notation (``aes256gcm16-prfsha256-ecp256``)."""
    parts = [encr_name(suite.encr, suite.encr_key_bytes * 8)]
    if suite.integ is not None:
        parts.append(integ_name(suite.integ))
    parts += [prf_name(suite.prf), group_name(suite.group)]
    parts += [f"ke{i + 1}_{group_name(m)}" for i, m in enumerate(suite.additional)]
    return "-".join(parts)


def esp_label(proposal: Proposal) -> str:
    """A chosen ESP proposal in strongSwan's notation (``aes256gcm16``, ``3des-sha1-modp2048``)."""
    parts: list[str] = []
    for t in proposal.transforms:
        if t.type == TransformType.ENCR:
            parts.append(encr_name(t.id, t.key_length))
        elif t.type == TransformType.INTEG:
            parts.append(integ_name(t.id))
        elif t.type == TransformType.DH:
            parts.append(group_name(t.id))
        elif t.type == TransformType.ESN and t.id != ESN_NONE:
            parts.append("esn")
    return "-".join(parts)
