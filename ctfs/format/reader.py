"""Opening one CryptoTensors file: verification at open, then random-access decryption.

:class:`CryptoFile` checks everything that can be checked up front (container, crypto
metadata, keys, signature, policy, every data-key unwrap, v2 empty-tensor tags) so that
a later read can only fail because the bytes on disk changed. Its data section is cut
into *segments* (v2 chunks, whole v1 tensors, chunks of plain tensors); a segment is the
unit of decryption, verification and caching, and ``read_segment`` is what the FUSE
layer's cache calls.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass

from . import aead
from .cryptometa import (
    CRYPTO_KEYS, ENCRYPTION, PLAIN_DIGESTS, POLICY, RESERVED_KEYS, SIGNATURE, CryptoKeys,
    parse_crypto_keys, parse_encryption, parse_plain_digests,
)
from ..errors import (
    CryptoMetadataError, IntegrityError, KeyNotFoundError, NotEncryptedError,
    SignatureError, UnverifiedPlaintextError, WrongKeyError,
)
from .blob import Blob, FileBlob
from .header import Header, TensorInfo, canonical_signed_message, read_header_blob
from .keys import KeySet
from .policyfield import authorize
from .signing import verify

log = logging.getLogger("ctfs.format")

# segment kinds
ENC_CHUNK, ENC_WHOLE, PLAIN_VERIFIED, PLAIN_RAW = range(4)
KIND_NAMES = {ENC_CHUNK: "encrypted chunk", ENC_WHOLE: "encrypted tensor (v1)",
              PLAIN_VERIFIED: "plain, digest-checked", PLAIN_RAW: "plain, unverified"}
#: chunking of plain tensors when a file carries no digests of them
PLAIN_SEGMENT = aead.DEFAULT_CHUNK_SIZE


@dataclass
class _Tensor:
    info: TensorInfo
    kind: int
    cipher: object = None            # AEAD keyed with the DEK (encrypted tensors)
    dek: bytearray | None = None
    nonce: bytes | None = None       # v2 base_iv / v1 iv
    tags: bytes | None = None        # v2 tags / v1 tag
    digests: bytes | None = None     # plain tensors with the ctfs extension
    seg_size: int = PLAIN_SEGMENT


_POOLS: dict[int, object] = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int):
    from concurrent.futures import ThreadPoolExecutor
    with _POOLS_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="ctfs-decrypt")
        return _POOLS[threads]


class CryptoFile:
    """A verified CryptoTensors file open for random-access reads.

    ``keys``: the caller's KeySet (the only trust anchor). ``require_encrypted``: refuse a
    file without ``__encryption__`` (the reference silently loads those as plain).
    ``allow_unverified_plain``: accept unencrypted tensors that no signed digest covers
    (files written by the reference); off by default because their bytes can be altered
    without detection. ``policy_input``: the input document for the embedded policy
    (evaluated through :func:`ctfs.format.policyfield.authorize`).

    ``src`` is where the bytes come from: a :class:`~ctfs.format.blob.Blob` (which this
    object then owns and closes), or a local path, read with plain ``pread``
    (:class:`~ctfs.format.blob.FileBlob`; ``ctfs.storage`` has the ``O_DIRECT`` one).
    """

    def __init__(self, src: Blob | str | os.PathLike, keys: KeySet | None, *,
                 require_encrypted: bool = True, allow_unverified_plain: bool = False,
                 policy_input: dict | None = None, check_policy: bool = True):
        self._source = None
        self._blob = FileBlob(src) if isinstance(src, (str, os.PathLike)) else src
        self.path = self._blob.name
        try:
            self._open(keys, require_encrypted, allow_unverified_plain, policy_input, check_policy)
        except BaseException:
            self.close()
            raise

    # --- opening ---------------------------------------------------------------------
    def _open(self, keys, require_encrypted, allow_unverified_plain, policy_input, check_policy):
        self.header: Header = read_header_blob(self._blob)
        self.data_start = self.header.data_start
        self.data_len = self.header.data_len
        meta = self.header.metadata or {}
        self.user_metadata = {k: v for k, v in meta.items() if k not in RESERVED_KEYS}
        self.crypto: CryptoKeys | None = None
        self.policy_field: str | None = meta.get(POLICY)
        tensors = self.header.tensors
        self._tensors: dict[str, _Tensor] = {}

        if ENCRYPTION not in meta:
            if require_encrypted:
                raise NotEncryptedError(
                    f"{self.path}: no __encryption__ in the header: a plain safetensors file "
                    f"(its crypto metadata is missing or was stripped)")
            for name, info in tensors.items():
                self._tensors[name] = _Tensor(info, PLAIN_RAW)
            self._build_segments()
            return

        where = self.path
        if SIGNATURE not in meta:
            raise SignatureError(f"{where}: missing __signature__ in metadata")
        for required in (CRYPTO_KEYS, POLICY):
            if required not in meta:
                raise CryptoMetadataError(f"{where}: missing {required} in metadata")
        if keys is None:
            raise KeyNotFoundError(f"{where}: an encrypted file needs keys, none were given")
        self.crypto = crypto = parse_crypto_keys(meta[CRYPTO_KEYS])
        master = keys.master_key(crypto.enc.kid)
        if master.alg != crypto.enc.alg:
            raise WrongKeyError(f"{where}: the file is {crypto.enc.alg} but master key "
                                f"{master.kid!r} is {master.alg}")
        verify_key = keys.verify_key(crypto.sign.kid)
        verify(canonical_signed_message(meta, tensors.values()), meta[SIGNATURE], verify_key,
               where=where)
        self.signed_by = verify_key.kid

        if check_policy:
            authorize(meta[POLICY], policy_input, where)

        alg = aead.algorithm(master.alg)
        entries = parse_encryption(meta[ENCRYPTION], tensors, crypto, alg.key_len)
        master_cipher = aead.cipher(alg, bytes(master.k))
        self.alg = alg
        self.entries = entries
        for name, e in entries.items():
            info = tensors[name]
            dek = bytearray(aead.unwrap_key(alg, master_cipher, e.wrapped_key, e.key_iv,
                                            e.key_tag, what=f"{where}: tensor {name!r}"))
            c = aead.cipher(alg, bytes(dek))
            if crypto.chunk_size is not None:
                t = _Tensor(info, ENC_CHUNK, c, dek, e.base_iv, e.tags, seg_size=crypto.chunk_size)
                if info.nbytes == 0:  # the one tag over empty input: check it now
                    try:
                        c.decrypt(e.base_iv, e.tags[:16], None)
                    except aead.InvalidTag:
                        raise IntegrityError(f"{where}: tensor {name!r}: empty-tensor tag does not "
                                             f"verify", path=where, tensor=name, chunk=0) from None
            else:
                t = _Tensor(info, ENC_WHOLE, c, dek, e.iv, e.tag, seg_size=max(info.nbytes, 1))
            self._tensors[name] = t

        digests = None
        if PLAIN_DIGESTS in meta:
            digests = parse_plain_digests(meta[PLAIN_DIGESTS], tensors, set(entries))
        unverified = []
        for name, info in tensors.items():
            if name in entries:
                continue
            if digests is not None and name in digests.digests:
                self._tensors[name] = _Tensor(info, PLAIN_VERIFIED, digests=digests.digests[name],
                                              seg_size=digests.chunk_size)
            elif info.nbytes == 0:
                self._tensors[name] = _Tensor(info, PLAIN_RAW)
            else:
                unverified.append(name)
                self._tensors[name] = _Tensor(info, PLAIN_RAW)
        if unverified and not allow_unverified_plain:
            shown = ", ".join(repr(n) for n in sorted(unverified)[:5])
            raise UnverifiedPlaintextError(
                f"{where}: {len(unverified)} unencrypted tensor(s) ({shown}) are covered by no "
                f"signed digest, so their bytes cannot be authenticated (a file written by the "
                f"reference library?); re-encrypt it with ctfs, or allow unverified plain tensors")
        self.unverified_plain = sorted(unverified)
        self._build_segments()

    def _build_segments(self) -> None:
        starts, ends, owner, index = [], [], [], []
        for t in sorted(self._tensors.values(), key=lambda t: t.info.start):
            size, s = t.seg_size, t.info.start
            for i, off in enumerate(range(s, t.info.end, size)):
                starts.append(off)
                ends.append(min(off + size, t.info.end))
                owner.append(t)
                index.append(i)
        self.segment_starts, self._seg_end, self._seg_owner, self._seg_index = starts, ends, owner, index
        sizes = [e - s for s, e, t in zip(starts, ends, owner) if t.kind != ENC_WHOLE]
        self.max_segment_size = max(sizes) if sizes else aead.DEFAULT_CHUNK_SIZE
        self._source = self._blob.chunk_reader(self.max_segment_size, aead.TAG_LEN)

    def reserve_buffers(self, count: int) -> None:
        """Have ``count`` ciphertext buffers of this file's size mapped and faulted in
        (the pool is shared by every file of that size)."""
        self._source.reserve(count)

    # --- properties ------------------------------------------------------------------
    @property
    def encrypted(self) -> bool:
        return self.crypto is not None

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.header.tensors

    def is_encrypted(self, name: str) -> bool:
        return self._tensors[name].kind in (ENC_CHUNK, ENC_WHOLE)

    def data_key(self, name: str) -> bytes:
        """The unwrapped data key of an encrypted tensor (for re-wrapping)."""
        return bytes(self._tensors[name].dek)

    def segment_end(self, i: int) -> int:
        return self._seg_end[i]

    def segments_for(self, offset: int, length: int) -> range:
        """Indices of the segments covering data-section bytes [offset, offset+length)."""
        if length <= 0 or offset >= self.data_len:
            return range(0)
        first = bisect.bisect_right(self.segment_starts, offset) - 1
        last = bisect.bisect_left(self.segment_starts, min(offset + length, self.data_len))
        return range(max(first, 0), last)

    # --- reading ---------------------------------------------------------------------
    def _pread_exact(self, buf: memoryview, offset: int, t: _Tensor, idx: int) -> None:
        if self._blob.pread_into(buf, self.data_start + offset) != len(buf):
            raise self._truncated(t, idx)

    def _truncated(self, t: _Tensor, idx: int) -> IntegrityError:
        return IntegrityError(f"{self.path}: tensor {t.info.name!r} chunk {idx}: file is "
                              f"truncated", path=self.path, tensor=t.info.name, chunk=idx)

    def read_segment(self, i: int, out) -> int:
        """Decrypt and authenticate segment ``i`` into ``out`` (at least its size); return
        its size. Raises IntegrityError and leaves no plaintext in ``out`` on failure."""
        t, idx = self._seg_owner[i], self._seg_index[i]
        start, end = self.segment_starts[i], self._seg_end[i]
        n = end - start
        out = memoryview(out)[:n]
        kind = t.kind
        if kind == ENC_CHUNK:
            for attempt in (0, 1):
                buf, at, got = self._source.read(self.data_start + start, n,
                                                 lambda count: self._next_chunks(i, count))
                try:
                    if got != n:
                        raise self._truncated(t, idx)
                    with buf[at:at + n + 16] as sealed:
                        sealed[n:] = t.tags[16 * idx:16 * idx + 16]
                        try:
                            aead.open_into(t.cipher, aead.chunk_nonce(t.nonce, idx), sealed, out)
                            break
                        except aead.InvalidTag:
                            out[:] = bytes(n)
                finally:
                    self._source.release(buf)
                # a reader with a local copy (a cache of fetched ciphertext) drops it; the
                # bytes are then read once more from where they are stored
                discard = getattr(self._source, "discard", None)
                if attempt or discard is None or not discard(self.data_start + start, n):
                    raise self._fail(t, idx, "authentication tag mismatch")
                log.warning("%s: tensor %r chunk %d: the cached ciphertext failed its "
                            "authentication tag; discarded, reading it again", self.path,
                            t.info.name, idx)
        elif kind == ENC_WHOLE:
            self._read_whole_v1(t, out)
        else:
            self._pread_exact(out, start, t, idx)
            if kind == PLAIN_VERIFIED:
                if hashlib.sha256(out).digest() != t.digests[32 * idx:32 * idx + 32]:
                    out[:] = bytes(n)
                    raise self._fail(t, idx, "sha256 of unencrypted tensor bytes does not match "
                                             "the signed digest")
        return n

    def _next_chunks(self, i: int, count: int) -> list[tuple[int, int]]:
        """File ranges of the encrypted chunks among the COUNT segments right after
        segment i (what a sequential reader wants next)."""
        starts, ends, owner = self.segment_starts, self._seg_end, self._seg_owner
        return [(self.data_start + starts[j], ends[j] - starts[j])
                for j in range(i + 1, min(i + 1 + count, len(starts)))
                if owner[j].kind == ENC_CHUNK]

    def _read_whole_v1(self, t: _Tensor, out: memoryview) -> None:
        n = t.info.nbytes
        opener = aead.stream_opener(self.alg, bytes(t.dek), t.nonce, t.tags)
        step = max(1, min(n, 1 << 20))
        buf, tmp = bytearray(step), bytearray(step + 15)
        mv = memoryview(buf)
        for off in range(0, n, step):
            m = min(step, n - off)
            self._pread_exact(mv[:m], t.info.start + off, t, 0)
            k = opener.update_into(mv[:m], tmp)
            out[off:off + k] = memoryview(tmp)[:k]
        try:
            opener.verify(t.tags)
        except aead.InvalidTag:
            out[:] = bytes(n)
            raise self._fail(t, 0, "authentication tag mismatch") from None

    def _fail(self, t: _Tensor, idx: int, why: str) -> IntegrityError:
        return IntegrityError(f"{self.path}: tensor {t.info.name!r} chunk {idx}: {why}",
                              path=self.path, tensor=t.info.name, chunk=idx)

    def read_into(self, offset: int, out, *, threads: int = 1) -> int:
        """Plaintext of data-section bytes [offset, offset+len(out)) written into ``out``
        (uncached; nothing is zero-filled first). Whole segments are decrypted in place,
        on ``threads`` threads when there are many (AEAD calls release the GIL).
        Returns the count; raises IntegrityError on any failure."""
        return self.read_many([(offset, out)], threads=threads)[0]

    def read_many(self, parts, *, threads: int = 1) -> list[int]:
        """:meth:`read_into` for many ``(offset, out)`` parts at once (e.g. every tensor
        of a file): the whole segments of all parts go to one pool, so ``threads`` stay
        busy however small each part is. Returns the count for each part."""
        whole: list = []  # (segment, its slice of some part's out)
        counts, seg_buf = [], None
        try:
            for offset, out in parts:
                out = memoryview(out)
                if out.format != "B":
                    out = out.cast("B")
                length = max(0, min(len(out), self.data_len - offset))
                counts.append(length)
                if not length:
                    continue
                for i in self.segments_for(offset, length):
                    s, e = self.segment_starts[i], self._seg_end[i]
                    lo, hi = max(s, offset), min(e, offset + length)
                    if lo == s and hi == e:
                        whole.append((i, out[s - offset:e - offset]))
                        continue
                    if seg_buf is None or len(seg_buf) < e - s:
                        if seg_buf is not None:
                            seg_buf[:] = bytes(len(seg_buf))
                        seg_buf = bytearray(e - s)
                    self.read_segment(i, seg_buf)
                    out[lo - offset:hi - offset] = memoryview(seg_buf)[lo - s:hi - s]
        finally:
            if seg_buf is not None:
                seg_buf[:] = bytes(len(seg_buf))
        if threads > 1 and len(whole) >= 4:
            futures = [_pool(threads).submit(self.read_segment, i, dst) for i, dst in whole]
            try:
                for fut in futures:
                    fut.result()
            except BaseException:
                for fut in futures:  # a failure ends the read: start no more segments
                    fut.cancel()
                for fut in futures:
                    if not fut.cancelled():
                        fut.exception()  # wait: nothing may write into ``out`` after we return
                raise
        else:
            for i, dst in whole:
                self.read_segment(i, dst)
        return counts

    def read_data(self, offset: int, length: int) -> bytearray:
        """Plaintext of data-section bytes [offset, offset+length), uncached."""
        result = bytearray(max(0, min(length, self.data_len - offset)))
        self.read_into(offset, result)
        return result

    def tensor_bytes(self, name: str) -> bytearray:
        info = self.header.tensors[name]
        return self.read_data(info.start, info.nbytes)

    def verify_all(self, progress=None) -> None:
        """Authenticate every segment (raises the first IntegrityError)."""
        buf = bytearray(self.max_segment_size)
        for i in range(len(self.segment_starts)):
            size = self._seg_end[i] - self.segment_starts[i]
            if size > len(buf):
                buf = bytearray(size)
            self.read_segment(i, buf)
            if progress:
                progress(size)
        buf[:] = bytes(len(buf))

    # --- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        """Close the file and overwrite the data keys this object holds."""
        for t in getattr(self, "_tensors", {}).values():
            if t.dek is not None:
                t.dek[:] = bytes(len(t.dek))
            t.cipher = None
        if getattr(self, "_source", None) is not None:
            self._source.close()
            self._source = None
        if getattr(self, "_blob", None) is not None:
            self._blob.close()

    def __enter__(self) -> "CryptoFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def chunk_ranges(header: Header) -> list[tuple[int, int]]:
    """File ranges (offset, length) of every encrypted chunk of a file, in file order,
    exactly as :meth:`CryptoFile.read_segment` reads them; read from the header alone (no
    keys: what a cache of ciphertext can be filled with before any key is at hand). Empty
    for plain files and files encrypted whole per tensor (format v1)."""
    meta = header.metadata or {}
    if ENCRYPTION not in meta or CRYPTO_KEYS not in meta:
        return []
    size = parse_crypto_keys(meta[CRYPTO_KEYS]).chunk_size
    if not size:
        return []
    try:
        names = json.loads(meta[ENCRYPTION])
    except ValueError:
        raise CryptoMetadataError("__encryption__ is not JSON") from None
    out = []
    for info in sorted((header.tensors[n] for n in names if n in header.tensors),
                       key=lambda t: t.start):
        out.extend((header.data_start + off, min(size, info.end - off))
                   for off in range(info.start, info.end, size))
    return out
