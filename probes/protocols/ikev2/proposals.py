"""Proposal strings in strongSwan's notation (``aes256gcm16-prfsha256-ecp256``) to SA proposals,
and the responder's chosen proposal back to a :class:`CipherSuite`.

Several tokens of one transform type in one string mean "any of these", as in strongSwan.
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
}
_INTEG_TOKENS = {"sha256": c.AUTH_HMAC_SHA2_256_128, "sha384": c.AUTH_HMAC_SHA2_384_192,
                 "sha512": c.AUTH_HMAC_SHA2_512_256}
_PRF_TOKENS = {"prfsha256": c.PRF_HMAC_SHA2_256, "prfsha384": c.PRF_HMAC_SHA2_384,
               "prfsha512": c.PRF_HMAC_SHA2_512}
_INTEG_TO_PRF = {c.AUTH_HMAC_SHA2_256_128: c.PRF_HMAC_SHA2_256,
                 c.AUTH_HMAC_SHA2_384_192: c.PRF_HMAC_SHA2_384,
                 c.AUTH_HMAC_SHA2_512_256: c.PRF_HMAC_SHA2_512}
_GROUP_TOKENS = {"modp2048": c.GROUP_MODP_2048, "ecp256": c.GROUP_ECP_256,
                 "ecp384": c.GROUP_ECP_384, "curve25519": c.GROUP_CURVE25519,
                 "x25519": c.GROUP_CURVE25519}
ESN_NONE = 0

DEFAULT_IKE_PROPOSALS = (
    "aes128gcm16-aes256gcm16-prfsha256-prfsha384-prfsha512-curve25519-ecp256-ecp384-modp2048",
    "aes128-aes256-sha256-sha384-sha512-curve25519-ecp256-ecp384-modp2048",
)
DEFAULT_ESP_PROPOSAL = "aes256gcm16-aes128gcm16"


def parse_ike_proposal(text: str, number: int) -> Proposal:
    """One IKE proposal; raises IKEv2Error naming the first unknown or missing piece."""
    encr: list[Transform] = []
    integ: list[Transform] = []
    prfs: list[Transform] = []
    groups: list[Transform] = []
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
    return Proposal(number, ProtocolId.IKE, tuple(encr + prfs + integ + groups))


def parse_ike_proposals(texts: tuple[str, ...] | list[str]) -> tuple[Proposal, ...]:
    if not texts:
        raise IKEv2Error("at least one IKE proposal is needed")
    return tuple(parse_ike_proposal(t, i + 1) for i, t in enumerate(texts))


def parse_esp_proposal(text: str, spi: bytes) -> Proposal:
    """ESP for the tunnel level: AES-GCM only (the probe's ESP implementation)."""
    encr: list[Transform] = []
    for token in text.lower().split("-"):
        if token in _ENCR_TOKENS and _ENCR_TOKENS[token][0] in c.AEAD_CIPHERS:
            tid, bits = _ENCR_TOKENS[token]
            encr.append(Transform(TransformType.ENCR, tid, bits))
        elif token not in ("noesn",):
            raise IKEv2Error(f"ESP proposal {text!r}: only AES-GCM-16 is supported, not {token!r}")
    if not encr:
        raise IKEv2Error(f"ESP proposal {text!r} names no cipher")
    return Proposal(1, ProtocolId.ESP, (*encr, Transform(TransformType.ESN, ESN_NONE)), spi)


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
    if encr is None or prf is None or group is None or encr.key_length is None:
        raise IKEv2Error("chosen proposal lacks encryption, PRF or DH group")
    if (encr.id in c.AEAD_CIPHERS) == (integ is not None):
        raise IKEv2Error("chosen proposal has the wrong integrity transform for its cipher")
    return c.CipherSuite(encr.id, encr.key_length // 8, prf.id,
                         None if integ is None else integ.id, group.id)


def chosen_esp_key_bytes(chosen: Proposal, offered: Proposal) -> int:
    """Key length in bytes of the responder's chosen ESP AES-GCM transform."""
    encr = chosen.transform(TransformType.ENCR)
    if encr is None or encr not in offered.transforms or encr.key_length is None:
        raise IKEv2Error("responder chose an ESP cipher that was not offered")
    if len(chosen.spi) != 4:
        raise IKEv2Error("responder's ESP SPI is not 4 bytes")
    return encr.key_length // 8
