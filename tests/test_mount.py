"""The mount, for real: a FUSE mount of an encrypted model directory serves plain
safetensors files whose bytes are the plaintext original's."""
from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ctfs.format.header import read_header_path
from ctfs.format.keys import KeySet
from ctfs.format.modeldir import encrypt_path
from ctfs.format.writer import EncryptOptions
from mounting import CTFS, ctfs, daemon_process, force_unmount, foreground_daemon, is_mounted, mounted, write_keys


def sha(path, start=0, length=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while True:
            b = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not b:
                break
            h.update(b)
            if left is not None:
                left -= len(b)
    return h.hexdigest()


def assert_tensors_equal(path, expected) -> None:
    """Load with safetensors (mmap) in a frame of its own, so nothing keeps the file mapped."""
    loaded = load_file(path)
    assert sorted(loaded) == sorted(expected)
    for name, t in loaded.items():
        assert torch.equal(t, expected[name]), name


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A sharded plaintext model dir + its ctfs encryption (small 64 KiB chunks)."""
    d = tmp_path_factory.mktemp("model")
    plain, enc = d / "plain", d / "enc"
    plain.mkdir()
    g = torch.Generator().manual_seed(3)
    shards = {
        "model-00001-of-00002.safetensors": {"embed.weight": torch.randn(1000, 256, generator=g).bfloat16(),
                                             "norm.weight": torch.ones(256)},
        "model-00002-of-00002.safetensors": {"lm_head.weight": torch.randn(1000, 256, generator=g),
                                             "bias": torch.randn(1000, generator=g).half(),
                                             "empty": torch.zeros(0, 5)},
    }
    index = {"metadata": {"total_size": 0}, "weight_map": {}}
    for fname, ts in shards.items():
        save_file(ts, str(plain / fname), metadata={"format": "pt"})
        index["weight_map"].update({k: fname for k in ts})
    (plain / "model.safetensors.index.json").write_text(json.dumps(index))
    (plain / "config.json").write_text('{"model_type": "test"}\n')
    (plain / "1_Pooling").mkdir()
    (plain / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}\n')
    keys = KeySet.generate()
    key_file = write_keys(keys, d / "keys.jwk")
    encrypt_path(str(plain), str(enc), keys, EncryptOptions(chunk_size=64 * 1024, exclude=["norm.weight"]))
    return {"dir": d, "plain": plain, "enc": enc, "keys": keys, "key_file": key_file, "shards": shards}


def test_view_mirrors_tree_and_bytes_equal_plaintext(model, tmp_path):
    with mounted(model["enc"], tmp_path / "mnt", model["key_file"]) as mnt:
        names = sorted(os.path.relpath(os.path.join(dp, f), mnt) for dp, _, fs in os.walk(mnt) for f in fs)
        assert names == sorted(os.path.relpath(os.path.join(dp, f), model["plain"])
                               for dp, _, fs in os.walk(model["plain"]) for f in fs)
        for rel in names:
            view, orig, enc = os.path.join(mnt, rel), model["plain"] / rel, model["enc"] / rel
            if not rel.endswith(".safetensors"):
                assert open(view, "rb").read() == orig.read_bytes()
                continue
            assert os.path.getsize(view) == os.path.getsize(enc)
            vh, oh = read_header_path(view), read_header_path(orig)
            assert vh.header_len == read_header_path(enc).header_len
            assert sha(view, vh.data_start) == sha(orig, oh.data_start)  # data section identical
            assert vh.metadata == {"format": "pt"}                          # crypto keys gone
            assert_tensors_equal(view, model["shards"][rel])
        st = os.stat(os.path.join(mnt, "config.json"))
        assert st.st_mode & 0o777 == 0o444
        with pytest.raises(OSError) as ei:
            open(os.path.join(mnt, "new.txt"), "w")
        assert ei.value.errno in (errno.EROFS, errno.EACCES)


@pytest.mark.parametrize("direct_io", [False, True])
def test_safe_open_mmap_and_get_slice(model, tmp_path, direct_io):
    extra = ["--direct-io"] if direct_io else []
    with mounted(model["enc"], tmp_path / "mnt", model["key_file"], *extra) as mnt:
        view = os.path.join(mnt, "model-00002-of-00002.safetensors")
        with safe_open(view, "pt") as f:
            assert torch.equal(f.get_slice("lm_head.weight")[100:300, 5:9],
                               model["shards"]["model-00002-of-00002.safetensors"]["lm_head.weight"][100:300, 5:9])
        with safe_open(view, "np") as f:
            np.testing.assert_array_equal(f.get_tensor("bias"),
                                          model["shards"]["model-00002-of-00002.safetensors"]["bias"].numpy())
        with open(view, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ, flags=mmap.MAP_PRIVATE) as m:
            assert hashlib.sha256(m[:]).hexdigest() == sha(view)


def test_o_direct_reads(model, tmp_path):
    with mounted(model["enc"], tmp_path / "mnt", model["key_file"]) as mnt:
        view = os.path.join(mnt, "model-00001-of-00002.safetensors")
        expect = open(view, "rb").read()
        fd = os.open(view, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 1 << 20)  # page-aligned
            got = bytearray()
            off = 0
            while True:
                n = os.preadv(fd, [buf], off)
                got += buf[:n]
                off += n
                if n < len(buf):
                    break
        finally:
            os.close(fd)
        assert bytes(got) == expect


def test_cryptotensors_suffix_shown_as_safetensors(model, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(model["enc"] / "model-00002-of-00002.safetensors", src / "weights.cryptotensors")
    with mounted(src, tmp_path / "mnt", model["key_file"]) as mnt:
        assert os.listdir(mnt) == ["weights.safetensors"]
        assert_tensors_equal(os.path.join(mnt, "weights.safetensors"),
                             model["shards"]["model-00002-of-00002.safetensors"])


def test_refusals_name_the_file_and_reason(model, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # a plaintext shard in an encrypted model dir
    src = tmp_path / "mixed"
    shutil.copytree(model["enc"], src)
    shutil.copy(model["plain"] / "model-00001-of-00002.safetensors", src / "model-00001-of-00002.safetensors")
    p = ctfs("mount", src, mnt, "--key-file", model["key_file"], check=False)
    assert p.returncode != 0 and "model-00001-of-00002.safetensors" in p.stderr and "plain" in p.stderr
    assert "Traceback" not in p.stderr and not is_mounted(mnt)
    with mounted(src, mnt, model["key_file"], "--allow-plain"):
        pass
    # wrong keys: names the kid that was needed
    other = write_keys(KeySet.generate(name="other"), tmp_path / "other.jwk")
    p = ctfs("mount", model["enc"], mnt, "--key-file", other, check=False)
    assert p.returncode != 0 and model["keys"].master[0].kid in p.stderr and not is_mounted(mnt)
    # a tampered header: signature
    bad = tmp_path / "bad"
    shutil.copytree(model["enc"], bad)
    f = bad / "model-00002-of-00002.safetensors"
    data = bytearray(f.read_bytes())
    i = data.index(b'"F16"')
    data[i:i + 5] = b'"I16"'
    f.write_bytes(bytes(data))
    p = ctfs("mount", bad, mnt, "--key-file", model["key_file"], check=False)
    assert p.returncode != 0 and "signature" in p.stderr and "model-00002-of-00002" in p.stderr
    assert not is_mounted(mnt)


def test_tampered_chunk_gives_eio_on_exactly_its_range(model, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(model["enc"], src)
    f = src / "model-00002-of-00002.safetensors"
    h = read_header_path(f)
    t = h.tensors["lm_head.weight"]
    chunk = 64 * 1024
    target = t.start + 3 * chunk + 100  # chunk 3 of lm_head.weight
    data = bytearray(f.read_bytes())
    data[h.data_start + target] ^= 0x40
    f.write_bytes(bytes(data))
    mnt = tmp_path / "mnt"
    log_path = tmp_path / "daemon.log"
    with foreground_daemon([src, mnt, "--key-file", model["key_file"]], log_path):
        view = os.path.join(mnt, "model-00002-of-00002.safetensors")
        orig = (model["plain"] / "model-00002-of-00002.safetensors").read_bytes()
        plain_ds = read_header_path(model["plain"] / "model-00002-of-00002.safetensors").data_start
        fd = os.open(view, os.O_RDONLY)
        try:
            for c in (0, 2, 4, 5):  # whole pages inside good chunks read exactly
                lo = h.data_start + t.start + c * chunk
                lo, hi = -(-lo // 4096) * 4096, (lo + chunk) // 4096 * 4096
                got = os.pread(fd, hi - lo, lo)
                assert got == orig[lo - h.data_start + plain_ds:hi - h.data_start + plain_ds], c
            # any read touching chunk 3 fails with EIO; a read that starts before it may
            # return a short count (the kernel works in pages) but never a wrong byte
            with pytest.raises(OSError) as ei:
                os.pread(fd, 4096, h.data_start + t.start + 3 * chunk + 8192)
            assert ei.value.errno == errno.EIO
            lo = h.data_start + t.start + 2 * chunk
            got = os.pread(fd, 2 * chunk, lo)
            assert len(got) < chunk + 4096
            assert got == orig[lo - h.data_start + plain_ds:][:len(got)]
        finally:
            os.close(fd)
    # the daemon says which file, tensor and chunk failed, once per failed read
    failures = [line for line in log_path.read_text().splitlines() if "integrity failure" in line]
    assert failures, log_path.read_text()
    want = (f"integrity failure, returning EIO: file={f} tensor=lm_head.weight chunk=3: {f}: "
            "tensor 'lm_head.weight' chunk 3: ")
    assert all(want in line and " ERROR " in line for line in failures), failures


def test_sigterm_unmounts_foreground_daemon(model, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([*CTFS, "mount", model["enc"], mnt, "--key-file", model["key_file"], "--foreground"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while not is_mounted(mnt) and time.time() < deadline:
            time.sleep(0.1)
        assert is_mounted(mnt)
        assert os.path.getsize(mnt / "config.json") > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not is_mounted(mnt)
    finally:
        proc.kill()
        force_unmount(mnt)


def test_kill9_then_umount_and_remount(model, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ctfs("mount", model["enc"], mnt, "--key-file", model["key_file"])
    try:
        daemon = daemon_process(mnt)
        daemon.kill()
        daemon.wait(10)
        with pytest.raises(OSError) as ei:
            os.listdir(mnt)
        assert ei.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        p = ctfs("mount", model["enc"], mnt, "--key-file", model["key_file"], check=False)
        assert p.returncode != 0  # the dead mount is in the way, and we say so
        ctfs("umount", mnt)
        assert not is_mounted(mnt)
        with mounted(model["enc"], mnt, model["key_file"]):
            assert sorted(os.listdir(mnt))[0] == "1_Pooling"
    finally:
        force_unmount(mnt)


def test_umount_of_something_not_mounted_is_a_clear_error(tmp_path):
    p = ctfs("umount", tmp_path, check=False)
    assert p.returncode != 0 and "not" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_daemon_memory_stays_bounded(tmp_path):
    """RSS <= cache + 150 MiB while reading a model twice the cache size, end to end."""
    plain = tmp_path / "plain"
    plain.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"a": torch.randn(64 << 18, generator=g), "b": torch.randn(64 << 18, generator=g)},
              str(plain / "model.safetensors"))  # 128 MiB
    keys = KeySet.generate()
    kf = write_keys(keys, tmp_path / "k.jwk")
    encrypt_path(str(plain), str(tmp_path / "enc"), keys)
    cache = 64 << 20
    with mounted(tmp_path / "enc", tmp_path / "mnt", kf, "--cache-size", str(cache), "--direct-io") as mnt:
        daemon = daemon_process(mnt)
        base = daemon.memory_info().rss
        peak = base
        for _ in range(2):
            with open(os.path.join(mnt, "model.safetensors"), "rb", buffering=0) as f:
                while f.read(4 << 20):
                    peak = max(peak, daemon.memory_info().rss)
        print(f"daemon RSS: start {base >> 20} MiB, peak {peak >> 20} MiB, cache {cache >> 20} MiB")
        assert peak <= cache + (150 << 20)
