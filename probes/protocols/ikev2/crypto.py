"""IKEv2 cryptography (RFC 7296 §2.13-2.15, RFC 5282 AES-GCM, RFC 5903 ECP, RFC 8031 Curve25519).

Everything here is deterministic given its inputs except key generation and IVs, which take an
injectable ``random_bytes`` so tests can pin them.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import dh, ec, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.utils import CryptographyDeprecationWarning

from probes.protocols.ikev2.payloads import IKEv2Error

RandomBytes = Callable[[int], bytes]

# --- algorithm identifiers (IANA "IKEv2 Transform Type N Transform IDs") ----------------------
ENCR_AES_CBC = 12
ENCR_AES_GCM_16 = 20
PRF_HMAC_SHA2_256 = 5
PRF_HMAC_SHA2_384 = 6
PRF_HMAC_SHA2_512 = 7
AUTH_HMAC_SHA2_256_128 = 12
AUTH_HMAC_SHA2_384_192 = 13
AUTH_HMAC_SHA2_512_256 = 14
GROUP_MODP_2048 = 14
GROUP_ECP_256 = 19
GROUP_ECP_384 = 20
GROUP_CURVE25519 = 31

PRF_HASHES = {PRF_HMAC_SHA2_256: "sha256", PRF_HMAC_SHA2_384: "sha384",
              PRF_HMAC_SHA2_512: "sha512"}
# integrity id -> (hash, key length, truncated ICV length)
INTEG_ALGS = {AUTH_HMAC_SHA2_256_128: ("sha256", 32, 16),
              AUTH_HMAC_SHA2_384_192: ("sha384", 48, 24),
              AUTH_HMAC_SHA2_512_256: ("sha512", 64, 32)}
AEAD_CIPHERS = frozenset({ENCR_AES_GCM_16})
GCM_SALT_LEN = 4
GCM_IV_LEN = 8
GCM_ICV_LEN = 16
CBC_BLOCK = 16

# RFC 3526 group 14 prime, generator 2
_MODP_2048_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E34"
    "04DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6"
    "F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A6916"
    "3FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C"
    "32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA95"
    "6AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF", 16)
_modp_2048_params: dh.DHParameters | None = None


def _modp_2048() -> dh.DHParameters:
    global _modp_2048_params  # noqa: PLW0603 - built once; building it is not free
    if _modp_2048_params is None:
        with _ffdh_allowed():
            _modp_2048_params = dh.DHParameterNumbers(_MODP_2048_P, 2).parameters()
    return _modp_2048_params


@contextlib.contextmanager
def _ffdh_allowed() -> Iterator[None]:
    """Group 14 is what many responders still ask for; probing it is the point, so the
    library's FFDH deprecation warning is noise here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        yield


SUPPORTED_GROUPS = (GROUP_MODP_2048, GROUP_ECP_256, GROUP_ECP_384, GROUP_CURVE25519)
KE_LENGTHS = {GROUP_MODP_2048: 256, GROUP_ECP_256: 64, GROUP_ECP_384: 96, GROUP_CURVE25519: 32}


class KeyExchange:
    """One ephemeral DH/ECDH key pair of an IKE group; ``public`` is the KE payload data."""

    def __init__(self, group: int) -> None:
        if group not in KE_LENGTHS:
            raise IKEv2Error(f"DH group {group} is not supported")
        self.group = group
        self._private: dh.DHPrivateKey | ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey
        if group == GROUP_MODP_2048:
            with _ffdh_allowed():
                self._private = _modp_2048().generate_private_key()
                y = self._private.public_key().public_numbers().y
            self.public = y.to_bytes(256, "big")
        elif group == GROUP_CURVE25519:
            self._private = x25519.X25519PrivateKey.generate()
            self.public = self._private.public_key().public_bytes_raw()
        else:
            curve: ec.EllipticCurve = ec.SECP256R1() if group == GROUP_ECP_256 else ec.SECP384R1()
            self._private = ec.generate_private_key(curve)
            nums = self._private.public_key().public_numbers()
            size = KE_LENGTHS[group] // 2
            self.public = nums.x.to_bytes(size, "big") + nums.y.to_bytes(size, "big")

    def shared_secret(self, peer: bytes) -> bytes:
        """g^ir; raises IKEv2Error on a peer value of the wrong size or not on the curve."""
        if len(peer) != KE_LENGTHS[self.group]:
            raise IKEv2Error(f"KE data of {len(peer)} bytes for group {self.group}")
        try:
            if self.group == GROUP_MODP_2048:
                y = int.from_bytes(peer, "big")
                if not 1 < y < _MODP_2048_P - 1:
                    raise IKEv2Error("MODP public value out of range")
                with _ffdh_allowed():
                    pub = dh.DHPublicNumbers(y, _modp_2048().parameter_numbers()).public_key()
                    return cast("dh.DHPrivateKey", self._private).exchange(pub).rjust(256, b"\0")
            if isinstance(self._private, x25519.X25519PrivateKey):
                return self._private.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
            private = cast("ec.EllipticCurvePrivateKey", self._private)
            point = ec.EllipticCurvePublicKey.from_encoded_point(private.curve, b"\x04" + peer)
            return private.exchange(ec.ECDH(), point)  # x coordinate only (RFC 5903 §7)
        except ValueError as exc:
            if isinstance(exc, IKEv2Error):
                raise
            raise IKEv2Error(f"bad KE data for group {self.group}: {exc}") from None


