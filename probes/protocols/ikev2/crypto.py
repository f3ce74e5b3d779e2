"""IKEv2 cryptography (RFC 7296 §2.13-2.15, RFC 5282 AES-GCM, RFC 5903 ECP, RFC 8031 Curve25519).

Everything here is deterministic given its inputs except key generation and IVs, which take an
injectable ``random_bytes`` so tests can pin them.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.asymmetric import dh, ec, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.utils import CryptographyDeprecationWarning

from probes.protocols.ikev2.payloads import IKEv2Error

RandomBytes = Callable[[int], bytes]

# --- algorithm identifiers (IANA "IKEv2 Transform Type N Transform IDs") ----------------------
# Beside the ones a healthy responder should choose, the deprecated ones (DES, 3DES, MD5, SHA-1,
# MODP groups below 2048 bits): the policy scan offers them and must be able to finish (and then
# delete) an IKE SA a weak responder accepts with them.
ENCR_DES = 2
ENCR_3DES = 3
ENCR_AES_CBC = 12
ENCR_AES_GCM_16 = 20
PRF_HMAC_MD5 = 1
PRF_HMAC_SHA1 = 2
PRF_HMAC_SHA2_256 = 5
PRF_HMAC_SHA2_384 = 6
PRF_HMAC_SHA2_512 = 7
AUTH_HMAC_MD5_96 = 1
AUTH_HMAC_SHA1_96 = 2
AUTH_HMAC_SHA2_256_128 = 12
AUTH_HMAC_SHA2_384_192 = 13
AUTH_HMAC_SHA2_512_256 = 14
GROUP_MODP_768 = 1
GROUP_MODP_1024 = 2
GROUP_MODP_1536 = 5
GROUP_MODP_2048 = 14
GROUP_ECP_256 = 19
GROUP_ECP_384 = 20
GROUP_CURVE25519 = 31

PRF_HASHES = {PRF_HMAC_MD5: "md5", PRF_HMAC_SHA1: "sha1", PRF_HMAC_SHA2_256: "sha256",
              PRF_HMAC_SHA2_384: "sha384", PRF_HMAC_SHA2_512: "sha512"}
# integrity id -> (hash, key length, truncated ICV length)
INTEG_ALGS = {AUTH_HMAC_MD5_96: ("md5", 16, 12), AUTH_HMAC_SHA1_96: ("sha1", 20, 12),
              AUTH_HMAC_SHA2_256_128: ("sha256", 32, 16),
              AUTH_HMAC_SHA2_384_192: ("sha384", 48, 24),
              AUTH_HMAC_SHA2_512_256: ("sha512", 64, 32)}
AEAD_CIPHERS = frozenset({ENCR_AES_GCM_16})
# CBC ciphers: id -> (block size, fixed key length in bytes; None: the Key Length attribute)
CBC_CIPHERS: dict[int, tuple[int, int | None]] = {ENCR_DES: (8, 8), ENCR_3DES: (8, 24),
                                                  ENCR_AES_CBC: (16, None)}
GCM_SALT_LEN = 4
GCM_IV_LEN = 8
GCM_ICV_LEN = 16

# The MODP groups' primes (generator 2): RFC 2409 groups 1 and 2, RFC 3526 groups 5 and 14,
# which share their leading digits (they are built from the binary expansion of pi)
_PI_HEAD = ("FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A"
            "08798E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42"
            "E9A6")
_MODP_PRIMES = {
    GROUP_MODP_768: int(_PI_HEAD + "3A3620FFFFFFFFFFFFFFFF", 16),
    GROUP_MODP_1024: int(_PI_HEAD + "37ED6B0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE64928"
                         "6651ECE65381FFFFFFFFFFFFFFFF", 16),
    GROUP_MODP_1536: int(_PI_HEAD + "37ED6B0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE64928"
                         "6651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F83655D23DCA3"
                         "AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA237327FFFF"
                         "FFFFFFFFFFFF", 16),
    GROUP_MODP_2048: int(_PI_HEAD + "37ED6B0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE64928"
                         "6651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F83655D23DCA3"
                         "AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C3290"
                         "5E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF69558"
                         "17183995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF",
                         16),
}
_modp_params: dict[int, dh.DHParameters] = {}
_OPENSSL_UNNAMED = frozenset({GROUP_MODP_768, GROUP_MODP_1024})  # RFC 3526's it knows by name


def _modp(group: int) -> dh.DHParameters:
    params = _modp_params.get(group)
    if params is None:  # built once per group; building one is not free
        with _ffdh_allowed():
            params = _modp_params[group] = dh.DHParameterNumbers(_MODP_PRIMES[group],
                                                                 2).parameters()
    return params


@contextlib.contextmanager
def _ffdh_allowed() -> Iterator[None]:
    """Group 14 is what many responders still ask for and the smaller ones are what the policy
    scan offers on purpose; probing them is the point, so the library's FFDH deprecation
    warning is noise here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        yield


SUPPORTED_GROUPS = (GROUP_MODP_768, GROUP_MODP_1024, GROUP_MODP_1536, GROUP_MODP_2048,
                    GROUP_ECP_256, GROUP_ECP_384, GROUP_CURVE25519)
