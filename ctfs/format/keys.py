"""Keys in the reference's JWK dialect, and the key set a caller passes in.

Master key: ``{"kty":"oct","alg":"aes256gcm","kid":…,"k":b64}``; signing key:
``{"kty":"okp","alg":"ed25519","kid":…,"x":b64,"d":b64}`` (lowercase ``okp``, standard
padded base64). Keys come only from the caller: a ``jku`` in a file header is never opened.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import stat
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .aead import algorithm
from ..errors import KeyFileError, KeyNotFoundError, UnknownAlgorithmError


def b64d(value, what: str, *, exc=KeyFileError) -> bytes:
    """Strict standard base64 with padding, as the reference requires."""
    if not isinstance(value, str):
        raise exc(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as e:
        raise exc(f"{what} is not valid standard base64: {e}") from None
    if base64.b64encode(raw).decode("ascii") != value:  # non-zero trailing bits: one spelling only
        raise exc(f"{what} is not canonical standard base64")
    return raw


def b64e(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


@dataclass(repr=False)
class MasterKey:
    kid: str | None
    alg: str          # normalised algorithm name
    k: bytearray

    def __repr__(self) -> str:
        return f"MasterKey(kid={self.kid!r}, alg={self.alg!r})"


@dataclass(repr=False)
class SigningKey:
    kid: str | None
    x: bytes                       # Ed25519 public key
    d: bytearray | None = None     # Ed25519 seed (only needed to write)

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r}, private={self.d is not None})"


def _public_from_seed(seed: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(bytes(seed)).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


def parse_jwk(jwk: dict) -> MasterKey | SigningKey:
    if not isinstance(jwk, dict):
        raise KeyFileError("a JWK must be a JSON object")
    kty, kid = jwk.get("kty"), jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise KeyFileError("kid must be a string")
    name = f"key {kid!r}" if kid else "key without kid"
    if "alg" not in jwk:
        raise KeyFileError(f"{name}: missing field alg")
    if kty == "oct":
        try:
            alg = algorithm(jwk["alg"])
        except UnknownAlgorithmError as e:
            raise KeyFileError(f"{name}: {e}") from None
        k = b64d(jwk.get("k"), f"{name}: k")
        if len(k) != alg.key_len:
            raise KeyFileError(f"{name}: {alg.name} needs a {alg.key_len}-byte key, k has {len(k)}")
        return MasterKey(kid, alg.name, bytearray(k))
    if kty == "okp":
        if not isinstance(jwk["alg"], str) or jwk["alg"].upper() != "ED25519":
            raise KeyFileError(f"{name}: okp keys must have alg ed25519, got {jwk['alg']!r}")
        d = b64d(jwk["d"], f"{name}: d") if "d" in jwk else None
        x = b64d(jwk["x"], f"{name}: x") if "x" in jwk else None
        if d is not None and len(d) != 32:
            raise KeyFileError(f"{name}: d must be a 32-byte Ed25519 seed")
        if x is not None and len(x) != 32:
            raise KeyFileError(f"{name}: x must be a 32-byte Ed25519 public key")
        if d is not None:
            derived = _public_from_seed(d)
            if x is not None and x != derived:
                raise KeyFileError(f"{name}: x does not match d")
            x = derived
        if x is None:
            raise KeyFileError(f"{name}: okp key needs x or d")
        return SigningKey(kid, x, bytearray(d) if d is not None else None)
    raise KeyFileError(f"{name}: unsupported kty {kty!r} (expected 'oct' or 'okp', lowercase)")


@dataclass(repr=False)
class KeySet:
    """Master keys and Ed25519 keys, looked up by ``kid``."""

    master: list[MasterKey] = field(default_factory=list)
    signing: list[SigningKey] = field(default_factory=list)
    source: str = "caller"

    def __repr__(self) -> str:
        return (f"KeySet(source={self.source!r}, master={[k.kid for k in self.master]}, "
                f"signing={[k.kid for k in self.signing]})")

    # --- construction ---
    @classmethod
    def from_jwks(cls, doc, source: str = "caller") -> "KeySet":
        if isinstance(doc, dict) and "keys" in doc:
            items = doc["keys"]
            if not isinstance(items, list):
                raise KeyFileError("'keys' must be a list")
        elif isinstance(doc, dict) and "kty" in doc:
            items = [doc]
        elif isinstance(doc, list):
            items = doc
        else:
            raise KeyFileError("expected a JWK set {\"keys\": [...]} or a single JWK")
        ks = cls(source=source)
        for item in items:
            key = parse_jwk(item)
            (ks.master if isinstance(key, MasterKey) else ks.signing).append(key)
        for kind, keys in (("master", ks.master), ("signing", ks.signing)):
            kids = [k.kid for k in keys if k.kid is not None]
            if len(kids) != len(set(kids)):
                raise KeyFileError(f"duplicate kid among {kind} keys")
        return ks

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "caller") -> "KeySet":
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise KeyFileError(f"{source}: not a JSON key set ({e.__class__.__name__})") from None
        return cls.from_jwks(doc, source)

    @classmethod
    def load(cls, path: str | os.PathLike, *, insecure_perms: bool = False) -> "KeySet":
        """Read a JWK set file; refuse one readable by group or others unless told."""
        path = os.fspath(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise KeyFileError(f"cannot open key file {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(f"key file {path} is not a regular file")
            if st.st_mode & 0o077 and not insecure_perms:
                raise KeyFileError(
                    f"key file {path} is accessible by group/others (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it or pass --insecure-perms")
            if st.st_size > 1 << 20:
                raise KeyFileError(f"key file {path} is larger than 1 MiB")
            data = os.read(fd, 1 << 20)
        finally:
            os.close(fd)
        return cls.from_json(data, source=path)

    # --- lookup ---
    @staticmethod
    def _pick(keys, kid, what):
        if kid is not None:
            for k in keys:
                if k.kid == kid:
                    return k
            have = ", ".join(repr(k.kid) for k in keys) or "none"
            raise KeyNotFoundError(f"no {what} with kid {kid!r} (have: {have})", kid=kid)
        if len(keys) == 1:
            return keys[0]
        raise KeyNotFoundError(
            f"the file names no kid for its {what} and the key set holds {len(keys)} of them",
            kid=None)

    def master_key(self, kid: str | None) -> MasterKey:
        return self._pick(self.master, kid, "master key")

    def verify_key(self, kid: str | None) -> SigningKey:
        return self._pick(self.signing, kid, "signing key")

    def signer(self, kid: str | None = None) -> SigningKey:
        keys = [k for k in self.signing if k.d is not None]
        key = self._pick(keys, kid, "private signing key")
        return key

    def wipe(self) -> None:
        """Overwrite key bytes held by this set (best effort: Python may hold copies)."""
        for k in self.master:
            k.k[:] = bytes(len(k.k))
        for s in self.signing:
            if s.d is not None:
                s.d[:] = bytes(len(s.d))
        self.master.clear()
        self.signing.clear()

    # --- generation ---
    @classmethod
    def generate(cls, alg: str = "aes256gcm", *, name: str | None = None) -> "KeySet":
        a = algorithm(alg)
        tag = name or secrets.token_hex(4)
        seed = Ed25519PrivateKey.generate().private_bytes_raw()
        return cls(master=[MasterKey(f"{tag}-enc", a.name, bytearray(os.urandom(a.key_len)))],
                   signing=[SigningKey(f"{tag}-sign", _public_from_seed(seed), bytearray(seed))],
                   source="generated")

    def to_jwks(self, *, private: bool = True) -> dict:
        keys = []
        for k in self.master:
            jwk = {"kty": "oct", "alg": k.alg, "k": b64e(k.k)}
            if k.kid is not None:
                jwk["kid"] = k.kid
            keys.append(jwk)
        for s in self.signing:
            jwk = {"kty": "okp", "alg": "ed25519", "x": b64e(s.x)}
            if private and s.d is not None:
                jwk["d"] = b64e(s.d)
            if s.kid is not None:
                jwk["kid"] = s.kid
            keys.append(jwk)
        return {"keys": keys}


def write_private_file(path: str | os.PathLike, data: bytes, *, force: bool = False) -> None:
    """Create ``path`` with mode 0600 from the start (no window with wider permissions)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
