"""The crypto metadata carried in ``__metadata__`` (format/SPEC.md §3), parsed strictly.

Four reference keys (``__crypto_keys__``, ``__encryption__``, ``__policy__``,
``__signature__``) plus ctfs's own signed extension ``__ctfs_plain_sha256__``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from . import aead
from ..errors import CryptoMetadataError, UnsupportedVersionError
from .header import TensorInfo, dumps_compact, loads_strict
from .keys import b64d, b64e

CRYPTO_KEYS = "__crypto_keys__"
ENCRYPTION = "__encryption__"
POLICY = "__policy__"
SIGNATURE = "__signature__"
PLAIN_DIGESTS = "__ctfs_plain_sha256__"
#: metadata keys that are ours or the format's, never user metadata
RESERVED_KEYS = (CRYPTO_KEYS, ENCRYPTION, POLICY, SIGNATURE, PLAIN_DIGESTS)


@dataclass(frozen=True)
class KeyRef:
    kty: str
    alg: str
    kid: str | None
    jku: str | None  # recorded only to be reported; never opened


@dataclass(frozen=True)
class CryptoKeys:
    version: str
    chunk_size: int | None  # None: monolithic (v1) decryption
    enc: KeyRef
    sign: KeyRef


@dataclass(frozen=True)
class TensorCrypto:
    wrapped_key: bytes
    key_iv: bytes
    key_tag: bytes
    iv: bytes | None = None        # v1
    tag: bytes | None = None       # v1
    base_iv: bytes | None = None   # v2
    tags: bytes | None = None      # v2


def _json(value: str, what: str):
    if not isinstance(value, str):
        raise CryptoMetadataError(f"{what} must be a JSON string")
    try:
        return loads_strict(value)
    except ValueError as e:
        raise CryptoMetadataError(f"{what} is not valid JSON: {e}") from None


def _keyref(obj, what: str, kty: str) -> KeyRef:
    if not isinstance(obj, dict):
        raise CryptoMetadataError(f"__crypto_keys__.{what} must be an object")
    if obj.get("kty") != kty:
        raise CryptoMetadataError(f"__crypto_keys__.{what}.kty must be {kty!r}, got {obj.get('kty')!r}")
    alg = obj.get("alg")
    if kty == "oct":
        alg = aead.algorithm(alg).name
    elif not isinstance(alg, str) or alg.upper() != "ED25519":
        raise CryptoMetadataError(f"__crypto_keys__.{what}.alg must be ed25519, got {alg!r}")
    kid, jku = obj.get("kid"), obj.get("jku")
    for field, v in (("kid", kid), ("jku", jku)):
        if v is not None and not isinstance(v, str):
            raise CryptoMetadataError(f"__crypto_keys__.{what}.{field} must be a string")
    return KeyRef(kty, alg.lower(), kid, jku)


def parse_crypto_keys(value: str) -> CryptoKeys:
    doc = _json(value, CRYPTO_KEYS)
    if not isinstance(doc, dict):
        raise CryptoMetadataError("__crypto_keys__ must be a JSON object")
    version = doc.get("version")
    if not isinstance(version, str):
        raise CryptoMetadataError("__crypto_keys__: missing version")
    if version not in ("1", "2"):
        raise UnsupportedVersionError(f"unsupported format version {version!r} (ctfs reads 1 and 2)")
    chunk_size = doc.get("chunk_size")
    if chunk_size is not None:
        if type(chunk_size) is not int or chunk_size <= 0 or chunk_size > 2**32:
            raise CryptoMetadataError(f"invalid chunk_size in __crypto_keys__: {chunk_size!r}")
    elif version == "2":
        chunk_size = aead.DEFAULT_CHUNK_SIZE
    return CryptoKeys(version, chunk_size, _keyref(doc.get("enc"), "enc", "oct"),
                      _keyref(doc.get("sign"), "sign", "okp"))


def crypto_keys_value(keys: CryptoKeys) -> str:
    """The ``__crypto_keys__`` string exactly as the reference writes it (sorted, compact)."""
    def ref(r: KeyRef) -> dict:
        d = {"alg": r.alg, "kty": r.kty}
        if r.jku is not None:
            d["jku"] = r.jku
        if r.kid is not None:
            d["kid"] = r.kid
        return dict(sorted(d.items()))
    doc = {"enc": ref(keys.enc), "sign": ref(keys.sign), "version": keys.version}
    if keys.version == "2":
        doc["chunk_size"] = keys.chunk_size
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _field(entry: dict, name: str, tensor: str, length: int | None, *, required: bool):
    value = entry.get(name)
    if value is None:
        if required:
            raise CryptoMetadataError(f"__encryption__[{tensor!r}]: missing {name}")
        return None
    raw = b64d(value, f"__encryption__[{tensor!r}].{name}", exc=CryptoMetadataError)
    if length is not None and len(raw) != length:
        raise CryptoMetadataError(
            f"__encryption__[{tensor!r}].{name} has {len(raw)} bytes, expected {length}")
    return raw


def parse_encryption(value: str, tensors: dict[str, TensorInfo], keys: CryptoKeys,
                     key_len: int) -> dict[str, TensorCrypto]:
    doc = _json(value, ENCRYPTION)
    if not isinstance(doc, dict):
        raise CryptoMetadataError("__encryption__ must be a JSON object")
    out: dict[str, TensorCrypto] = {}
    for name, entry in doc.items():
        if name not in tensors:
            raise CryptoMetadataError(f"__encryption__ names {name!r}, which is not a tensor of the file")
        if not isinstance(entry, dict):
            raise CryptoMetadataError(f"__encryption__[{name!r}] must be an object")
        info = tensors[name]
        common = dict(
            wrapped_key=_field(entry, "wrapped_key", name, key_len, required=True),
            key_iv=_field(entry, "key_iv", name, aead.NONCE_LEN, required=True),
            key_tag=_field(entry, "key_tag", name, aead.TAG_LEN, required=True))
        if keys.chunk_size is not None:
            n = aead.num_chunks(info.nbytes, keys.chunk_size)
            out[name] = TensorCrypto(
                **common, base_iv=_field(entry, "base_iv", name, aead.NONCE_LEN, required=True),
                tags=_field(entry, "tags", name, aead.TAG_LEN * n, required=True))
        else:
            empty = info.nbytes == 0
            iv = _field(entry, "iv", name, 0 if empty else aead.NONCE_LEN, required=True)
            tag = _field(entry, "tag", name, 0 if empty else aead.TAG_LEN, required=True)
            out[name] = TensorCrypto(**common, iv=iv, tag=tag)
    return out


def encryption_value(entries: dict[str, TensorCrypto]) -> str:
    """``__encryption__`` as the reference writes it: sorted by name, fields in struct order."""
    doc = {}
    for name in sorted(entries):
        e = entries[name]
        d = {"wrapped_key": b64e(e.wrapped_key), "key_iv": b64e(e.key_iv), "key_tag": b64e(e.key_tag)}
        if e.tags is not None:
            d["base_iv"] = b64e(e.base_iv)
            d["tags"] = b64e(e.tags)
        else:
            d["iv"] = b64e(e.iv)
            d["tag"] = b64e(e.tag)
        doc[name] = d
    return dumps_compact(doc)


# --- ctfs extension: digests of unencrypted tensors ------------------------------------------

@dataclass(frozen=True)
class PlainDigests:
    chunk_size: int
    digests: dict[str, bytes]  # tensor -> concatenated 32-byte sha256 of each chunk


def parse_plain_digests(value: str, tensors: dict[str, TensorInfo],
                        encrypted: set[str]) -> PlainDigests:
    doc = _json(value, PLAIN_DIGESTS)
    if not isinstance(doc, dict) or type(doc.get("v")) is not int or doc["v"] != 1:
        raise CryptoMetadataError(f"{PLAIN_DIGESTS}: unsupported layout (expected v=1)")
    cs = doc.get("chunk_size")
    if type(cs) is not int or cs <= 0:
        raise CryptoMetadataError(f"{PLAIN_DIGESTS}: invalid chunk_size {cs!r}")
    entries = doc.get("sha256")
    if not isinstance(entries, dict):
        raise CryptoMetadataError(f"{PLAIN_DIGESTS}: missing sha256 map")
    digests = {}
    for name, value_ in entries.items():
        if name not in tensors or name in encrypted:
            raise CryptoMetadataError(f"{PLAIN_DIGESTS} names {name!r}, not an unencrypted tensor")
        n = aead.num_chunks(tensors[name].nbytes, cs)
        digests[name] = b64d(value_, f"{PLAIN_DIGESTS}[{name!r}]", exc=CryptoMetadataError)
        if len(digests[name]) != 32 * n:
            raise CryptoMetadataError(f"{PLAIN_DIGESTS}[{name!r}]: expected {n} digests")
    return PlainDigests(cs, digests)


def plain_digests_value(chunk_size: int, digests: dict[str, bytes]) -> str:
    return dumps_compact({"v": 1, "chunk_size": chunk_size,
                          "sha256": {k: b64e(digests[k]) for k in sorted(digests)}})