KE_LENGTHS = {**{g: p.bit_length() // 8 for g, p in _MODP_PRIMES.items()},
              GROUP_ECP_256: 64, GROUP_ECP_384: 96, GROUP_CURVE25519: 32}


class KeyExchange:
    """One ephemeral DH/ECDH key pair of an IKE group; ``public`` is the KE payload data."""

    def __init__(self, group: int) -> None:
        if group not in KE_LENGTHS:
            raise IKEv2Error(f"DH group {group} is not supported")
        self.group = group
        self._private: (dh.DHPrivateKey | ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey
                        | int)
        if group in _OPENSSL_UNNAMED:
            # OpenSSL checks the parameters of a group it does not know by name, and every peer
            # value, for 0.1-0.2 s each; these groups are only ever offered to be refused (or
            # to name a responder that accepts them), so plain arithmetic with a 256-bit
            # exponent (twice the groups' strength) does
            self._private = secrets.randbits(256) | 1 << 255
            self.public = pow(2, self._private, _MODP_PRIMES[group]).to_bytes(
                KE_LENGTHS[group], "big")
        elif group in _MODP_PRIMES:
            with _ffdh_allowed():
                self._private = _modp(group).generate_private_key()
                y = self._private.public_key().public_numbers().y
            self.public = y.to_bytes(KE_LENGTHS[group], "big")
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
        size = KE_LENGTHS[self.group]
        if len(peer) != size:
            raise IKEv2Error(f"KE data of {len(peer)} bytes for group {self.group}")
        try:
            if self.group in _MODP_PRIMES:
                prime = _MODP_PRIMES[self.group]
                y = int.from_bytes(peer, "big")
                if not 1 < y < prime - 1:
                    raise IKEv2Error("MODP public value out of range")
                if isinstance(self._private, int):
                    return pow(y, self._private, prime).to_bytes(size, "big")
                ff = cast("dh.DHPrivateKey", self._private)
                with _ffdh_allowed():
                    pub = dh.DHPublicNumbers(y, _modp(self.group).parameter_numbers()).public_key()
                    return ff.exchange(pub).rjust(size, b"\0")
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
    additional: tuple[int, ...] = ()  # RFC 9370 additional key exchange methods, in order

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

    @property
    def _block(self) -> int:
        return CBC_CIPHERS[self.suite.encr][0]

    def _cbc(self, key: bytes, iv: bytes) -> Cipher[modes.CBC]:
        if self.suite.encr == ENCR_AES_CBC:
            return Cipher(algorithms.AES(key), modes.CBC(iv))
        # DES is 3DES with three equal keys (EDE with K1 = K2 = K3)
        return Cipher(TripleDES(key * 3 if len(key) == 8 else key), modes.CBC(iv))

    def sealed_length(self, plaintext_len: int) -> int:
        """Length of the SK body for ``plaintext_len`` bytes of inner payloads."""
        if self.suite.aead:
            return GCM_IV_LEN + plaintext_len + 1 + GCM_ICV_LEN
        block = self._block
        padded = (plaintext_len + 1 + block - 1) // block * block
        return block + padded + self._icv_len()

    def seal(self, prefix: bytes, plaintext: bytes) -> bytes:
        """``prefix`` is the IKE header plus the SK generic header (already carrying final
        lengths); returns the SK body (IV‖ciphertext‖ICV)."""
        if self.suite.aead:
            iv = self._random(GCM_IV_LEN)
            key, salt = self._out_e[:-GCM_SALT_LEN], self._out_e[-GCM_SALT_LEN:]
            ct = AESGCM(key).encrypt(salt + iv, plaintext + b"\x00", prefix)
            return iv + ct
        block = self._block
        pad_len = (-(len(plaintext) + 1)) % block
        iv = self._random(block)
        enc = self._cbc(self._out_e, iv).encryptor()
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
            block = self._block
            if len(body) < block * 2 + icv_len or (len(body) - icv_len) % block:
                raise IKEv2Error("Encrypted payload has a bad length")
            assert self.suite.integ is not None
            hash_name = INTEG_ALGS[self.suite.integ][0]
            expect = hmac.new(self._in_a, prefix + body[:-icv_len], hash_name).digest()[:icv_len]
            if not hmac.compare_digest(expect, body[-icv_len:]):
                raise IKEv2Error("Encrypted payload failed its integrity check")
            dec = self._cbc(self._in_e, body[:block]).decryptor()
            padded = dec.update(body[block:-icv_len]) + dec.finalize()
        pad_len = padded[-1]
        if pad_len + 1 > len(padded):
            raise IKEv2Error("Encrypted payload padding length overruns the plaintext")
        return padded[:-(pad_len + 1)]


def child_keymat(suite_hash: str, sk_d: bytes, nonce_i: bytes, nonce_r: bytes,
                 length: int) -> bytes:
    """§2.17: KEYMAT = prf+(SK_d, Ni | Nr) for a CHILD_SA created in IKE_AUTH (no PFS)."""
    return prf_plus(suite_hash, sk_d, nonce_i + nonce_r, length)

