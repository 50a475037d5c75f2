"""The object-storage store without a mount, against a real SeaweedFS server: listing,
pinning, conditional GETs, retries through a faulty proxy, timeouts, the cache dir, and
the refusals a mount turns into one-line errors."""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import time

import pytest

from benchmarks.netproxy import NetProxy
from ctfs.errors import CtfsError
from ctfs.format.blob import FileBlob
from ctfs.format.header import read_header_blob
from ctfs.format.reader import CryptoFile, chunk_ranges
from ctfs.storage import open_store
from ctfs.storage.diskcache import DiskCache
from ctfs.storage.s3 import ObjectChanged, S3Options, S3Store, StoreError
from s3fixtures import upload


def creds(server):
    return {"key_id": server.env["AWS_ACCESS_KEY_ID"], "secret": server.env["AWS_SECRET_ACCESS_KEY"]}


def opts(server, endpoint=None, **kw):
    return S3Options(endpoint=endpoint or server.endpoint, credentials=creds(server), **kw)


def decrypted(source, keys) -> bytes:
    """Every data byte of a CryptoTensors file (a blob, or a local path), decrypted."""
    cf = CryptoFile(source if not isinstance(source, os.PathLike) else str(source), keys)
    try:
        out = bytearray(cf.data_len)
        cf.read_into(0, out)
        return bytes(out)
    finally:
        cf.close()


def plaintext_of(store, path, keys) -> bytes:
    return decrypted(store.open(path), keys)


def local_plaintext(path, keys) -> bytes:
    return decrypted(path, keys)


def test_walk_lists_the_prefix_like_the_local_directory(lm, seaweed):
    s3 = open_store(lm["url"], opts(seaweed))
    local = open_store(str(lm["enc"]))
    assert [(e.path, e.kind, e.size) for e in s3.walk()] == \
        [(e.path, e.kind, e.size if e.kind == "file" else 0) for e in local.walk()]
    assert s3.locate("config.json") == lm["url"] + "/config.json"
    assert all(e.version.startswith('"') for e in s3.walk() if e.kind == "file")  # ETags


def test_sequential_read_is_exact_and_coalesced(big, seaweed):
    store = S3Store(big["url"], opts(seaweed))
    want = local_plaintext(big["enc"] / "model.safetensors", big["keys"])
    assert plaintext_of(store, "model.safetensors", big["keys"]) == want
    st = store.stats()
    # 24 MiB in 2 MiB chunks: readahead GETs cover several chunks each
    assert st["bytes_fetched"] >= 24 << 20
    assert st["requests"] < 12 + 4, st
    assert st["retries"] == 0 and st["failures"] == 0


def test_random_reads_fetch_only_what_they_touch(big, seaweed):
    store = S3Store(big["url"], opts(seaweed))
    cf = CryptoFile(store.open("model.safetensors"), big["keys"])
    try:
        before = store.stats()["bytes_fetched"]
        out = bytearray(1000)
        cf.read_into(10 << 20, out)  # one 2 MiB chunk
        assert store.stats()["bytes_fetched"] - before == 2 << 20
        want = local_plaintext(big["enc"] / "model.safetensors", big["keys"])[10 << 20:(10 << 20) + 1000]
        assert bytes(out) == want
    finally:
        cf.close()


def test_chunk_ranges_from_the_header_match_the_reader(big, lm):
    for path in [big["enc"] / "model.safetensors", *sorted(lm["enc"].glob("*.safetensors"))]:
        cf = CryptoFile(str(path), lm["keys"] if path.is_relative_to(lm["enc"]) else big["keys"])
        try:
            segs = [(cf.data_start + s, cf.segment_end(i) - s) for i, s in enumerate(cf.segment_starts)]
        finally:
            cf.close()
        b = FileBlob(path)
        try:
            assert chunk_ranges(read_header_blob(b)) == [r for r in segs if r[1] > 0]
        finally:
            b.close()


