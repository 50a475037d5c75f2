"""Concurrency through one real mount: a 96 MiB model served with a 16 MiB plaintext cache
(so chunks are evicted and decrypted again all the time) to 8 processes reading random
ranges (4 through a MAP_SHARED mmap of the file, as safetensors does; 2 with pread through
the page cache; 2 with pread on an O_DIRECT descriptor, which bypasses the kernel's page
cache so every read reaches the daemon) while a 9th reads the whole file sequentially,
twice. Every byte read is checked: each process compares the sha256 of every range with the
sha256 precomputed from the plaintext. Run in the default mode and with --direct-io (there
the mmap readers use MAP_PRIVATE: MAP_SHARED gives ENODEV, see ctfs/mount/fuse_ops.py)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from ctfs.format.keys import KeySet
from ctfs.format.reader import CryptoFile
from ctfs.mount.view import PlainView
from ctfs.format.writer import EncryptOptions, encrypt_file
from mounting import ctfs, mounted, write_keys

MiB = 1 << 20
NAME = "model.safetensors"
RANGES_PER_READER = int(os.environ.get("CTFS_CONCURRENCY_RANGES", "100"))

# A reader process: checks sha256 of every (offset, length) range it is given.
READER = r"""
import hashlib, json, mmap, os, sys
path, mode, spec = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
bad, done, nbytes = [], 0, 0
fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if mode == "direct" else 0))
try:
    if mode == "mmap":
        m = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED if os.environ.get("MAP") != "private"
                      else mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    for off, length, digest in spec:
        if mode == "mmap":
            got = m[off:off + length]
        else:
            parts, pos = [], off
            while pos < off + length:
                b = os.pread(fd, min(4 << 20, off + length - pos), pos)
                if not b:
                    break
                parts.append(b)
                pos += len(b)
            got = b"".join(parts)
        if len(got) != length or hashlib.sha256(got).hexdigest() != digest:
            bad.append([off, length, len(got)])
        done += 1
        nbytes += len(got)
    if mode == "mmap":
        m.close()
finally:
    os.close(fd)
print(json.dumps({"bad": bad, "done": done, "bytes": nbytes}))
"""


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("conc")
    rng = np.random.default_rng(42)
    tensors = {  # 96 MiB: two encrypted tensors and a digest-checked plain one
        "layer.0.weight": rng.standard_normal(8 * MiB, dtype=np.float32),         # 32 MiB
        "layer.1.weight": rng.integers(0, 2**16, 16 * MiB, dtype=np.uint16).view(np.float16),  # 32 MiB
        "norm.weight": rng.standard_normal(4 * MiB, dtype=np.float64),            # 32 MiB (plain)
        "bias": rng.standard_normal(1001, dtype=np.float32),
    }
    plain = d / "plain.safetensors"
    save_file(tensors, str(plain))
    del tensors
    keys = KeySet.generate()
    src = d / "enc"
    src.mkdir()
    encrypt_file(str(plain), str(src / NAME), keys, EncryptOptions(exclude=["norm.weight"]))
    # the expected view: the view's header (built in process) + the plaintext data section
    with CryptoFile(src / NAME, keys) as cf:
        header = PlainView(cf).header_bytes
    raw = plain.read_bytes()
    (n,) = np.frombuffer(raw[:8], dtype="<u8")
    expected = header + raw[8 + int(n):]
    assert len(expected) == os.path.getsize(src / NAME)
    return {"dir": d, "src": src, "key_file": write_keys(keys, d / "k.jwk"), "expected": expected}


def ranges(expected: bytes, rng: random.Random, count: int) -> list:
    size = len(expected)
    out = []
    for _ in range(count):
        length = rng.choice([1, 17, 4096, 65536, 1 * MiB, 3 * MiB + 5, rng.randrange(1, 5 * MiB)])
        off = rng.randrange(0, size - length)
        if rng.random() < 0.2:  # chunk boundaries (2 MiB chunks, page-aligned data section)
            off = max(0, min(size - length, (rng.randrange(size) // (2 * MiB)) * 2 * MiB - length // 2))
        out.append([off, length, hashlib.sha256(expected[off:off + length]).hexdigest()])
    return out


@pytest.mark.parametrize("io", ["page-cache", "direct-io"])
def test_eight_random_readers_and_a_sequential_one(big_model, tmp_path, io):
    expected = big_model["expected"]
    env = {**os.environ, "MAP": "private" if io == "direct-io" else "shared"}
    size = len(expected)
    rng = random.Random(7)
    with mounted(big_model["src"], tmp_path / "mnt", big_model["key_file"],
                 "--cache-size", "16MiB", *(["--direct-io"] if io == "direct-io" else [])) as mnt:
        view = os.path.join(mnt, NAME)
        assert os.path.getsize(view) == size
        procs = []
        t0 = time.monotonic()
        for i in range(8):
            mode = ["mmap", "pread", "mmap", "direct"][i % 4]
            spec = tmp_path / f"spec{i}.json"
            spec.write_text(json.dumps(ranges(expected, rng, RANGES_PER_READER)))
            procs.append((f"{mode}-{i}", subprocess.Popen([sys.executable, "-c", READER, view, mode, str(spec)],
                                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)))
        # the sequential reader: the whole file twice, in 1 MiB reads, hashed as a whole
        seq = tmp_path / "seq.json"
        seq.write_text(json.dumps([[0, size, hashlib.sha256(expected).hexdigest()]] * 2))
        procs.append(("sequential", subprocess.Popen([sys.executable, "-c", READER, view, "pread", str(seq)],
                                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)))
        total = 0
        for name, p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, f"{name}: exit {p.returncode}\n{err[-2000:]}"
            res = json.loads(out)
            assert not res["bad"], f"{name}: ranges with wrong bytes: {res['bad'][:5]}"
            total += res["bytes"]
        took = time.monotonic() - t0
        cache = json.loads(ctfs("status", mnt, "--json").stdout)["cache"]
    print(f"\n9 readers verified {total / MiB:.0f} MiB through the mount in {took:.1f}s; cache: "
          f"evictions {cache['evictions']}, misses {cache['misses']}, peak held "
          f"{cache['peak_bytes_held'] / MiB:.0f} MiB of {cache['capacity'] / MiB:.0f} MiB")
    assert total >= 2 * size
    # the cache really was under pressure, and stayed bounded
    assert cache["capacity"] == 16 * MiB
    assert cache["evictions"] > 0 and cache["misses"] > cache["capacity"] // (2 * MiB)
    assert 0 < cache["peak_bytes_held"] <= cache["capacity"]
