"""The mount's tree without a mount: everything the FUSE layer does is testable here."""
from __future__ import annotations

import errno
import os
import hashlib

import pytest
import torch
from safetensors.torch import save_file

from ctfs.mount.cache import ChunkCache
from ctfs.format.header import read_header_path
from ctfs.format.keys import KeySet
from ctfs.format.modeldir import encrypt_path
from ctfs.mount.tree import MountRefused, MountTree
from ctfs.format.writer import EncryptOptions


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


def test_fuse_ops_check_metadata_against_the_access_list(setup, monkeypatch):
    """No mount needed: over a tree with an access list, the FUSE operations refuse stat,
    access, listing and statfs to callers not on it (EACCES, also for names that do not
    exist), and keep no kernel entry/attribute cache; without a list nothing is checked."""
    from ctfs.mount import fuse_ops  # first: it binds mfusepy to libfuse3
    FuseOSError = fuse_ops.FuseOSError
    plain, enc, keys = setup
    caller = {"uid": 1001, "gid": 1001}
    monkeypatch.setattr(fuse_ops.mfusepy, "fuse_get_context", lambda: (caller["uid"], caller["gid"], 42))
    tree = MountTree(str(enc), keys, ChunkCache(1 << 20), access=lambda uid, gid: uid == 1000)
    ops = fuse_ops.CtfsOperations(tree)
    assert (ops.attr_timeout, ops.entry_timeout, ops.negative_timeout) == (0.0, 0.0, 0.0)
    calls = [lambda: ops.getattr("/model.safetensors"), lambda: ops.getattr("/"),
             lambda: ops.getattr("/no-such-file"), lambda: ops.access("/model.safetensors", os.R_OK),
             lambda: ops.opendir("/"), lambda: ops.readdir("/", 0), lambda: ops.statfs("/")]
    for call in calls:
        with pytest.raises(FuseOSError) as ei:
            call()
        assert ei.value.errno == errno.EACCES
    caller.update(uid=1000, gid=1000)
    assert ops.getattr("/model.safetensors")["st_size"] == (enc / "model.safetensors").stat().st_size
    names = [e if isinstance(e, str) else e[0] for e in ops.readdir("/", 0)]
    assert names == [".", "..", "config.json", "model.safetensors"] and ops.opendir("/") == 0
    with pytest.raises(FuseOSError) as ei:
        ops.getattr("/no-such-file")
    assert ei.value.errno == errno.ENOENT
    open_tree = fuse_ops.CtfsOperations(MountTree(str(enc), keys, ChunkCache(1 << 20)))
    caller.update(uid=1001, gid=1001)
    assert open_tree.getattr("/model.safetensors")["st_size"] > 0
    assert (open_tree.attr_timeout, open_tree.entry_timeout, open_tree.negative_timeout) == (60.0, 60.0, 1.0)


def test_fuse_init_turns_auto_inval_data_off(setup):
    """The view's attributes never change while mounted, so init drops libfuse's default
    FUSE_CAP_AUTO_INVAL_DATA: with it, every read on an access-list mount (attribute
    timeout 0) would first cost a GETATTR round trip."""
    from types import SimpleNamespace

    from ctfs.mount import fuse_ops
    plain, enc, keys = setup
    ops = fuse_ops.CtfsOperations(MountTree(str(enc), keys, ChunkCache(1 << 20)))
    conn = SimpleNamespace(proto_major=7, proto_minor=45, max_write=1 << 20, max_read=0,
                           max_readahead=1 << 17, capable=0xFFFFFFF, want=0x14F819,
                           max_background=12, congestion_threshold=9)
    config = SimpleNamespace(attr_timeout=1.0, entry_timeout=1.0, negative_timeout=0.0, use_ino=1)
    ops.init_with_config(conn, config)
    assert conn.want == 0x14F819 & ~(1 << 12)
    assert (conn.max_background, conn.congestion_threshold) == (64, 48)
    assert (config.attr_timeout, config.entry_timeout, config.negative_timeout, config.use_ino) == (60.0, 60.0, 1.0, 0)