def prf(hash_name: str, key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hash_name).digest()


def prf_plus(hash_name: str, key: bytes, seed: bytes, length: int) -> bytes:
    """prf+ (§2.13): T1 = prf(K, S|0x01), Tn = prf(K, Tn-1|S|n)."""
    out = bytearray()
    block = b""
    counter = 1
    while len(out) < length:
        if counter > 255:
            raise IKEv2Error("prf+ asked for more than 255 blocks")
        block = prf(hash_name, key, block + seed + bytes([counter]))
        out += block
        counter += 1
    return bytes(out[:length])


@dataclass(frozen=True, slots=True)
class CipherSuite:
    """The negotiated IKE SA algorithms; ``encr_key_bytes`` excludes the GCM salt."""

    encr: int
    encr_key_bytes: int
    prf: int
    integ: int | None  # None for AEAD
    group: int

    @property
    def prf_hash(self) -> str:
        return PRF_HASHES[self.prf]

    @property
    def prf_len(self) -> int:
        return hashlib.new(self.prf_hash).digest_size

    @property
    def aead(self) -> bool:
        return self.encr in AEAD_CIPHERS

    @property
    def encr_keymat(self) -> int:
        return self.encr_key_bytes + (GCM_SALT_LEN if self.aead else 0)

    @property
    def integ_keymat(self) -> int:
        return 0 if self.integ is None else INTEG_ALGS[self.integ][1]


@dataclass(frozen=True, slots=True)
class IkeKeys:
    sk_d: bytes
    sk_ai: bytes
    sk_ar: bytes
    sk_ei: bytes
    sk_er: bytes
    sk_pi: bytes
    sk_pr: bytes


def derive_ike_keys(suite: CipherSuite, shared: bytes, *, nonce_i: bytes, nonce_r: bytes,
                    spi_i: bytes, spi_r: bytes) -> IkeKeys:
    """§2.14: SKEYSEED = prf(Ni|Nr, g^ir);
    {SK_d|ai|ar|ei|er|pi|pr} = prf+(SKEYSEED, Ni|Nr|SPIi|SPIr)."""
    h = suite.prf_hash
    skeyseed = prf(h, nonce_i + nonce_r, shared)
    sizes = [suite.prf_len, suite.integ_keymat, suite.integ_keymat, suite.encr_keymat,
             suite.encr_keymat, suite.prf_len, suite.prf_len]
    stream = prf_plus(h, skeyseed, nonce_i + nonce_r + spi_i + spi_r, sum(sizes))
    parts: list[bytes] = []
    pos = 0
    for size in sizes:
        parts.append(stream[pos:pos + size])
        pos += size
    return IkeKeys(*parts)


def psk_auth(hash_name: str, psk: bytes, *, message: bytes, nonce_peer: bytes, sk_p: bytes,
             id_body: bytes) -> bytes:
    """§2.15: AUTH = prf(prf(PSK, "Key Pad for IKEv2"), <msg> | Nonce_peer | prf(SK_p, IDbody)),
    where <msg> is the sender's IKE_SA_INIT message."""
    key = prf(hash_name, psk, b"Key Pad for IKEv2")
    return prf(hash_name, key, message + nonce_peer + prf(hash_name, sk_p, id_body))


def nat_detection_hash(spi_i: bytes, spi_r: bytes, address: bytes, port: int) -> bytes:
    """§2.23: SHA-1(SPIi | SPIr | IP | port). Mandated by the RFC, not a security choice."""
    return hashlib.sha1(spi_i + spi_r + address + struct.pack("!H", port)).digest()  # noqa: S324


