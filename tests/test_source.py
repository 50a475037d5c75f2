"""ctfs.source: ciphertext reads that go around the page cache when it does not hold them."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os

import pytest
import torch
from safetensors.torch import save_file

from ctfs.storage import direct as S
from ctfs.errors import IntegrityError
from ctfs.format.header import read_header_path
from ctfs.format.keys import KeySet
from ctfs.format.reader import CryptoFile
from ctfs.format.writer import EncryptOptions, encrypt_file
from ctfs.storage.local import open_blob
from mounting import mounted, write_keys

PAGE = 4096


def uncache(path) -> None:
    """Write back and drop PATH's page cache (no global drop_caches needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached(path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return S.cached_pages(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


@contextlib.contextmanager
def source(path, mode, **kw):
    fd = os.open(path, os.O_RDONLY)
    src = S.Source(fd, str(path), mode, **kw)
    try:
        yield src
    finally:
        src.close()
        os.close(fd)


@pytest.fixture
def blob(tmp_path):
    data = os.urandom(3 * (1 << 20) + 1234)
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    return p, data


def test_cached_pages_counts_what_the_page_cache_holds(blob):
    p, data = blob
    uncache(p)
    assert cached(p) == 0
    with open(p, "rb") as f:
        f.seek(1 << 20)
        f.read(5 * PAGE)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert S.cached_pages(fd, 1 << 20, 5 * PAGE) == 5
        assert S.cached_pages(fd, 0, PAGE) == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", S.MODES)
@pytest.mark.parametrize("offset,length", [(0, 1 << 20), (1, 100), (4095, 2 * PAGE + 3),
                                           (123_457, (1 << 20) + 17), (3 * (1 << 20), 1234),
                                           (3 * (1 << 20) + 1000, 1000)])
def test_read_returns_exact_bytes_at_any_offset(blob, mode, offset, length):
    p, data = blob
    uncache(p)
    with source(p, mode, max_length=(1 << 20) + 17, extra=16) as src:
        buf, at, got = src.read(offset, length)
        want = data[offset:offset + length]
        assert got == len(want)  # short only at the end of the file
        assert bytes(buf[at:at + got]) == want
        assert len(buf) >= at + length + 16  # room for a tag after the bytes
        src.release(buf)
        assert (src.direct_reads, src.buffered_reads) == ((0, 1) if mode == "buffered" else (1, 0))


def test_auto_reads_cached_ciphertext_from_the_cache_and_leaves_uncached_uncached(blob):
    p, data = blob
    with source(p, "auto", max_length=1 << 20) as src:
        os.pread(src.fd, len(data), 0)  # all cached (it was just written, and read)
        buf, at, got = src.read(1 << 20, 1 << 20)
        assert bytes(buf[at:at + got]) == data[1 << 20:2 << 20]
        src.release(buf)
        assert (src.direct_reads, src.buffered_reads) == (0, 1)

        uncache(p)
        for off in range(0, len(data), 1 << 20):
            buf, at, got = src.read(off, 1 << 20)
            assert hashlib.sha256(buf[at:at + got]).digest() == \
                hashlib.sha256(data[off:off + (1 << 20)]).digest()
            src.release(buf)
        assert (src.direct_reads, src.buffered_reads) == (4, 1)
        assert cached(p) == 0  # no second copy of the ciphertext was left in memory


def test_buffers_are_reused_and_huge_page_aligned(blob):
    p, _ = blob
    with source(p, "direct", max_length=1 << 20, extra=16) as src:
        seen = set()
        for i in range(20):
            buf, at, got = src.read((i % 3) << 20, 1 << 20)
            seen.add(ctypes.addressof(ctypes.c_char.from_buffer(buf)))
            src.release(buf)
        assert len(seen) == 1
        assert seen.pop() % S.HUGE == 0
        with pytest.raises(ValueError, match="more than"):
            src.read(0, (1 << 20) + 1)


def test_refused_o_direct_falls_back_to_the_page_cache(blob, monkeypatch, caplog):
    p, data = blob
    uncache(p)
    real = os.preadv

    def preadv(f, bufs, off, *a):
        if f == src._dfd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(f, bufs, off, *a)

    monkeypatch.setattr(os, "preadv", preadv)
    with source(p, "auto", max_length=1 << 20) as src:
        for _ in range(2):
            buf, at, got = src.read(5, 1 << 20)
            assert bytes(buf[at:at + got]) == data[5:5 + (1 << 20)]
            src.release(buf)
        assert (src.direct_reads, src.buffered_reads) == (0, 2)
        assert "O_DIRECT read refused" in caplog.text


def test_other_read_errors_are_not_swallowed(blob, monkeypatch):
    p, _ = blob
    uncache(p)

    def preadv(f, bufs, off, *a):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", preadv)
    with source(p, "direct", max_length=1 << 20) as src:
        with pytest.raises(OSError) as ei:
            src.read(0, 100)
        assert ei.value.errno == errno.EIO


def test_unknown_mode_is_refused(blob):
    p, _ = blob
    with pytest.raises(ValueError, match="auto, buffered, direct"):
        S.Source(0, str(p), "mmap", max_length=1)


@pytest.fixture(scope="module")
def enc_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    g = torch.Generator().manual_seed(5)
    tensors = {"a": torch.randn(300, 1000, generator=g), "b": torch.randn(77, 33, generator=g).half()}
    plain = d / "plain.safetensors"
    save_file(tensors, str(plain), metadata={"format": "pt"})
    keys = KeySet.generate()
    enc = d / "enc.safetensors"
    encrypt_file(str(plain), str(enc), keys, EncryptOptions(chunk_size=256 * 1024))
    return {"plain": plain, "enc": enc, "keys": keys, "key_file": write_keys(keys, d / "k.jwk"),
            "tensors": tensors}


