"""Writing CryptoTensors files, streamed chunk by chunk.

The output is laid out exactly like the plaintext source (same data order and bytes
positions; zero-length tensors are moved to distinct offsets so the reference verifies
the file deterministically), so a mount's plain view has the source's data section.
The header's length is fixed before any data is written (every base64 field has a known
size), data goes straight to its final offset in a temporary file, and the file is renamed
into place only when complete.
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import Callable, Sequence

from . import aead
from .cryptometa import (
    CRYPTO_KEYS, ENCRYPTION, PLAIN_DIGESTS, POLICY, RESERVED_KEYS, SIGNATURE, CryptoKeys,
    KeyRef, TensorCrypto, crypto_keys_value, encryption_value, plain_digests_value,
)
from ..errors import CtfsError, NotEncryptedError
from .header import (
    TensorInfo, canonical_signed_message, read_header_named, serialize_header, sorted_tensors,
)
from .keys import KeySet, MasterKey
from .signing import sign

log = logging.getLogger("ctfs.writer")
Progress = Callable[[int], None]
IO_BLOCK = 1 << 20


class EncryptError(CtfsError):
    """The source cannot be encrypted as asked (bad options, already encrypted...)."""


@dataclass
class EncryptOptions:
    version: int = 2
    chunk_size: int = aead.DEFAULT_CHUNK_SIZE
    alg: str | None = None          # choose the master key of this algorithm
    kid: str | None = None          # or the master key with this kid
    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()
    policy: str | None = None       # Rego source for __policy__.local
    plain_digests: bool = True      # ctfs extension: digests of unencrypted tensors
    extra_metadata: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.version not in (1, 2):
            raise EncryptError(f"--format-version must be 1 or 2, not {self.version}")
        if not (1 <= self.chunk_size <= 1 << 31):
            raise EncryptError(f"--chunk-size must be between 1 byte and 2 GiB, not {self.chunk_size}")


def choose_master(keys: KeySet, opts: EncryptOptions) -> MasterKey:
    candidates = keys.master
    if opts.kid is not None:
        candidates = [k for k in candidates if k.kid == opts.kid]
    if opts.alg is not None:
        want = aead.algorithm(opts.alg).name
        candidates = [k for k in candidates if k.alg == want]
    if len(candidates) != 1:
        what = f"kid={opts.kid!r} " if opts.kid else ""
        what += f"alg={opts.alg!r}" if opts.alg else ""
        raise EncryptError(f"the key set holds {len(candidates)} master keys matching "
                           f"{what or 'the request'}; need exactly one (use --kid/--alg)")
    return candidates[0]


def selected(name: str, opts: EncryptOptions) -> bool:
    return (any(fnmatch.fnmatchcase(name, p) for p in opts.include)
            and not any(fnmatch.fnmatchcase(name, p) for p in opts.exclude))


def spread_empty_tensors(layout: list[TensorInfo]) -> list[TensorInfo]:
    """Give zero-length tensors distinct offsets where possible (data bytes unchanged)."""
    empties = [t for t in layout if t.nbytes == 0]
    if len(empties) < 2:
        return layout
    full = [t for t in layout if t.nbytes]
    free = [0] + [t.end for t in full]
    out = list(full)
    for t in sorted(empties, key=lambda t: (t.start, t.name)):
        if free:
            best = min(free, key=lambda b: abs(b - t.start))
            free.remove(best)
        else:
            best = t.start
            log.warning("%s: more zero-length tensors than offsets; %r shares offset %d "
                        "(the reference library then verifies this file only some of the time)",
                        "writer", t.name, best)
        out.append(TensorInfo(t.name, t.dtype, t.shape, best, best))
    return sorted_tensors(out)


def fsync_dir(path: str) -> None:
    """fsync the directory holding ``path`` (makes a create/rename durable)."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Output:
    """A temporary file next to ``dst`` that becomes ``dst`` only on commit."""

    def __init__(self, dst: str, force: bool):
        self.dst = dst
        if os.path.lexists(dst) and not force:
            raise EncryptError(f"{dst} exists (use --force to replace it)")
        d, base = os.path.split(os.path.abspath(dst))
        self.tmp = os.path.join(d, f".{base}.ctfs-tmp-{secrets.token_hex(4)}")
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def commit(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.dst)
        fsync_dir(self.dst)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def _placeholder(entries: dict[str, TensorCrypto]) -> dict[str, TensorCrypto]:
    return {n: TensorCrypto(**{k: (bytes(len(v)) if v is not None else None)
                               for k, v in e.__dict__.items()}) for n, e in entries.items()}


