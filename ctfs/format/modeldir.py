"""Whole-model operations: encrypt a file or a Hugging Face model directory, inspect, verify.

A directory is written into a temporary sibling directory and renamed into place at the
end, so DST is either absent, the old DST (without --force nothing is touched), or complete.
"""
from __future__ import annotations

import os
import secrets
import shutil
from typing import Callable, Iterator

from .cryptometa import CRYPTO_KEYS, ENCRYPTION, PLAIN_DIGESTS, POLICY, RESERVED_KEYS, parse_crypto_keys
from ..errors import CtfsError
from .header import read_header_path
from .keys import KeySet
from .reader import CryptoFile
from .writer import EncryptError, EncryptOptions, encrypt_file

TENSOR_SUFFIXES = (".safetensors", ".cryptotensors")


def walk_files(root: str) -> Iterator[str]:
    """Relative paths of the regular files under root (links followed), sorted."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for f in sorted(filenames):
            p = os.path.join(dirpath, f)
            if os.path.isfile(p):
                yield os.path.relpath(p, root)


def is_tensor_file(path: str) -> bool:
    return path.endswith(TENSOR_SUFFIXES)


def plan_size(src: str) -> int:
    """Tensor bytes to process (what progress callbacks count)."""
    files = [src] if os.path.isfile(src) else [
        os.path.join(src, r) for r in walk_files(src) if is_tensor_file(r)]
    total = 0
    for f in files:
        try:
            total += read_header_path(f).data_len
        except (CtfsError, OSError):
            pass
    return total


def encrypt_path(src: str, dst: str, keys: KeySet, opts: EncryptOptions | None = None, *,
                 force: bool = False, progress: Callable[[int], None] | None = None,
                 on_file: Callable[[str], None] | None = None) -> list[dict]:
    """Encrypt SRC (a .safetensors file or a model directory) into DST."""
    if not os.path.exists(src):
        raise EncryptError(f"{src}: no such file or directory")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise EncryptError("SRC and DST are the same path")
    if os.path.lexists(dst) and not force:
        raise EncryptError(f"{dst} exists (use --force to replace it)")
    if os.path.isfile(src):
        if on_file:
            on_file(src)
        return [encrypt_file(src, dst, keys, opts, force=force, progress=progress)]
    if os.path.abspath(dst).startswith(os.path.abspath(src) + os.sep):
        raise EncryptError("DST must not be inside SRC")

    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(dst))}.ctfs-tmp-{secrets.token_hex(4)}")
    os.mkdir(tmp, 0o755)
    results = []
    try:
        for rel in walk_files(src):
            s, d = os.path.join(src, rel), os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(d), exist_ok=True)
            if is_tensor_file(rel):
                if on_file:
                    on_file(s)
                results.append(encrypt_file(s, d, keys, opts, progress=progress))
            else:
                shutil.copyfile(s, d)
                shutil.copymode(s, d)
        if not any(True for _ in results):
            raise EncryptError(f"{src}: no .safetensors file to encrypt")
        _fsync_tree(tmp)
        if os.path.lexists(dst):
            old = f"{tmp}-old"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.unlink(old)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return results


def _fsync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def tensor_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CtfsError(f"{path}: no such file or directory")
    files = [os.path.join(path, r) for r in walk_files(path) if is_tensor_file(r)]
    if not files:
        raise CtfsError(f"{path}: no .safetensors file found")
    return files


def inspect_file(path: str, keys: KeySet | None = None) -> dict:
    """Everything ctfs can tell about a file; checks the signature when keys are given."""
    hdr = read_header_path(path)
    meta = hdr.metadata or {}
    info: dict = {"file": path, "size": hdr.file_size, "header_len": hdr.header_len,
                  "encrypted": ENCRYPTION in meta}
    enc_names: set[str] = set()
    if ENCRYPTION in meta:
        import json
        try:
            enc_names = set(json.loads(meta[ENCRYPTION]))
        except (ValueError, TypeError):
            enc_names = set()
        ck = parse_crypto_keys(meta[CRYPTO_KEYS]) if CRYPTO_KEYS in meta else None
        if ck:
            info.update(version=ck.version, algorithm=ck.enc.alg, chunk_size=ck.chunk_size,
                        enc_kid=ck.enc.kid, sign_kid=ck.sign.kid)
            if ck.enc.jku or ck.sign.jku:
                info["jku_ignored"] = [j for j in (ck.enc.jku, ck.sign.jku) if j]
        from .policyfield import parse_policy_field
        try:
            info["policy"] = parse_policy_field(meta[POLICY]) if POLICY in meta else None
        except CtfsError as e:
            info["policy"] = f"invalid: {e}"
        info["plain_digests"] = PLAIN_DIGESTS in meta
        if keys is None:
            info["signature"] = "not checked (no key given)"
        else:
            try:
                with CryptoFile(path, keys, allow_unverified_plain=True, check_policy=False):
                    info["signature"] = "valid"
            except CtfsError as e:
                info["signature"] = f"INVALID: {e}"
    info["metadata"] = {k: v for k, v in meta.items() if k not in RESERVED_KEYS}
    info["tensors"] = [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
                        "offsets": [t.start, t.end], "encrypted": t.name in enc_names}
                       for t in hdr.layout()]
    return info


def verify_path(path: str, keys: KeySet, *, allow_unverified_plain: bool = False,
                progress: Callable[[int], None] | None = None, opener=None) -> list[str]:
    """Check signature, policy, every AEAD tag and plain digest; raise on the first failure.
    ``opener(path) -> Blob`` reads the files (default: plain ``pread``)."""
    checked = []
    for f in tensor_files(path):
        with CryptoFile(opener(f) if opener else f, keys, allow_unverified_plain=allow_unverified_plain) as cf:
            cf.verify_all(progress)
        checked.append(f)
    return checked
