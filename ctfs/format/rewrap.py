"""Master-key rotation: re-wrap every data key and re-sign the header; tensor bytes stay.

The new header is written in place when it fits in the old one (ctfs's writer leaves
slack for this), through a journal next to the file: the journal holds the complete new
header and is fsynced before the header is overwritten, so an interrupted rotation is
completed by the next ``ctfs rewrap`` (a reader meanwhile sees the old header, the new one,
or one whose signature fails: never wrong bytes). When the header grows, the file is copied
to a temporary file and renamed over the original.
"""
from __future__ import annotations

import logging
import os
import struct

from . import aead
from .cryptometa import (
    CRYPTO_KEYS, ENCRYPTION, POLICY, SIGNATURE, CryptoKeys, KeyRef, TensorCrypto,
    crypto_keys_value, encryption_value,
)
from ..errors import CtfsError
from .header import canonical_signed_message, read_header_path, serialize_header
from .keys import KeySet
from .reader import CryptoFile
from .signing import sign
from .writer import EncryptError, EncryptOptions, sign_kid_for, choose_master, fsync_dir

log = logging.getLogger("ctfs.rewrap")


def journal_path(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.ctfs-rewrap")


def recover(path: str) -> bool:
    """Finish an interrupted in-place rewrap of ``path``; True if there was one."""
    j = journal_path(path)
    if not os.path.exists(j):
        return False
    with open(j, "rb") as f:
        new = f.read()
    (n,) = struct.unpack("<Q", new[:8])
    if len(new) != 8 + n or read_header_path(path).header_len != n:
        raise CtfsError(f"{j}: journal does not match {path}; inspect it by hand")
    _overwrite_header(path, new)
    os.unlink(j)
    log.warning("%s: completed an interrupted key rotation", path)
    return True


def _overwrite_header(path: str, header: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, header, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrap_file(path: str, old_keys: KeySet, new_keys: KeySet, *, opts: EncryptOptions | None = None,
                policy: str | None = None) -> dict:
    """Rotate one file to ``new_keys``. Returns {"file", "mode": "in-place"|"copied"|"unchanged"}."""
    opts = opts or EncryptOptions()
    recover(path)
    master = choose_master(new_keys, opts)
    signer = new_keys.signer(None if len(new_keys.signing) == 1 else sign_kid_for(new_keys, master))
    try:
        cf = CryptoFile(path, old_keys, allow_unverified_plain=True, check_policy=False)
    except CtfsError as old_err:
        try:  # already rotated (a rerun after an interruption)?
            CryptoFile(path, new_keys, allow_unverified_plain=True, check_policy=False).close()
        except CtfsError:
            raise old_err from None
        return {"file": path, "mode": "unchanged"}
    with cf:
        alg = cf.alg
        if master.alg != alg.name:
            raise EncryptError(f"{path}: the new master key is {master.alg} but the file is {alg.name}; "
                               f"a rewrap cannot change the algorithm")
        new_master = aead.cipher(alg, bytes(master.k))
        entries = {}
        for name, e in cf.entries.items():
            key_iv = os.urandom(aead.NONCE_LEN)
            wrapped, key_tag = aead.seal(new_master, key_iv, cf.data_key(name))
            entries[name] = TensorCrypto(wrapped, key_iv, key_tag, iv=e.iv, tag=e.tag,
                                         base_iv=e.base_iv, tags=e.tags)
        old = cf.crypto
        ck = CryptoKeys(old.version, old.chunk_size, KeyRef("oct", alg.name, master.kid, None),
                        KeyRef("okp", "ed25519", signer.kid, None))
        meta = dict(cf.header.metadata)
        meta[CRYPTO_KEYS] = crypto_keys_value(ck)
        meta[ENCRYPTION] = encryption_value(entries)
        if policy is not None:
            from .policyfield import make_policy_field
            meta[POLICY] = make_policy_field(policy)
        meta.pop(SIGNATURE, None)
        tensors = list(cf.tensors.values())
        meta[SIGNATURE] = sign(canonical_signed_message(meta, tensors), signer)
        n = cf.header.header_len
        body = serialize_header(meta, tensors)
    if len(body) - 8 <= n:
        header = serialize_header(meta, tensors, pad_to=n)
        j = journal_path(path)
        fd = os.open(j, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, header)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path)
        _overwrite_header(path, header)
        os.unlink(j)
        fsync_dir(path)
        return {"file": path, "mode": "in-place"}
    _copy_with_header(path, body, n)
    return {"file": path, "mode": "copied"}


def _copy_with_header(path: str, header: bytes, old_n: int) -> None:
    tmp = f"{journal_path(path)}.tmp"
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(src).st_size
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(dst, header)
            off, left = 8 + old_n, size - 8 - old_n
            while left > 0:
                k = os.copy_file_range(src, dst, min(left, 1 << 30), off)
                if k <= 0:
                    raise CtfsError(f"{path}: short copy while rewrapping")
                off += k
                left -= k
            os.fsync(dst)
        finally:
            os.close(dst)
        os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
        fsync_dir(path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        os.close(src)


def rewrap_path(path: str, old_keys: KeySet, new_keys: KeySet, **kw) -> list[dict]:
    from .modeldir import tensor_files
    return [rewrap_file(f, old_keys, new_keys, **kw) for f in tensor_files(path)]
