"""The control socket and ``ctfs lock`` / ``unlock`` / ``status``, on real mounts: lock
drops the kernel's cached pages too (a file descriptor opened and read before the lock
cannot re-read plaintext from the page cache), unlock restores correct bytes."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import pytest
from safetensors.numpy import save_file

from ctfs.ops import control
from ctfs.errors import CtfsError
from ctfs.format.header import read_header_path
from ctfs.format.keys import KeySet
from ctfs.format.modeldir import encrypt_path
from ctfs.format.writer import EncryptOptions
from mounting import ctfs, daemon_process, force_unmount, is_mounted, mounted, write_keys

BIG = "model-00001-of-00002.safetensors"     # ~2 MiB
SMALL = "model-00002-of-00002.safetensors"   # ~256 KiB
CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("ctl")
    plain, enc = d / "plain", d / "enc"
    plain.mkdir()
    rng = np.random.default_rng(7)
    save_file({"w": rng.standard_normal((512, 1024), dtype=np.float32)}, str(plain / BIG))
    save_file({"v": rng.standard_normal((256, 256), dtype=np.float32)}, str(plain / SMALL))
    (plain / "config.json").write_text('{"model_type": "test"}\n')
    keys = KeySet.generate(name="ctltest")
    key_file = write_keys(keys, d / "keys.jwk")
    encrypt_path(str(plain), str(enc), keys, EncryptOptions(chunk_size=CHUNK))
    return {"plain": plain, "enc": enc, "keys": keys, "key_file": key_file, "dir": d}


def data_section(path) -> bytes:
    h = read_header_path(path)
    with open(path, "rb") as f:
        f.seek(h.data_start)
        return f.read()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_dead(proc, timeout=10.0) -> None:
    """Until ``proc`` (a psutil.Process) has exited; the daemon is not our child, so
    psutil's wait() would also wait for whoever reaps it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {proc.pid} still alive")


def status_json(mnt) -> dict:
    p = ctfs("status", mnt, "--json")
    return json.loads(p.stdout)


