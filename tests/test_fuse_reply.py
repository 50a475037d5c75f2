"""ctfs.fuse_reply: replies written to /dev/fuse from the chunk cache.

Without a mount: libfuse's structures are laid out in ctypes memory as libfuse 3 lays them
out, the "device" is a pipe, and every check that guards the private layout is broken on
purpose once. With a mount: the installed libfuse passes the checks and reads through the
mount are answered this way, byte-exact (``test_mount.py`` reads every byte of real models
through it as well)."""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct

import pytest

from ctfs.mount import fuse_reply as FR
from ctfs.mount.fuse_reply import DirectReplier, LayoutError

FUSE_PTR = 0x5000
UID, GID, PID = 1234, 5678, 4242


class Fake:
    """A fuse_context_i and a fuse_req in memory, as libfuse 3 has them, and a pipe."""

    def __init__(self, unique=0x1000):
        self.session = ctypes.create_string_buffer(64)
        self.ctx = ctypes.create_string_buffer(FR.REQ_IN_CONTEXT + 8)
        self.req = ctypes.create_string_buffer(FR.CH_IN_REQ + 8)
        c = FR._FuseContext.from_buffer(self.ctx)
        c.fuse, c.uid, c.gid, c.pid = FUSE_PTR, UID, GID, PID
        self.set(self.ctx, FR.REQ_IN_CONTEXT, ctypes.c_void_p, self.addr(self.req))
        self.set(self.req, FR.SE_IN_REQ, ctypes.c_void_p, self.addr(self.session))
        self.set(self.req, FR.UNIQUE_IN_REQ, ctypes.c_uint64, unique)
        r = FR._FuseCtx.from_buffer(self.req, FR.CTX_IN_REQ)
        r.uid, r.gid, r.pid = UID, GID, PID
        self.rfd, self.wfd = os.pipe()
        self.ctx_calls = 0

    @staticmethod
    def addr(buf) -> int:
        return ctypes.addressof(buf)

    @staticmethod
    def set(buf, off, ctype, value):
        ctype.from_buffer(buf, off).value = value

    def get_context(self):
        return self.addr(self.ctx)

    def req_ctx(self, req):
        self.ctx_calls += 1
        return req + FR.CTX_IN_REQ

    def replier(self, **kw) -> DirectReplier:
        args = dict(get_context=self.get_context, req_ctx=self.req_ctx, fuse_ptr=FUSE_PTR,
                    session=self.addr(self.session), fd=self.wfd)
        args.update(kw)
        return DirectReplier(**args)

    def reply(self) -> tuple[tuple[int, int, int], bytes]:
        data = os.read(self.rfd, 1 << 20)
        return struct.unpack("<IiQ", data[:16]), data[16:]

    def close(self):
        os.close(self.rfd)
        os.close(self.wfd)


@pytest.fixture
def fake():
    f = Fake()
    yield f
    f.close()


def test_layout_is_libfuse3s_on_this_platform():
    # struct fuse_context is public; fuse_context_i appends the request pointer to it.
    # struct fuse_req: se, unique, int ctr, pthread_mutex_t lock, struct fuse_ctx ctx, ch.
    if ctypes.sizeof(ctypes.c_void_p) == 8:
        assert (FR.REQ_IN_CONTEXT, FR.SE_IN_REQ, FR.UNIQUE_IN_REQ, FR.CTX_IN_REQ, FR.CH_IN_REQ) \
            == (40, 0, 8, 64, 80)


def test_reply_header_and_bytes_are_exact(fake):
    r = fake.replier()
    u = r.unique()
    assert u == 0x1000 and fake.ctx_calls == 1
    a, b = os.urandom(3000), os.urandom(70)
    assert r.send(u, [memoryview(a), memoryview(b)]) is True
    assert fake.reply() == ((16 + 3070, 0, 0x1000), a + b)
    assert r.unique() == 0x1000 and fake.ctx_calls == 1  # the full check runs once
    assert (r.enabled, r.replies, r.why_off) == (True, 1, None)


