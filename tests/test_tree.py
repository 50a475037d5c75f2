"""The mount's tree without a mount: everything the FUSE layer does is testable here."""
from __future__ import annotations

import errno
import hashlib

import pytest
import torch
from safetensors.torch import save_file

from ctfs.cache import ChunkCache
from ctfs.header import read_header_path
from ctfs.keys import KeySet
from ctfs.modeldir import encrypt_path
from ctfs.tree import MountRefused, MountTree
from ctfs.writer import EncryptOptions


@pytest.fixture
def setup(tmp_path):
    plain, enc = tmp_path / "plain", tmp_path / "enc"
    plain.mkdir()
    save_file({"w": torch.randn(128, 128), "b": torch.randn(128)}, str(plain / "model.safetensors"),
              metadata={"format": "pt"})
    (plain / "config.json").write_text("{}")
    keys = KeySet.generate()
    encrypt_path(str(plain), str(enc), keys, EncryptOptions(chunk_size=8192))
    return plain, enc, keys


def read_all(tree, path):
    fh = tree.open(path, 0, 0, 1)
    out, buf, off = bytearray(), memoryview(bytearray(5000)), 0
    while n := tree.read_into(fh, off, buf):
        out += buf[:n]
        off += n
    tree.release(fh)
    return bytes(out)


def test_view_data_equals_plaintext_and_close_wipes(setup):
    plain, enc, keys = setup
    cache = ChunkCache(1 << 20)
    tree = MountTree(str(enc), keys, cache)
    assert sorted(tree.listdir("/")) == ["config.json", "model.safetensors"]
    view = read_all(tree, "/model.safetensors")
    h, ph = read_header_path(enc / "model.safetensors"), read_header_path(plain / "model.safetensors")
    assert len(view) == h.file_size
    assert view[h.data_start:] == (plain / "model.safetensors").read_bytes()[ph.data_start:]
    assert cache.stats()["bytes_cached"] > 0
    cf = tree.files[0]
    deks = [t.dek for t in cf._tensors.values() if t.dek is not None]
    tree.close()
    assert cache.stats()["bytes_cached"] == 0
    assert all(not any(d) for d in deks)  # data keys overwritten
    with pytest.raises(PermissionError):
        tree.open("/model.safetensors", 0, 0, 1)


def test_lock_unlock_keeps_open_handles_working(setup):
    plain, enc, keys = setup
    tree = MountTree(str(enc), keys, ChunkCache(1 << 20))
    fh = tree.open("/model.safetensors", 0, 0, 1)
    buf = memoryview(bytearray(4096))
    tree.read_into(fh, 0, buf)
    before = bytes(buf)
    tree.lock()
    with pytest.raises(PermissionError):
        tree.read_into(fh, 0, buf)
    tree.reauthorise(keys)
    assert tree.read_into(fh, 0, buf) == 4096 and bytes(buf) == before


def test_access_checker_and_plain_refusal(setup, tmp_path):
    plain, enc, keys = setup
    tree = MountTree(str(enc), keys, ChunkCache(1 << 20), access=lambda uid, gid: uid == 1000)
    with pytest.raises(PermissionError):
        tree.open("/model.safetensors", 1001, 1001, 5)
    assert tree.open("/model.safetensors", 1000, 1000, 5) > 0
    with pytest.raises(OSError) as ei:
        tree.open("/nope", 1000, 1000, 5)
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(MountRefused, match="plain"):
        MountTree(str(plain), keys, ChunkCache(1 << 20))
    t = MountTree(str(plain), keys, ChunkCache(1 << 20), allow_plain=True)
    assert hashlib.sha256(read_all(t, "/model.safetensors")).digest() == \
        hashlib.sha256((plain / "model.safetensors").read_bytes()).digest()


def test_reads_never_fail_for_what_mount_time_could_see(setup):
    """Every check (signature, policy, unwraps, v2 empty-tensor tags) happens at build time:
    after it, reading every byte of an untouched file cannot raise."""
    plain, enc, keys = setup
    tree = MountTree(str(enc), keys, ChunkCache(64 << 10))
    for _ in range(2):
        read_all(tree, "/model.safetensors")
    assert tree.integrity_failures == 0
