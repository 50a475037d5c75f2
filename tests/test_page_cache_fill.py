"""A chunk decrypted for a random read goes whole into the kernel's page cache
(``FUSE_NOTIFY_STORE``, ``CtfsOperations._fill``): exact bytes, fewer requests, each chunk
decrypted about once; never with ``--direct-io``, never after a lock."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
from safetensors.numpy import save_file

from ctfs.format.header import read_header_path
from ctfs.format.keys import KeySet
from ctfs.format.modeldir import encrypt_path
from ctfs.format.writer import EncryptOptions
from mounting import ctfs, mounted, write_keys
from test_secret_hygiene import cached_pages, cached_pages_fd as _cached_fd

MiB = 1 << 20
CHUNK = 2 * MiB
SIZES = (3 * MiB + 12345, 5 * MiB + 777, 77, 17 * MiB + 4099, 19 * MiB - 1)
NAME = "model.safetensors"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """About 44 MiB in tensors of odd sizes: chunk boundaries fall mid-page in the file."""
    d = tmp_path_factory.mktemp("fill")
    plain, enc = d / "plain", d / "enc"
    plain.mkdir()
    rng = np.random.default_rng(11)
    save_file({f"t{i}": rng.integers(0, 255, size=(n,), dtype=np.uint8)
               for i, n in enumerate(SIZES)},
              str(plain / NAME))
    keys = KeySet.generate(name="filltest")
    key_file = write_keys(keys, d / "keys.jwk")
    encrypt_path(str(plain), str(enc), keys, EncryptOptions(chunk_size=CHUNK))
    h = read_header_path(str(plain / NAME))
    with open(plain / NAME, "rb") as f:
        f.seek(h.data_start)
        data = f.read()
    return {"enc": enc, "key_file": key_file, "data": data}


def status(mnt) -> dict:
    return json.loads(ctfs("status", mnt, "--json").stdout)


def random_reads(view, bs, seed) -> dict[int, bytes]:
    size = os.path.getsize(view)
    offs = list(range(0, size, bs))
    random.Random(seed).shuffle(offs)
    fd = os.open(view, os.O_RDONLY)
    try:
        return {o: os.pread(fd, bs, o) for o in offs}
    finally:
        os.close(fd)


def check(view, got: dict[int, bytes], data: bytes) -> None:
    start = read_header_path(str(view)).data_start
    whole = b"".join(got[o] for o in sorted(got))
    assert len(whole) == os.path.getsize(view)
    assert whole[start:] == data  # every block, read in a random order, exact


@pytest.mark.parametrize("bs", [MiB, 12345 * 4], ids=["1MiB", "48KiB"])
def test_random_reads_fill_the_page_cache_with_whole_chunks(model, tmp_path, bs):
    with mounted(model["enc"], tmp_path / "mnt", model["key_file"]) as mnt:
        view = os.path.join(mnt, NAME)
        got = random_reads(view, bs, seed=bs)
        check(view, got, model["data"])
        st = status(mnt)
        k, c = st["fuse"], st["cache"]
        assert k["page_cache_stored_bytes"] > len(model["data"]) // 3, k
        # without the fill every block would be a request, and most chunks decrypted 2-3 times
        assert k["read_requests"] < len(got) * 0.8, (k["read_requests"], len(got))
        # (a chunk's edge pages are completed from its cached neighbours)
        assert c["bytes_decrypted"] <= len(model["data"]) * (1.2 if bs == MiB else 1.35), c["bytes_decrypted"]
        # and a second pass is (nearly: a page the kernel had not marked valid is asked for
        # again) the page cache's alone
        before = k["read_requests"]
        check(view, random_reads(view, bs, seed=bs + 1), model["data"])
        assert status(mnt)["fuse"]["read_requests"] - before <= len(got) // 4


def test_no_fill_with_direct_io(model, tmp_path):
    with mounted(model["enc"], tmp_path / "mnt", model["key_file"], "--direct-io") as mnt:
        view = os.path.join(mnt, NAME)
        check(view, random_reads(view, MiB, seed=3), model["data"])
        assert status(mnt)["fuse"]["page_cache_stored_bytes"] == 0
        assert cached_pages(view) == 0


def test_no_fill_with_copied_replies(model, tmp_path):
    with mounted(model["enc"], tmp_path / "mnt", model["key_file"], "--fuse-reply", "copy") as mnt:
        view = os.path.join(mnt, NAME)
        check(view, random_reads(view, MiB, seed=4), model["data"])
        st = status(mnt)
        assert st["fuse"]["page_cache_stored_bytes"] == 0
        # the control for the fill test's bound: chunks are decrypted again here
        assert st["cache"]["bytes_decrypted"] > len(model["data"]) * 1.25, st["cache"]["bytes_decrypted"]


def test_a_lock_leaves_no_filled_page_behind(model, tmp_path):
    with mounted(model["enc"], tmp_path / "mnt", model["key_file"]) as mnt:
        view = os.path.join(mnt, NAME)
        fd = os.open(view, os.O_RDONLY)
        try:
            check(view, random_reads(view, MiB, seed=5), model["data"])
            assert status(mnt)["fuse"]["page_cache_stored_bytes"] > 0
            assert _cached_fd(fd) > 0
            ctfs("lock", mnt)
            assert _cached_fd(fd) == 0
            stored = status(mnt)["fuse"]["page_cache_stored_bytes"]
            for off in (5 * MiB, 20 * MiB, 33 * MiB):
                with pytest.raises(OSError):
                    os.pread(fd, MiB, off)
            assert status(mnt)["fuse"]["page_cache_stored_bytes"] == stored  # nothing stored since
            ctfs("unlock", mnt)
            check(view, random_reads(view, MiB, seed=6), model["data"])
        finally:
            os.close(fd)


READERS = r"""
import hashlib, mmap, os, random, sys, threading
path = sys.argv[1]
size = os.path.getsize(path)
got = {}
def reader(seed, bs):
    fd = os.open(path, os.O_RDONLY)
    offs = list(range(0, size, bs))
    random.Random(seed).shuffle(offs)
    for o in offs:
        got[(seed, o)] = os.pread(fd, bs, o)
    os.close(fd)