@pytest.mark.parametrize("break_it, why", [
    (lambda f: Fake.set(f.ctx, 0, ctypes.c_void_p, FUSE_PTR + 8), "not this mount's"),
    (lambda f: Fake.set(f.req, FR.SE_IN_REQ, ctypes.c_void_p, 0x77), "session"),
    (lambda f: Fake.set(f.ctx, FR.REQ_IN_CONTEXT, ctypes.c_void_p, 0), "is not a request pointer"),
    (lambda f: Fake.set(f.ctx, FR.REQ_IN_CONTEXT, ctypes.c_void_p, Fake.addr(f.req) + 3),
     "is not a request pointer"),
    (lambda f: Fake.set(f.ctx, FR.REQ_IN_CONTEXT, ctypes.c_void_p, unmapped_page()), "is not readable (Bad address)"),
    (lambda f: Fake.set(f.req, FR.CH_IN_REQ, ctypes.c_void_p, 0x99), "clone_fd"),
    (lambda f: setattr(f, "req_ctx", lambda req: req + FR.CTX_IN_REQ + 8), "fuse_req_ctx(req) at +72"),
    (lambda f: Fake.set(f.req, FR.CTX_IN_REQ + 8, ctypes.c_int32, PID + 1), "req->ctx disagrees"),
    (lambda f: Fake.set(f.req, FR.UNIQUE_IN_REQ, ctypes.c_uint64, 0x1001), "implausible request id"),
    (lambda f: Fake.set(f.req, FR.UNIQUE_IN_REQ, ctypes.c_uint64, 0), "implausible request id"),
    (lambda f: setattr(f, "get_context", lambda: None), "no FUSE context"),
])
def test_any_layout_surprise_turns_direct_replies_off(fake, caplog, break_it, why):
    break_it(fake)
    r = fake.replier()
    with caplog.at_level(logging.WARNING, logger="ctfs.fuse"):
        assert r.unique() is None
        assert r.unique() is None
    assert r.enabled is False and why in r.why_off
    assert [m for m in caplog.messages if "direct FUSE replies off" in m] == \
        [f"direct FUSE replies off, reads copy through libfuse's buffer: {r.why_off}"]


def unmapped_page() -> int:
    """An address that is certainly not mapped: a page mapped, then unmapped."""
    import mmap
    m = mmap.mmap(-1, 4096)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    m.close()
    return addr


def test_peek_reads_mapped_memory_and_refuses_the_rest():
    buf = ctypes.create_string_buffer(b"0123456789")
    assert FR.peek(ctypes.addressof(buf) + 2, 5) == b"23456"
    with pytest.raises(LayoutError, match=r"^memory at 0x[0-9a-f]+ is not readable \(Bad address\)$"):
        FR.peek(unmapped_page(), 8)
    with pytest.raises(LayoutError, match="is not readable"):
        FR.peek(8, 8)


class OtherLibfuse(Fake):
    """Structures laid out NOT as libfuse 3.14 has them: ``fuse_context_i`` with one more
    member before ``req`` (here an int, then the pointer), and ``fuse_req`` with one more
    pointer before ``ctx`` (so uid/gid/pid and ``ch`` move by 8 bytes)."""

    def __init__(self, what):
        super().__init__()
        if what == "context_i":
            self.ctx = ctypes.create_string_buffer(FR.REQ_IN_CONTEXT + 16)
            c = FR._FuseContext.from_buffer(self.ctx)
            c.fuse, c.uid, c.gid, c.pid = FUSE_PTR, UID, GID, PID
            self.set(self.ctx, FR.REQ_IN_CONTEXT, ctypes.c_uint64, 0x2a)  # a new int member
            self.set(self.ctx, FR.REQ_IN_CONTEXT + 8, ctypes.c_void_p, self.addr(self.req))
        else:  # "req": fuse_req with a pointer more before ctx
            self.req = ctypes.create_string_buffer(FR.CH_IN_REQ + 16)
            self.set(self.ctx, FR.REQ_IN_CONTEXT, ctypes.c_void_p, self.addr(self.req))
            self.set(self.req, FR.SE_IN_REQ, ctypes.c_void_p, self.addr(self.session))
            self.set(self.req, FR.UNIQUE_IN_REQ, ctypes.c_uint64, 0x1000)
            r = FR._FuseCtx.from_buffer(self.req, FR.CTX_IN_REQ + 8)
            r.uid, r.gid, r.pid = UID, GID, PID

        self.ctx_shift = 8 if what == "req" else 0

    def req_ctx(self, req):
        return req + FR.CTX_IN_REQ + self.ctx_shift


@pytest.mark.parametrize("what, why", [("context_i", "fuse_context_i.req 0x2a is not a request pointer"),
                                       ("req", "req->ctx disagrees with fuse_get_context()")])
def test_another_libfuse_layout_turns_direct_replies_off(caplog, what, why):
    f = OtherLibfuse(what)
    try:
        r = f.replier()
        with caplog.at_level(logging.WARNING, logger="ctfs.fuse"):
            assert [r.unique() for _ in range(3)] == [None] * 3
        assert (r.enabled, r.why_off, r.replies) == (False, why, 0)
        assert caplog.messages == [f"direct FUSE replies off, reads copy through libfuse's buffer: {why}"]
    finally:
        f.close()