def test_an_object_overwritten_after_the_listing_fails_with_eio(tmp_path, big, seaweed, caplog):
    url = upload(seaweed, big["enc"])
    store = S3Store(url, opts(seaweed))
    blob = store.open("model.safetensors")
    head = bytearray(8)
    assert blob.pread_into(memoryview(head), 0) == 8
    bucket, key = url[5:].split("/", 1)
    seaweed.client().put_object(Bucket=bucket, Key=key + "/model.safetensors", Body=b"x" * blob.size)
    reader = blob.chunk_reader(2 << 20, 16)
    with caplog.at_level(logging.ERROR, "ctfs.s3"):
        with pytest.raises(ObjectChanged) as ei:
            reader.read(1 << 20, 2 << 20)
    assert ei.value.errno == errno.EIO
    assert f"{url}/model.safetensors" in caplog.text and "changed since it was mounted" in caplog.text
    assert store.stats()["changed"] == 1
    # the other object still serves
    cfg = store.open("config.json")
    buf = bytearray(cfg.size)
    assert cfg.pread_into(memoryview(buf), 0) == cfg.size
    assert bytes(buf) == (big["enc"] / "config.json").read_bytes()


def test_faulty_link_is_retried_and_exact(big, seaweed):
    want = local_plaintext(big["enc"] / "model.safetensors", big["keys"])
    with NetProxy(seaweed.port, p_delay=0.02, max_delay=0.2, p_truncate=0.02, p_reset=0.02,
                  seed=11) as proxy:
        store = S3Store(big["url"], opts(seaweed, proxy.endpoint, request_timeout=5))
        assert plaintext_of(store, "model.safetensors", big["keys"]) == want
        ps = dict(proxy.stats)
    st = store.stats()
    assert ps["truncations"] > 0 and ps["resets"] > 0 and ps["delays"] > 0, ps
    assert st["retries"] >= ps["truncations"] and st["failures"] == 0, (ps, st)


def test_an_outage_longer_than_the_timeout_is_eio_within_the_bound(big, seaweed, caplog):
    with NetProxy(seaweed.port) as proxy:
        store = S3Store(big["url"], opts(seaweed, proxy.endpoint, timeout=2.0, request_timeout=1))
        blob = store.open("model.safetensors")
        reader = blob.chunk_reader(2 << 20, 16)
        proxy.set(down=True)
        t = time.monotonic()
        with caplog.at_level(logging.ERROR, "ctfs.s3"), pytest.raises(OSError) as ei:
            reader.read(2 << 20, 2 << 20)
        took = time.monotonic() - t
        assert ei.value.errno == errno.EIO and 1.5 < took < 6, took
        assert "gave up after" in caplog.text and f"{big['url']}/model.safetensors" in caplog.text
        proxy.set(down=False)  # back: the same reader works again
        buf, at, got = reader.read(2 << 20, 2 << 20)
        assert got == 2 << 20
        assert bytes(buf[at:at + 64]) == (big["enc"] / "model.safetensors").read_bytes()[(2 << 20):(2 << 20) + 64]
        reader.release(buf)


@pytest.mark.parametrize("case", ["wrong-secret", "no-bucket", "empty-prefix", "bad-name"])
def test_refusals_name_the_url_and_the_cause(case, big, seaweed):
    o = opts(seaweed)
    url = big["url"]
    if case == "wrong-secret":
        o.credentials = {"key_id": creds(seaweed)["key_id"], "secret": "wrong"}
        expect = "access denied (403)"
    elif case == "no-bucket":
        url, expect = "s3://no-such-bucket-ctfs/x", "no such bucket"
    elif case == "empty-prefix":
        url, expect = big["url"] + "-nothing-here", "no objects under this prefix"
    else:
        url, expect = "s3://Bad_Bucket/x", "not a valid bucket name"
    t = time.monotonic()
    with pytest.raises(StoreError) as ei:
        S3Store(url, o)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(url) and expect in msg, msg
    assert time.monotonic() - t < 10  # a 4xx is not retried


# --- the cache dir -------------------------------------------------------------------------