def mapper():
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        got["mmap"] = hashlib.sha256(m[:]).hexdigest()
SPECS = [(s, (1 << 20, 49152, 200000, 1 << 19)[s % 4]) for s in range(1, 17)]
ts = [threading.Thread(target=reader, args=spec) for spec in SPECS]
ts += [threading.Thread(target=mapper) for _ in range(2)]
for t in ts: t.start()
for t in ts: t.join()
for s, bs in SPECS:
    whole = b"".join(got[(s, o)] for o in range(0, size, bs))
    assert hashlib.sha256(whole).hexdigest() == got["mmap"], s
print(got["mmap"])
"""


def test_a_tiny_cache_under_concurrent_random_readers_never_deadlocks(model, tmp_path):
    """A fill holds its chunks pinned while the kernel may make it wait for pages that
    another read must fill first: that read must find room (with a cache of two chunks,
    past the bound: ChunkCache._acquire_locked) and a FUSE thread to serve it (fills run
    on their own thread, never on the FUSE workers: 16 readers and 2 mmaps at once used
    them all up when they did). Readers in a child, with a timeout: a deadlock fails the
    test instead of hanging it."""
    import subprocess
    import sys
    with mounted(model["enc"], tmp_path / "mnt", model["key_file"], "--cache-size", "4MiB",
                 "--readahead", "0") as mnt:
        view = os.path.join(mnt, NAME)
        for _ in range(3):
            p = subprocess.run([sys.executable, "-c", READERS, view], capture_output=True, text=True,
                               timeout=120)
            assert p.returncode == 0, p.stderr[-3000:]
            with open(view, "rb") as f:
                whole = f.read()
            assert whole[read_header_path(view).data_start:] == model["data"]
            import hashlib
            assert p.stdout.strip() == hashlib.sha256(whole).hexdigest()
            ctfs("lock", mnt)  # drops the page cache: the next round reads through us again
            ctfs("unlock", mnt)
        assert status(mnt)["fuse"]["page_cache_stored_bytes"] > 0