def encrypt_file(src: str, dst: str, keys: KeySet, opts: EncryptOptions | None = None, *,
                 force: bool = False, progress: Progress | None = None) -> dict:
    """Encrypt one plaintext safetensors file; returns a summary dict."""
    opts = opts or EncryptOptions()
    opts.validate()
    master = choose_master(keys, opts)
    signer = keys.signer(None if len(keys.signing) == 1 else sign_kid_for(keys, master))
    alg = aead.algorithm(master.alg)

    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        hdr = read_header_named(fd, src)
        meta = dict(hdr.metadata or {})
        if ENCRYPTION in meta:
            raise EncryptError(f"{src} is already a CryptoTensors file")
        user_meta = {k: v for k, v in meta.items() if k not in RESERVED_KEYS}
        for k, v in opts.extra_metadata.items():
            if k in RESERVED_KEYS or not isinstance(k, str) or not isinstance(v, str):
                raise EncryptError(f"metadata {k!r}: reserved key or non-string value")
            user_meta[k] = v
        layout = spread_empty_tensors(hdr.layout())
        enc_names = {t.name for t in layout if selected(t.name, opts)}
        if not enc_names:
            raise EncryptError(f"{src}: the tensor filter selects no tensor; refusing to write an "
                               f"unencrypted file")
        chunk = opts.chunk_size if opts.version == 2 else None
        ck = CryptoKeys(str(opts.version), chunk,
                        KeyRef("oct", alg.name, master.kid, None),
                        KeyRef("okp", "ed25519", signer.kid, None))
        from .policyfield import DEFAULT_POLICY_SOURCE, make_policy_field
        policy_value = make_policy_field(opts.policy if opts.policy is not None
                                         else DEFAULT_POLICY_SOURCE)
        digest_cs = chunk or aead.DEFAULT_CHUNK_SIZE
        plain_names = [t.name for t in layout if t.name not in enc_names and t.nbytes]
        want_digests = opts.plain_digests and bool(plain_names)

        # DEKs, wraps and nonces first: they fix every length in the header.
        master_cipher = aead.cipher(alg, bytes(master.k))
        entries: dict[str, TensorCrypto] = {}
        deks: dict[str, bytes] = {}
        for t in layout:
            if t.name not in enc_names:
                continue
            dek = os.urandom(alg.key_len)
            key_iv = os.urandom(aead.NONCE_LEN)
            wrapped, key_tag = aead.seal(master_cipher, key_iv, dek)
            deks[t.name] = dek
            if chunk:
                n = aead.num_chunks(t.nbytes, chunk)
                entries[t.name] = TensorCrypto(wrapped, key_iv, key_tag, base_iv=aead.new_base_iv(n),
                                               tags=bytes(16 * n))
            else:
                empty = t.nbytes == 0
                entries[t.name] = TensorCrypto(wrapped, key_iv, key_tag,
                                               iv=b"" if empty else os.urandom(aead.NONCE_LEN),
                                               tag=b"" if empty else bytes(16))
        digests = {n: bytes(32 * aead.num_chunks(hdr.tensors[n].nbytes, digest_cs))
                   for n in plain_names} if want_digests else {}

        def metadata(entries_, digests_, signature) -> dict:
            m = dict(user_meta)
            m[CRYPTO_KEYS] = crypto_keys_value(ck)
            m[ENCRYPTION] = encryption_value(entries_)
            m[POLICY] = policy_value
            if want_digests:
                m[PLAIN_DIGESTS] = plain_digests_value(digest_cs, digests_)
            m[SIGNATURE] = signature
            return m

        probe = serialize_header(metadata(_placeholder(entries), digests, "A" * 88), layout)
        header_len = aligned_header_len(len(probe) - 8)

        out = _Output(dst, force)
        try:
            data_start = 8 + header_len
            buf = bytearray(max(IO_BLOCK, chunk or 0) + 16)
            obuf = bytearray(len(buf) + 16)
            for t in layout:
                if not t.nbytes:
                    continue
                if t.name in entries:
                    e = entries[t.name]
                    if chunk:
                        tags = bytearray(e.tags)
                        c = aead.cipher(alg, deks[t.name])
                        for i, off in enumerate(range(0, t.nbytes, chunk)):
                            n = min(chunk, t.nbytes - off)
                            _pread(fd, buf, n, hdr.data_start + t.start + off, src)
                            c.encrypt_into(aead.chunk_nonce(e.base_iv, i), memoryview(buf)[:n], None,
                                           memoryview(obuf)[:n + 16])
                            _pwrite(out.fd, memoryview(obuf)[:n], data_start + t.start + off)
                            tags[16 * i:16 * i + 16] = obuf[n:n + 16]
                            if progress:
                                progress(n)
                        entries[t.name] = TensorCrypto(e.wrapped_key, e.key_iv, e.key_tag,
                                                       base_iv=e.base_iv, tags=bytes(tags))
                    else:
                        s = aead.stream_sealer(alg, deks[t.name], e.iv)
                        for off in range(0, t.nbytes, IO_BLOCK):
                            n = min(IO_BLOCK, t.nbytes - off)
                            _pread(fd, buf, n, hdr.data_start + t.start + off, src)
                            k = s.update_into(memoryview(buf)[:n], obuf)
                            _pwrite(out.fd, memoryview(obuf)[:k], data_start + t.start + off)
                            if progress:
                                progress(n)
                        entries[t.name] = TensorCrypto(e.wrapped_key, e.key_iv, e.key_tag,
                                                       iv=e.iv, tag=s.finalize())
                else:
                    dig = bytearray()
                    for off in range(0, t.nbytes, digest_cs):
                        h = hashlib.sha256()
                        end = min(off + digest_cs, t.nbytes)
                        for o in range(off, end, IO_BLOCK):
                            n = min(IO_BLOCK, end - o)
                            _pread(fd, buf, n, hdr.data_start + t.start + o, src)
                            h.update(memoryview(buf)[:n])
                            _pwrite(out.fd, memoryview(buf)[:n], data_start + t.start + o)
                            if progress:
                                progress(n)
                        dig += h.digest()
                    if want_digests:
                        digests[t.name] = bytes(dig)
            # empty v2 tensors: one tag over empty input with nonce base_iv
            for name, e in list(entries.items()):
                if chunk and hdr.tensors[name].nbytes == 0:
                    _, tag = aead.seal(aead.cipher(alg, deks[name]), e.base_iv, b"")
                    entries[name] = TensorCrypto(e.wrapped_key, e.key_iv, e.key_tag,
                                                 base_iv=e.base_iv, tags=tag)
            unsigned = metadata(entries, digests, "")
            unsigned.pop(SIGNATURE)
            signature = sign(canonical_signed_message(unsigned, layout), signer)
            header = serialize_header(metadata(entries, digests, signature), layout,
                                      pad_to=header_len)
            _pwrite(out.fd, header, 0)
            os.ftruncate(out.fd, data_start + (layout[-1].end if layout else 0))
            out.commit()
        except BaseException:
            out.abort()
            raise
        finally:
            buf[:] = bytes(len(buf))
            obuf[:] = bytes(len(obuf))
    finally:
        os.close(fd)
    return {"src": src, "dst": dst, "tensors": len(layout), "encrypted": len(enc_names),
            "plain": len(layout) - len(enc_names), "bytes": hdr.data_len,
            "version": opts.version, "alg": alg.name, "enc_kid": master.kid,
            "sign_kid": signer.kid}


#: data sections start on a page boundary, with at least this much room left in the header
#: so a key rotation (other kids) can rewrite the header in place
HEADER_SLACK = 512
PAGE = 4096


def aligned_header_len(n: int) -> int:
    """Header length >= n + HEADER_SLACK such that 8 + header is a multiple of the page size
    (the data section, and so every 2 MiB chunk, is then page-aligned in the file)."""
    return -(-(8 + n + HEADER_SLACK) // PAGE) * PAGE - 8


def sign_kid_for(keys: KeySet, master: MasterKey) -> str | None:
    """With several signing keys, prefer the one named like the master key (<name>-sign)."""
    if master.kid and master.kid.endswith("-enc"):
        want = master.kid[:-4] + "-sign"
        if any(k.kid == want for k in keys.signing):
            return want
    return None


def _pread(fd: int, buf: bytearray, n: int, offset: int, path: str) -> None:
    got = os.preadv(fd, [memoryview(buf)[:n]], offset)
    if got != n:
        raise EncryptError(f"{path}: unexpected end of file (changed while encrypting?)")


def _pwrite(fd: int, data, offset: int) -> None:
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


__all__ = ["EncryptError", "EncryptOptions", "encrypt_file", "NotEncryptedError"]