def test_refused_replies_fall_back(fake, monkeypatch):
    r = fake.replier()
    u = r.unique()

    def refuse(code):
        def writev(fd, bufs):
            raise OSError(code, os.strerror(code))
        return writev

    # ENOENT: the request is gone (interrupted), or the id was wrong: libfuse's own reply
    # carries the bytes; direct replies stay on
    monkeypatch.setattr(FR.os, "writev", refuse(errno.ENOENT))
    assert r.send(u, [memoryview(b"x" * 10)]) is False
    assert (r.enabled, r.unknown, r.replies) == (True, 1, 0)
    # anything else: off for good
    monkeypatch.setattr(FR.os, "writev", refuse(errno.EINVAL))
    assert r.send(u, [memoryview(b"x" * 10)]) is False
    assert r.enabled is False and "Invalid argument" in r.why_off
    assert r.unique() is None
    monkeypatch.setattr(FR.os, "writev", lambda fd, bufs: 16)
    r2 = fake.replier()
    assert r2.send(r2.unique(), [memoryview(b"x" * 10)]) is False
    assert "short write" in r2.why_off


def test_closed_replier_sends_nothing(fake):
    r = fake.replier()
    r.close()
    assert r.unique() is None and r.replies == 0


def test_refuses_a_missing_session():
    with pytest.raises(LayoutError):
        DirectReplier(lambda: 1, lambda r: r, FUSE_PTR, 0, 3)
    with pytest.raises(LayoutError):
        DirectReplier(lambda: 1, lambda r: r, FUSE_PTR, 0x10, -1)
    with pytest.raises(LayoutError):
        DirectReplier(lambda: 1, lambda r: r, 0, 0x10, 3)


# ----------------------------------------------------------------- real mounts


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    from ctfs.format.keys import KeySet
    from ctfs.format.writer import EncryptOptions, encrypt_file
    from mounting import write_keys

    d = tmp_path_factory.mktemp("reply")
    g = torch.Generator().manual_seed(11)
    tensors = {"a": torch.randn(1500, 1001, generator=g), "b": torch.randn(77, 33, generator=g).half(),
               "c": torch.randn(3, 700_001, generator=g)}
    plain = d / "plain.safetensors"
    save_file(tensors, str(plain), metadata={"format": "pt"})
    keys = KeySet.generate()
    src = d / "src"
    src.mkdir()
    # 256 KiB chunks: a 1 MiB request is answered from five chunks at once
    encrypt_file(str(plain), str(src / "model.safetensors"), keys, EncryptOptions(chunk_size=256 * 1024))
    return {"plain": plain, "src": src, "key_file": write_keys(keys, d / "k.jwk")}


