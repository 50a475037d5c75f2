"""Ed25519 over the canonical header (format/SPEC.md §5)."""
from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import SignatureError
from .keys import SigningKey, b64d, b64e


def sign(message: bytes, key: SigningKey) -> str:
    """Sign and return the standard base64 text stored in ``__signature__``."""
    if key.d is None:
        raise SignatureError(f"signing key {key.kid!r} has no private part (d)")
    return b64e(Ed25519PrivateKey.from_private_bytes(bytes(key.d)).sign(message))


def verify(message: bytes, signature_b64: str | None, key: SigningKey, *, where: str) -> None:
    if signature_b64 is None:
        raise SignatureError(f"{where}: missing __signature__ in metadata")
    sig = b64d(signature_b64, f"{where}: __signature__", exc=SignatureError)
    if len(sig) != 64:
        raise SignatureError(f"{where}: __signature__ is {len(sig)} bytes, not 64")
    try:
        Ed25519PublicKey.from_public_bytes(key.x).verify(sig, message)
    except InvalidSignature:
        raise SignatureError(
            f"{where}: signature verification failed (key {key.kid!r}); the header was "
            f"altered or signed by another key") from None