class SkCodec:
    """Seals and opens the Encrypted payload for one direction pair of an IKE SA (§3.14)."""

    def __init__(self, suite: CipherSuite, keys: IkeKeys, random_bytes: RandomBytes) -> None:
        self.suite = suite
        self._random = random_bytes
        self._out_e, self._in_e = keys.sk_ei, keys.sk_er
        self._out_a, self._in_a = keys.sk_ai, keys.sk_ar

    def _icv_len(self) -> int:
        if self.suite.aead:
            return GCM_ICV_LEN
        assert self.suite.integ is not None
        return INTEG_ALGS[self.suite.integ][2]

    def sealed_length(self, plaintext_len: int) -> int:
        """Length of the SK body for ``plaintext_len`` bytes of inner payloads."""
        if self.suite.aead:
            return GCM_IV_LEN + plaintext_len + 1 + GCM_ICV_LEN
        padded = (plaintext_len + 1 + CBC_BLOCK - 1) // CBC_BLOCK * CBC_BLOCK
        return CBC_BLOCK + padded + self._icv_len()

    def seal(self, prefix: bytes, plaintext: bytes) -> bytes:
        """``prefix`` is the IKE header plus the SK generic header (already carrying final
        lengths); returns the SK body (IV‖ciphertext‖ICV)."""
        if self.suite.aead:
            iv = self._random(GCM_IV_LEN)
            key, salt = self._out_e[:-GCM_SALT_LEN], self._out_e[-GCM_SALT_LEN:]
            ct = AESGCM(key).encrypt(salt + iv, plaintext + b"\x00", prefix)
            return iv + ct
        pad_len = (-(len(plaintext) + 1)) % CBC_BLOCK
        iv = self._random(CBC_BLOCK)
        enc = Cipher(algorithms.AES(self._out_e), modes.CBC(iv)).encryptor()
        ct = enc.update(plaintext + bytes(pad_len) + bytes([pad_len])) + enc.finalize()
        assert self.suite.integ is not None
        hash_name, _, icv_len = INTEG_ALGS[self.suite.integ]
        icv = hmac.new(self._out_a, prefix + iv + ct, hash_name).digest()[:icv_len]
        return iv + ct + icv

    def open(self, prefix: bytes, body: bytes) -> bytes:
        """Inverse of :meth:`seal` for the responder's direction; returns the inner payloads."""
        icv_len = self._icv_len()
        if self.suite.aead:
            if len(body) < GCM_IV_LEN + GCM_ICV_LEN + 1:
                raise IKEv2Error("Encrypted payload too short")
            key, salt = self._in_e[:-GCM_SALT_LEN], self._in_e[-GCM_SALT_LEN:]
            try:
                padded = AESGCM(key).decrypt(salt + body[:GCM_IV_LEN], body[GCM_IV_LEN:], prefix)
            except InvalidTag:
                raise IKEv2Error("Encrypted payload failed authentication") from None
        else:
            if len(body) < CBC_BLOCK * 2 + icv_len or (len(body) - icv_len) % CBC_BLOCK:
                raise IKEv2Error("Encrypted payload has a bad length")
            assert self.suite.integ is not None
            hash_name = INTEG_ALGS[self.suite.integ][0]
            expect = hmac.new(self._in_a, prefix + body[:-icv_len], hash_name).digest()[:icv_len]
            if not hmac.compare_digest(expect, body[-icv_len:]):
                raise IKEv2Error("Encrypted payload failed its integrity check")
            dec = Cipher(algorithms.AES(self._in_e), modes.CBC(body[:CBC_BLOCK])).decryptor()
            padded = dec.update(body[CBC_BLOCK:-icv_len]) + dec.finalize()
        pad_len = padded[-1]
        if pad_len + 1 > len(padded):
            raise IKEv2Error("Encrypted payload padding length overruns the plaintext")
        return padded[:-(pad_len + 1)]


def child_keymat(suite_hash: str, sk_d: bytes, nonce_i: bytes, nonce_r: bytes,
                 length: int) -> bytes:
    """§2.17: KEYMAT = prf+(SK_d, Ni | Nr) for a CHILD_SA created in IKE_AUTH (no PFS)."""
    return prf_plus(suite_hash, sk_d, nonce_i + nonce_r, length)