# --- real mounts -------------------------------------------------------------------------
def test_status_fields_and_socket_layout(model, tmp_path):
    mnt = tmp_path / "mnt"
    with mounted(model["enc"], mnt, model["key_file"], "--direct-io", "--cache-size", "64MiB"):
        sock = control.socket_path(mnt)
        assert sock == f"/run/ctfs/{control.mount_id(mnt)}/control.sock"
        st_sock, st_dir = os.lstat(sock), os.lstat(os.path.dirname(sock))
        assert stat.S_ISSOCK(st_sock.st_mode) and stat.S_IMODE(st_sock.st_mode) == 0o600
        assert stat.S_IMODE(st_dir.st_mode) == 0o700 and st_dir.st_uid == st_sock.st_uid == 0

        small = data_section(mnt / SMALL)          # read twice: the second read hits the cache
        assert data_section(mnt / SMALL) == small == data_section(model["plain"] / SMALL)
        assert data_section(mnt / BIG) == data_section(model["plain"] / BIG)
        fd = os.open(mnt / SMALL, os.O_RDONLY)
        try:
            st = status_json(mnt)
        finally:
            os.close(fd)

        assert st["mountpoint"] == str(mnt) and st["source"] == str(model["enc"])
        assert st["provider"] == "file"
        assert type(st["pid"]) is int and st["pid"] == daemon_process(mnt).pid
        assert st["locked"] is False and st["locked_reason"] is None
        assert st["files"] == [BIG, SMALL]
        kid = model["keys"].master[0].kid
        assert st["key_ids"] == [{"enc": kid, "sign": model["keys"].signing[0].kid}]
        assert type(st["open_handles"]) is int and st["open_handles"] == 1
        assert type(st["integrity_failures"]) is int and st["integrity_failures"] == 0
        assert type(st["decrypt_bytes_per_s"]) is float and st["decrypt_bytes_per_s"] > 1e6
        assert type(st["uptime"]) is float and 0 <= st["uptime"] < 120
        assert st["control_socket"] == sock
        c = st["cache"]
        for k in ("bytes_cached", "capacity", "chunks", "hits", "misses", "evictions",
                  "bytes_decrypted", "readahead_hits", "readahead_issued"):
            assert type(c[k]) is int and c[k] >= 0, k
        assert c["capacity"] == 64 << 20
        assert 0 < c["bytes_cached"] <= c["capacity"]
        tensor_bytes = sum(os.path.getsize(model["plain"] / f) for f in (BIG, SMALL))
        assert c["bytes_decrypted"] >= tensor_bytes - 4096  # every tensor byte at least once
        assert c["hits"] > 0  # the re-read of SMALL
        assert type(c["hit_ratio"]) is float
        assert c["hit_ratio"] == pytest.approx(c["hits"] / (c["hits"] + c["misses"]))
        assert 0.0 < c["hit_ratio"] < 1.0
        assert type(c["decrypt_seconds"]) is float and c["decrypt_seconds"] > 0

        k = st["fuse"]
        mdev = os.stat(mnt).st_dev
        assert k["dev"] == f"{os.major(mdev)}:{os.minor(mdev)}"
        assert (k["direct_io"], k["keep_cache"]) == (True, False)
        assert k["read_ahead_kb"] == 1024  # as root the daemon raises the mount's read-ahead
        with open(f"/sys/class/bdi/{k['dev']}/read_ahead_kb") as f:
            assert int(f.read()) == 1024
        assert type(k["read_requests"]) is int and k["read_requests"] > 0
        # --direct-io: each read(2) reaches the daemon as one request of up to max_read (1 MiB)
        assert k["max_read_request"] == 1 << 20

        text = ctfs("status", mnt).stdout
        assert "kernel      dev " + k["dev"] + ", direct_io, read-ahead 1024 KiB;" in text
        for needle in ("unlocked", BIG, SMALL, kid, "hit ratio", "evictions", "AEAD", "readahead"):
            assert needle in text, needle
    deadline = time.monotonic() + 10  # the daemon exits after the unmount, removing them
    while os.path.exists(os.path.dirname(sock)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(sock) and not os.path.exists(os.path.dirname(sock))


def _mmap_reader(path):
    """A child that maps ``path``, touches every page, then touches page 0 again on
    request (SIGBUS once the pages are invalidated and reads are refused)."""
    code = ("import mmap,os,sys\n"
            f"fd=os.open({str(path)!r},os.O_RDONLY)\n"
            "m=mmap.mmap(fd,0,prot=mmap.PROT_READ)\n"
            "s=sum(m[i] for i in range(0,len(m),4096))\n"
            "print('ready',flush=True); sys.stdin.readline()\n"
            "print(m[0], m[len(m)//2], flush=True)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


@pytest.mark.parametrize("method", ["fuse_invalidate_path", "open"])
def test_lock_drops_kernel_page_cache_and_unlock_restores(model, tmp_path, method):
    env = dict(os.environ)
    if method == "open":  # the fallback: the daemon reopens its files without keep_cache
        env["CTFS_KERNEL_INVALIDATE"] = "open"
    mnt = tmp_path / "mnt"
    with mounted(model["enc"], mnt, model["key_file"], env=env):
        view = mnt / BIG
        with open(view, "rb") as f:
            full = f.read()                     # every page is now in the page cache
        assert full[read_header_path(view).data_start:] == data_section(model["plain"] / BIG)
        fd = os.open(view, os.O_RDONLY)         # opened (and read) before the lock
        mapper = _mmap_reader(view)
        try:
            assert os.pread(fd, 1 << 20, 0) == full[:1 << 20]

            p = ctfs("lock", mnt)
            assert f"via {method}" in p.stderr and p.stdout == ""
            st = status_json(mnt)
            assert st["locked"] is True and "pid" in st["locked_reason"]
            assert st["cache"]["bytes_cached"] == 0
            # fresh opens: EACCES, plaintext and passthrough files alike
            for name in (BIG, SMALL, "config.json"):
                with pytest.raises(PermissionError):
                    open(mnt / name, "rb")
            # the old descriptor: its cached pages are gone, the re-read reaches the daemon
            for off in (0, len(full) // 2):
                with pytest.raises(OSError) as ei:
                    os.pread(fd, 4096, off)
                assert ei.value.errno in (errno.EACCES, errno.EIO)
            # the mapping: its pages were unmapped; faulting them back in fails (SIGBUS)
            out, _ = mapper.communicate("go\n", timeout=10)
            assert mapper.returncode == -signal.SIGBUS, (mapper.returncode, out)
            assert ctfs("lock", mnt).stderr.strip().endswith("already locked")

            assert ctfs("unlock", mnt).returncode == 0
            assert os.pread(fd, 1 << 20, 0) == full[:1 << 20]
            with open(view, "rb") as f:
                assert sha(f.read()) == sha(full)
            st = status_json(mnt)
            assert st["locked"] is False and st["locked_reason"] is None
            assert ctfs("unlock", mnt).stderr.strip().endswith("not locked")
        finally:
            mapper.kill()
            mapper.wait()
            os.close(fd)


def test_errors_are_one_line(model, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for args, needle in ((("status", mnt), "is not mounted"),
                         (("lock", "/proc"), "not a ctfs mount"),
                         (("unlock", tmp_path / "nowhere"), "is not mounted")):
        p = ctfs(*args, check=False)
        assert p.returncode != 0 and needle in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    # a daemon that died leaves a stale socket: a clear error, and a new daemon replaces it
    ctfs("mount", model["enc"], mnt, "--key-file", model["key_file"])
    try:
        sock = control.socket_path(mnt)
        d = daemon_process(mnt)
        d.kill()
        wait_dead(d)
        assert os.path.exists(sock)
        p = ctfs("status", mnt, check=False)
        assert p.returncode != 0 and "does not answer" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
        ctfs("umount", mnt)
        with mounted(model["enc"], mnt, model["key_file"]):
            assert status_json(mnt)["locked"] is False
    finally:
        force_unmount(mnt)
    assert not is_mounted(mnt)


# --- the server in-process (no FUSE) -----------------------------------------------------
class FakeTree:
    last_invalidation = {"method": "fake", "files": 1, "invalidated": 1, "not_cached": 0,
                         "failed": 0}


class FakeMount:
    def __init__(self, fail_unlock=None):
        self.locked = False
        self.tree = FakeTree()
        self.fail_unlock = fail_unlock
        self.calls = []

    def lock(self, reason):
        self.calls.append(("lock", reason))
        self.locked = True

    def unlock(self):
        self.calls.append(("unlock",))
        if self.fail_unlock:
            raise CtfsError(self.fail_unlock)
        self.locked = False

    def status(self):
        return {"locked": self.locked, "started": 0.0, "cache": {"bytes_decrypted": 100,
                                                                 "decrypt_seconds": 0.5}}


@pytest.fixture
def server(tmp_path):
    base = tempfile.mkdtemp(prefix="ctfs-test-")
    os.chmod(base, 0o755)
    srv = control.ControlServer(FakeMount(), str(tmp_path / "mnt"),
                                directory=os.path.join(base, "ctl"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        assert not os.path.exists(srv.path)
        os.rmdir(base)


def test_server_protocol(server):
    ask = lambda req: control._exchange(server.path, req, 5)  # noqa: E731
    st = ask({"cmd": "status"})
    assert st["ok"] is True and st["status"]["decrypt_bytes_per_s"] == 200.0
    assert ask({"cmd": "lock"}) == {"ok": True, "locked": True, "already": False,
                                    "invalidation": FakeTree.last_invalidation}
    assert ask({"cmd": "lock"})["already"] is True
    assert ask({"cmd": "unlock"}) == {"ok": True, "locked": False, "already": False}
    assert [c[0] for c in server.mount.calls] == ["lock", "unlock"]
    assert "uid 0" in server.mount.calls[0][1]
    server.mount.fail_unlock = "key provider said no"
    server.mount.locked = True
    r = ask({"cmd": "unlock"})
    assert r == {"ok": False, "error": "key provider said no", "locked": True}
    assert ask({"cmd": "reboot"})["ok"] is False
    assert ask([1, 2])["ok"] is False
    with socket.socket(socket.AF_UNIX) as s:  # not JSON
        s.connect(server.path)
        s.sendall(b"hello\n")
        assert json.loads(s.makefile().readline()) == {
            "ok": False, "error": "malformed request (one JSON object per line)"}
    # concurrent clients are all answered
    res = []
    ts = [threading.Thread(target=lambda: res.append(ask({"cmd": "status"})["ok"]))
          for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert res == [True] * 8


def test_server_refuses_other_uids_by_peer_credentials(server):
    # open the socket up on purpose: only the SO_PEERCRED check stands in the way
    os.chmod(server.dir, 0o755)
    os.chmod(server.path, 0o666)
    client = ("import json,socket,sys\n"
              "s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
              "s.sendall(b'{\"cmd\": \"lock\"}\\n'); print(s.makefile().readline())\n")
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "/usr/bin/python3", "-c", client, server.path],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"ok": False, "error": "permission denied: only root or "
                                    "the daemon's user may control this mount"}
    assert server.mount.calls == [] and server.mount.locked is False


def test_socket_paths():
    assert control.mount_id("/a/b") == hashlib.sha256(b"/a/b").hexdigest()[:16]
    assert control.mount_id("/a/b/") == control.mount_id("/a/./b")
    assert control.runtime_base(0) == "/run/ctfs"
    assert control.runtime_base(1234) == "/tmp/ctfs-1234"
    with pytest.raises(control.ControlError, match="unknown control command"):
        control.request("/", "reboot")
