"""AEAD algorithms, data-key wrapping and the chunk maths of format v2.

All AEAD calls use empty associated data, as the reference does (format/SPEC.md §4).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ..errors import IntegrityError, UnknownAlgorithmError, WrongKeyError

NONCE_LEN = 12
TAG_LEN = 16
DEFAULT_CHUNK_SIZE = 2 * 1024 * 1024
U32_MAX = 0xFFFFFFFF


@dataclass(frozen=True)
class Algorithm:
    name: str
    key_len: int
    cls: type


ALGORITHMS: dict[str, Algorithm] = {
    "aes128gcm": Algorithm("aes128gcm", 16, AESGCM),
    "aes256gcm": Algorithm("aes256gcm", 32, AESGCM),
    "chacha20poly1305": Algorithm("chacha20poly1305", 32, ChaCha20Poly1305),
}


def algorithm(name: str) -> Algorithm:
    """Look an algorithm up the way the reference parses it: case-insensitive, '-' ignored."""
    if not isinstance(name, str):
        raise UnknownAlgorithmError(f"algorithm must be a string, got {name!r}")
    norm = name.lower().replace("-", "")
    try:
        return ALGORITHMS[norm]
    except KeyError:
        raise UnknownAlgorithmError(
            f"unknown algorithm {name!r} (supported: {', '.join(ALGORITHMS)})") from None


def cipher(alg: Algorithm, key: bytes):
    if len(key) != alg.key_len:
        raise WrongKeyError(f"{alg.name} needs a {alg.key_len}-byte key, got {len(key)} bytes")
    return alg.cls(key)


def seal(aead, nonce: bytes, plaintext: bytes) -> tuple[bytes, bytes]:
    """Encrypt; returns (ciphertext, tag) stored separately as the format does."""
    out = aead.encrypt(nonce, plaintext, None)
    return out[:-TAG_LEN], out[-TAG_LEN:]


def wrap_key(alg: Algorithm, master_key: bytes, dek: bytes) -> tuple[bytes, bytes, bytes]:
    """Wrap a data key under the master key: (wrapped_key, key_iv, key_tag)."""
    key_iv = os.urandom(NONCE_LEN)
    wrapped, tag = seal(cipher(alg, master_key), key_iv, dek)
    return wrapped, key_iv, tag


def unwrap_key(alg: Algorithm, master_aead, wrapped: bytes, key_iv: bytes, key_tag: bytes,
               *, what: str) -> bytes:
    try:
        dek = master_aead.decrypt(key_iv, wrapped + key_tag, None)
    except InvalidTag:
        raise WrongKeyError(f"{what}: the master key does not unwrap its data key "
                            f"(wrong key, or the wrapped key was altered)") from None
    if len(dek) != alg.key_len:
        raise WrongKeyError(f"{what}: unwrapped data key has {len(dek)} bytes, "
                            f"{alg.name} needs {alg.key_len}")
    return dek


# --- v2 chunks ---------------------------------------------------------------------------

def num_chunks(length: int, chunk_size: int) -> int:
    """Number of chunks (and tags) of a tensor: at least one, even when empty."""
    return max(1, -(-length // chunk_size))


def chunk_nonce(base_iv: bytes, index: int) -> bytes:
    """Nonce of chunk ``index``: base_iv[0:8] || BE32(BE32(base_iv[8:12]) + index)."""
    ctr = int.from_bytes(base_iv[8:12], "big") + index
    if index > U32_MAX or ctr > U32_MAX:
        raise IntegrityError(f"chunk {index} overflows the IV counter")
    return base_iv[:8] + ctr.to_bytes(4, "big")


def new_base_iv(chunks: int) -> bytes:
    """A random base IV whose counter cannot overflow over ``chunks`` chunks (the
    reference refuses to read a file whose counter would wrap)."""
    if chunks - 1 > U32_MAX:
        raise ValueError("too many chunks for one tensor")
    while True:
        iv = os.urandom(NONCE_LEN)
        if int.from_bytes(iv[8:12], "big") + chunks - 1 <= U32_MAX:
            return iv


def open_into(aead, nonce: bytes, sealed, out) -> None:
    """Authenticated decryption of ``sealed`` (ciphertext || tag) into ``out``.

    Raises InvalidTag; ``out`` then holds no plaintext the caller may use.
    """
    aead.decrypt_into(nonce, sealed, None, out)


__all__ = [
    "ALGORITHMS", "Algorithm", "DEFAULT_CHUNK_SIZE", "InvalidTag", "NONCE_LEN", "TAG_LEN",
    "algorithm", "chunk_nonce", "cipher", "new_base_iv", "num_chunks", "open_into", "seal",
    "unwrap_key", "wrap_key",
]


# --- streaming AEAD (v1 tensors larger than memory should allow) ----------------------------
#
# Format v1 seals a whole tensor in one AEAD call. To keep the writer's memory bounded and
# the reader's at one copy of the tensor, both algorithms are also run incrementally:
# AES-GCM through the GCM mode of `Cipher`, ChaCha20-Poly1305 as RFC 8439 §2.8 builds it
# from ChaCha20 and Poly1305. Outputs are identical to the one-shot AEADs (tested).

from cryptography.hazmat.primitives import constant_time  # noqa: E402
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: E402
from cryptography.hazmat.primitives.poly1305 import Poly1305  # noqa: E402


class _ChaChaPolyStream:
    def __init__(self, key: bytes, nonce: bytes, decrypt: bool):
        block0 = Cipher(algorithms.ChaCha20(key, b"\0\0\0\0" + nonce), None).encryptor()
        self._mac = Poly1305(block0.update(bytes(32)))
        self._ctx = Cipher(algorithms.ChaCha20(key, b"\1\0\0\0" + nonce), None).encryptor()
        self._decrypt = decrypt
        self._len = 0

    def update_into(self, data, out) -> int:
        if self._decrypt:
            self._mac.update(data)
        n = self._ctx.update_into(data, out)
        if not self._decrypt:
            self._mac.update(out[:n])
        self._len += n
        return n

    def _tag(self) -> bytes:
        pad = (-self._len) % 16
        if pad:
            self._mac.update(bytes(pad))
        self._mac.update((0).to_bytes(8, "little") + self._len.to_bytes(8, "little"))
        return self._mac.finalize()

    def finalize(self) -> bytes:
        return self._tag()

    def verify(self, tag: bytes) -> None:
        if not constant_time.bytes_eq(self._tag(), tag):
            raise InvalidTag()


class _GcmStream:
    def __init__(self, key: bytes, nonce: bytes, decrypt: bool, tag: bytes | None = None):
        c = Cipher(algorithms.AES(key), modes.GCM(nonce, tag) if decrypt else modes.GCM(nonce))
        self._ctx = c.decryptor() if decrypt else c.encryptor()

    def update_into(self, data, out) -> int:
        return self._ctx.update_into(data, out)

    def finalize(self) -> bytes:
        self._ctx.finalize()
        return self._ctx.tag

    def verify(self, tag: bytes) -> None:
        self._ctx.finalize()  # raises InvalidTag


def stream_sealer(alg: Algorithm, key: bytes, nonce: bytes):
    """Incremental encryption: ``update_into(plain, out)`` then ``finalize() -> tag``.
    ``out`` must have room for len(plain) + 15 bytes (a GCM requirement)."""
    if alg.cls is AESGCM:
        return _GcmStream(bytes(key), nonce, decrypt=False)
    return _ChaChaPolyStream(bytes(key), nonce, decrypt=False)


def stream_opener(alg: Algorithm, key: bytes, nonce: bytes, tag: bytes):
    """Incremental decryption: ``update_into(ct, out)`` then ``verify(tag)``, which raises
    InvalidTag. Plaintext written to ``out`` must not be used before verify() returns."""
    if alg.cls is AESGCM:
        return _GcmStream(bytes(key), nonce, decrypt=True, tag=tag)
    return _ChaChaPolyStream(bytes(key), nonce, decrypt=True)