def serve_and_read(model, tmp_path, prog, *opts) -> tuple[dict, str, int]:
    """``PROG mount SRC MNT --key-file K OPTS --foreground --log-level debug``: read the view
    through it and check every byte; (status["fuse"], the daemon's log, the view's length)."""
    import hashlib
    import json
    import subprocess
    import time

    from mounting import ctfs, force_unmount, is_mounted

    plain = model["plain"].read_bytes()
    p_start = 8 + int.from_bytes(plain[:8], "little")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = open(tmp_path / "daemon.log", "w+")
    # in the foreground, so that everything libfuse prints lands in the log
    proc = subprocess.Popen([*prog, "mount", model["src"], mnt, "--key-file", model["key_file"], *opts,
                             "--foreground", "--log-level", "debug"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not is_mounted(mnt):
            assert proc.poll() is None and time.monotonic() < deadline, open(log.name).read()
            time.sleep(0.05)
        with open(mnt / "model.safetensors", "rb", buffering=0) as f:
            got = f.read()
            # the view: its own header (crypto keys dropped, padded to the encrypted
            # header's length), then exactly the plaintext's data section
            v_start = 8 + int.from_bytes(got[:8], "little")
            assert json.loads(got[8:v_start]) == json.loads(plain[8:p_start])
            assert hashlib.sha256(got[v_start:]).hexdigest() == \
                hashlib.sha256(plain[p_start:]).hexdigest()
            want = got[:v_start] + plain[p_start:]
            # unaligned reads of every size, each checked (with --direct-io each one is a
            # request of its own)
            for off, n in ((5, 1), (4095, 2), (1 << 20, 3 << 20), (len(want) - 10, 100),
                           (len(want), 10), (123_457, 777_777), (v_start - 3, 10)):
                f.seek(off)
                assert f.read(n) == want[off:off + n]
        st = json.loads(ctfs("status", mnt, "--json").stdout)["fuse"]
        ctfs("umount", mnt)
        assert proc.wait(30) == 0
    finally:
        force_unmount(mnt)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = open(log.name).read()
    # libfuse's own empty reply to an answered request is refused (ENOENT) without a word
    assert "writing device" not in text  # libfuse: perror("fuse: writing device")
    assert "Traceback" not in text and "ERROR" not in text
    return st, text, len(want)


@pytest.mark.parametrize("reply, extra", [("auto", []), ("auto", ["--direct-io"]), ("copy", [])])
def test_mount_answers_reads_from_the_chunk_cache_byte_exact(model, tmp_path, reply, extra):
    from mounting import CTFS

    st, text, size = serve_and_read(model, tmp_path, CTFS, "--fuse-reply", reply, *extra)
    if reply == "auto":
        assert st["fuse_reply"] == "direct" and "fuse_reply_off" not in st
        assert st["direct_replies"] >= size // (1 << 20)  # the data: all but the header
        assert st["direct_replies"] < st["read_requests"]
        assert f"{st['direct_replies']} replied from the chunk cache" in text
    else:
        assert (st["fuse_reply"], st["direct_replies"]) == ("copy", 0)
    assert "WARNING" not in text


# A daemon that expects libfuse's private structures elsewhere than the installed libfuse
# keeps them: as if libfuse's fuse_context_i had one more member before req, or its
# fuse_req one more before ctx.
OTHER_LAYOUT = {
    "context_i": "FR.REQ_IN_CONTEXT += 8; FR._CONTEXT_I_SIZE += 8",
    "req": "FR.CTX_IN_REQ += 8; FR.CH_IN_REQ += 8; FR._REQ_SIZE += 8",
}


@pytest.mark.parametrize("layout", sorted(OTHER_LAYOUT))
def test_mount_on_another_libfuse_layout_copies_with_one_warning(model, tmp_path, layout):
    import sys
    code = ("import sys, ctfs.mount.fuse_reply as FR; " + OTHER_LAYOUT[layout] +
            "; from ctfs.cli import main; sys.argv[0] = 'ctfs'; sys.exit(main())")
    st, text, _ = serve_and_read(model, tmp_path, [sys.executable, "-c", code])  # --fuse-reply auto
    assert (st["fuse_reply"], st["direct_replies"]) == ("copy", 0)
    off = [line for line in text.splitlines() if "direct FUSE replies off" in line]
    assert len(off) == 1 and st["fuse_reply_off"] in off[0], text
    assert [line for line in text.splitlines() if "WARNING" in line] == off


def test_mount_maps_its_read_buffers_before_serving(model, tmp_path):
    import json

    from mounting import ctfs, mounted

    with mounted(model["src"], tmp_path / "mnt", model["key_file"], "--readahead", "2") as mnt:
        st = json.loads(ctfs("status", mnt, "--json").stdout)["cache"]
        # readahead + 3 chunk buffers of 256 KiB, mapped before any read
        assert (st["bytes_held"], st["bytes_cached"]) == (5 * 256 * 1024, 0)


# ------------------------------------------------------ pinned private internals


def test_mfusepy_outside_the_pinned_range_is_refused_with_the_fix(monkeypatch):
    import importlib.metadata as md

    from ctfs.mount import fuse_ops  # first: it binds mfusepy to libfuse3
    mfusepy = fuse_ops.mfusepy
    fuse_ops.check_mfusepy(mfusepy)  # the installed one passes
    monkeypatch.setattr(md, "version", lambda name: "4.0.1")
    with pytest.raises(ImportError, match=r"^ctfs needs mfusepy >=3\.0,<4\.0 \(found 4\.0\.1, .*"
                                          r"install it with: pip install 'mfusepy>=3\.0,<4\.0'$"):
        fuse_ops.check_mfusepy(mfusepy)
    monkeypatch.setattr(md, "version", lambda name: "3.1.1")

    class Other(mfusepy.FUSE):
        def read(self, path, size, offset, fh):  # another glue signature
            return b""

    class M:
        FUSE, Operations = Other, mfusepy.Operations
    with pytest.raises(ImportError, match=r"whose FUSE\.read takes \['self', 'path', 'size', 'offset', 'fh'\]"):
        fuse_ops.check_mfusepy(M)