def test_cache_dir_serves_a_second_store_without_fetching(tmp_path, big, seaweed):
    cd = tmp_path / "cd"
    want = local_plaintext(big["enc"] / "model.safetensors", big["keys"])
    s1 = S3Store(big["url"], opts(seaweed, cache_dir=str(cd)))
    assert plaintext_of(s1, "model.safetensors", big["keys"]) == want
    c1 = s1.stats()["cache_dir"]
    assert c1["bytes"] >= 24 << 20 and c1["bytes_written"] == c1["bytes"]
    s2 = S3Store(big["url"], opts(seaweed, cache_dir=str(cd)))
    assert plaintext_of(s2, "model.safetensors", big["keys"]) == want
    st = s2.stats()
    header = (big["enc"] / "model.safetensors").read_bytes()
    header_len = 8 + int.from_bytes(header[:8], "little")
    assert st["bytes_fetched"] == 8 + header_len - 8, st  # the header only (8 + its length)
    assert st["cache_dir"]["hits"] == c1["chunks"] and st["cache_dir"]["misses"] == 0
    # ciphertext only: every cached file is a slice of the stored object
    obj = (big["enc"] / "model.safetensors").read_bytes()
    cached = cached_files(cd)
    assert len(cached) == c1["chunks"] > 10
    for path in cached:
        off, n = (int(x, 16) for x in os.path.basename(path).split("-"))
        assert open(path, "rb").read() == obj[off:off + n]


def test_a_tampered_cached_chunk_is_discarded_and_fetched_again(tmp_path, big, seaweed, caplog):
    cd = tmp_path / "cd"
    want = local_plaintext(big["enc"] / "model.safetensors", big["keys"])
    assert plaintext_of(S3Store(big["url"], opts(seaweed, cache_dir=str(cd))), "model.safetensors",
                        big["keys"]) == want
    victim = cached_files(cd)[3]
    with open(victim, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    s2 = S3Store(big["url"], opts(seaweed, cache_dir=str(cd)))
    with caplog.at_level(logging.WARNING):
        assert plaintext_of(s2, "model.safetensors", big["keys"]) == want
    st = s2.stats()
    assert st["cache_dir"]["discarded"] == 1, st
    assert "failed its authentication tag; discarded" in caplog.text
    off, n = (int(x, 16) for x in os.path.basename(victim).split("-"))
    assert open(victim, "rb").read() == (big["enc"] / "model.safetensors").read_bytes()[off:off + n]


def cached_files(cd) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(cd) for f in fs
                  if os.path.relpath(d, cd) != "tmp")


def test_disk_cache_is_bounded_lru_and_survives_reopening(tmp_path):
    d = DiskCache(tmp_path / "c", limit=10_000)
    for i in range(5):
        d.put("ab" * 32, i * 3000, os.urandom(3000))
    assert d.size <= 10_000 and d.evictions == 2
    assert ("ab" * 32, 0, 3000) not in d and ("ab" * 32, 12000, 3000) in d
    buf = bytearray(3000)
    assert d.get("ab" * 32, 6000, 3000, memoryview(buf))  # now the most recent
    d.put("ab" * 32, 15000, os.urandom(3000))
    assert ("ab" * 32, 9000, 3000) not in d and ("ab" * 32, 6000, 3000) in d
    again = DiskCache(tmp_path / "c", limit=10_000)
    assert again.size == d.size and ("ab" * 32, 6000, 3000) in again
    # a partial write left by a dead daemon is removed, never served
    (tmp_path / "c" / "tmp" / "partial").write_bytes(b"x")
    DiskCache(tmp_path / "c", limit=10_000)
    assert os.listdir(tmp_path / "c" / "tmp") == []
    assert oct(os.stat(tmp_path / "c").st_mode & 0o777) == "0o700"


def test_store_error_is_a_ctfs_error():
    assert issubclass(StoreError, CtfsError)
    h = hashlib.sha256(b"").hexdigest()
    assert len(h) == 64


def test_interleaved_streams_fetch_each_chunk_once(big, seaweed):
    """A loader reading two tensors at once (two sequential streams, interleaved) gets every
    chunk fetched once: chunks fetched ahead for one stream are not given up (and fetched
    again) while the other is read."""
    store = S3Store(big["url"], opts(seaweed))
    cf = CryptoFile(store.open("model.safetensors"), big["keys"])
    want = local_plaintext(big["enc"] / "model.safetensors", big["keys"])
    try:
        n = len(cf.segment_starts)
        half = n // 2
        order = [i for pair in zip(range(half), range(half, n)) for i in pair] + list(range(2 * half, n))
        out = bytearray(2 << 20)
        for i in order:
            size = cf.read_segment(i, out)
            start = cf.segment_starts[i]
            assert bytes(out[:size]) == want[start:start + size], i
        st = store.stats()
        assert st["bytes_fetched"] <= cf.data_start + cf.data_len, st  # nothing twice
    finally:
        cf.close()