@pytest.mark.parametrize("mode", S.MODES)
def test_crypto_file_decrypts_the_same_through_every_mode(enc_file, mode):
    uncache(enc_file["enc"])
    with CryptoFile(open_blob(enc_file["enc"], mode), enc_file["keys"]) as cf:
        for name, t in enc_file["tensors"].items():
            assert bytes(cf.tensor_bytes(name)) == t.numpy().tobytes()
        assert (cf._source.direct_reads > 0) == (mode != "buffered")


def test_direct_reads_still_detect_tampering_and_truncation(enc_file, tmp_path):
    h = read_header_path(enc_file["enc"])
    a = h.tensors["a"]
    data = bytearray(enc_file["enc"].read_bytes())
    bad = tmp_path / "bad.safetensors"
    data[h.data_start + a.start + 256 * 1024 + 7] ^= 1  # chunk 1 of "a"
    bad.write_bytes(bytes(data))
    uncache(bad)
    with CryptoFile(open_blob(bad, "direct"), enc_file["keys"]) as cf:
        out = bytearray(256 * 1024)
        cf.read_segment(0, out)  # chunk 0 is fine
        with pytest.raises(IntegrityError, match="chunk 1: authentication tag mismatch"):
            cf.read_segment(1, out)
        assert out == bytes(len(out))  # nothing of the failed chunk is left behind
        assert cf._source.direct_reads >= 2 and cf._source.buffered_reads == 0
    short = tmp_path / "short.safetensors"
    short.write_bytes(enc_file["enc"].read_bytes())
    with CryptoFile(open_blob(short, "direct"), enc_file["keys"]) as cf:  # shrinks once open
        os.truncate(short, h.data_start + a.start + 256 * 1024 + 100)
        uncache(short)
        with pytest.raises(IntegrityError, match="chunk 1: file is truncated"):
            cf.read_segment(1, bytearray(256 * 1024))
        assert cf._source.direct_reads == 1


def test_sequential_direct_reads_are_read_ahead(enc_file):
    uncache(enc_file["enc"])
    want = enc_file["tensors"]["a"].numpy().tobytes()
    with CryptoFile(open_blob(enc_file["enc"], "auto"), enc_file["keys"]) as cf:
        src = cf._source
        a = cf.tensors["a"]
        segs = list(cf.segments_for(a.start, a.nbytes))
        out = bytearray(256 * 1024)
        got = bytearray()
        for i in segs:
            n = cf.read_segment(i, out)
            got += out[:n]
        assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest()
        # the first read starts the stream; every later chunk was read ahead, not waited for
        assert src.ahead_hits == len(segs) - 2 and src.buffered_reads == 0
        cf.read_segment(segs[0], out)  # back to the start: more reads ahead, left in flight
    assert src._ahead == {} and src._dfd == -1  # close() waited for the reads in flight


@pytest.mark.parametrize("mode,left_cached", [("auto", False), ("buffered", True)])
def test_mount_leaves_uncached_ciphertext_out_of_the_page_cache(enc_file, tmp_path, mode, left_cached):
    uncache(enc_file["enc"])
    src = tmp_path / "src"
    src.mkdir()
    os.link(enc_file["enc"], src / "model.safetensors")
    with mounted(src, tmp_path / "mnt", enc_file["key_file"], "--source-io", mode) as mnt:
        view = os.path.join(mnt, "model.safetensors")
        h = read_header_path(enc_file["enc"])
        with open(view, "rb") as f:
            f.seek(h.data_start)
            got = f.read()
        want = b"".join(t.numpy().tobytes() for _, t in
                        sorted(enc_file["tensors"].items(), key=lambda kv: h.tensors[kv[0]].start))
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(want).hexdigest()
    pages = cached(enc_file["enc"])
    data_pages = (os.path.getsize(enc_file["enc"]) - h.data_start) // PAGE
    if left_cached:
        assert pages >= data_pages
    else:
        assert pages <= 4 + (h.data_start + PAGE - 1) // PAGE  # the header, read at mount


def test_files_share_one_buffer_pool(blob, tmp_path):
    p, _ = blob
    q = tmp_path / "other.bin"
    q.write_bytes(os.urandom(1 << 20))
    with source(p, "direct", max_length=1 << 20) as a, source(q, "direct", max_length=1 << 20) as b:
        assert a._pool is b._pool  # many shards keep a few buffers in all, not a few each
        buf, _, _ = a.read(0, 1 << 20)
        a.release(buf)
        buf2, _, _ = b.read(0, 1 << 20)
        assert buf2 is buf
        b.release(buf2)


def test_reserve_faults_in_pool_buffers_that_reads_then_use(blob):
    p, data = blob
    pool = S._Pool(S.buffer_size(1 << 20, 16), keep=4)
    pool.reserve(3)
    ready = {addr_of(v) for _, v in pool._free}
    assert len(ready) == 3 and all(a % S.HUGE == 0 for a in ready)
    got = [pool.get() for _ in range(3)]
    assert {addr_of(v) for v in got} == ready
    for v in got:
        pool.put(v)
    pool.reserve(10)
    assert len(pool._free) == 4  # never more than the pool keeps


def addr_of(view) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))
