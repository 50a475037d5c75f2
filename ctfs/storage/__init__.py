"""Where ciphertext lives: the storage seam.

A :class:`Store` is the root a mount serves (a local directory; an object-storage prefix
plugs in here as a sibling of :mod:`ctfs.storage.local`). It lists its entries, stats one
with a version tag (what changes whenever its bytes may have), and opens one as a
:class:`ctfs.format.blob.Blob`: positioned reads into the caller's buffer, and chunk reads
for decryption. The mount reads ciphertext only through this protocol.
"""
from __future__ import annotations

import os

from .base import Entry, Store
from .local import LocalStore
from .s3 import is_url

__all__ = ["Entry", "Store", "LocalStore", "open_store", "is_url"]


def open_store(src: str | os.PathLike, s3=None) -> Store:
    """The store SRC names: ``s3://BUCKET/PREFIX`` (options S3, a
    :class:`ctfs.storage.s3.S3Options`) or a local directory."""
    if is_url(src):
        from .s3 import S3Store
        return S3Store(src, s3)
    return LocalStore(src)
