"""Real FUSE mounts of an in-memory tree through ctfs.fuse_ops / ctfs.mount.mountd.

Every daemon runs in a subprocess (this file doubles as the daemon script: ``python
tests/test_fuse_layer.py serve MOUNTPOINT ...``), so kill -9 and signals can be tested
and the pytest process never forks with FUSE threads running. Fixtures unmount (lazily if
needed) and kill whatever they started, even when a test fails.
"""
from __future__ import annotations

import errno
import hashlib
import mmap
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SEED = 20240601
MiB = 1 << 20
BIG = 64 * MiB
BAD_OFF = 3 * MiB + 4096  # EIO region inside /bad.bin
BAD_LEN = 8192
BAD_SIZE = 8 * MiB
READY_TIMEOUT = 30


# --------------------------------------------------------------------------------------
# the in-memory tree (used by the daemon subprocess; contents rebuilt by the tests)


def make_files(big_size: int) -> dict[str, bytes]:
    import numpy as np

    rng = np.random.default_rng(SEED)
    files = {
        "/big.bin": rng.bytes(big_size),
        "/small.txt": b"hello ctfs\n",
        "/sub/inner.bin": rng.bytes(100_003),
        "/bad.bin": rng.bytes(BAD_SIZE),
        "/secret.bin": b"not for you\n",
    }
    try:
        from safetensors.numpy import save
    except ImportError:
        pass
    else:
        files["/sub/model.safetensors"] = save({
            "w": np.arange(256 * 1024, dtype=np.float32).reshape(512, 512),
            "b": np.linspace(-1, 1, 4099).astype(np.float16),
        })
    return files


@dataclass
class Node:
    kind: str
    size: int
    mtime: float
    mode: int


class MemTree:
    """Implements the Tree protocol of ctfs.fuse_ops over a dict of bytes."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = {p: memoryview(d) for p, d in files.items()}
        self.dirs = {"/"}
        for p in files:
            d = os.path.dirname(p)
            while d != "/":
                self.dirs.add(d)
                d = os.path.dirname(d)
        self.mtime = 1_700_000_000.5
        self.handles: dict[int, tuple[str, memoryview]] = {}
        self.next_fh = 1

    def lookup(self, path: str):
        if path == "/boom.bin":
            raise ValueError("simulated bug in the tree")
        if path in self.dirs:
            return Node("dir", 0, self.mtime, 0o555)
        if path in self.files:
            return Node("file", len(self.files[path]), self.mtime, 0o444)
        return None

    def listdir(self, path: str) -> list[str]:
        pre = path.rstrip("/") + "/"
        names = {p[len(pre):].split("/")[0] for p in (*self.files, *self.dirs)
                 if p != path and p.startswith(pre)}
        return sorted(names)

    def open(self, path: str, uid: int, gid: int, pid: int) -> int:
        if path == "/secret.bin":
            raise PermissionError(errno.EACCES, "denied by policy")
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = (path, self.files[path])
        return fh

    def read_into(self, fh: int, offset: int, out: memoryview) -> int:
        path, data = self.handles[fh]
        n = max(0, min(len(out), len(data) - offset))
        if path == "/bad.bin" and offset < BAD_OFF + BAD_LEN and offset + n > BAD_OFF:
            raise OSError(errno.EIO, "integrity check failed")
        out[:n] = data[offset:offset + n]
        return n

    def release(self, fh: int) -> None:
        self.handles.pop(fh, None)

    def statfs(self) -> dict:
        return {"f_blocks": 1000, "f_bfree": 0, "f_files": len(self.files)}


def _daemon_main(argv: list[str]) -> int:
    import argparse
    import logging

    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["serve"])
    ap.add_argument("mountpoint")
    ap.add_argument("--direct-io", action="store_true")
    ap.add_argument("--background", action="store_true")
    ap.add_argument("--big", type=int, default=BIG)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(levelname)s %(message)s")
    from ctfs.mount import mountd

    def ready():
        print("READY", flush=True)

    def run() -> int:
        return mountd.serve(MemTree(make_files(a.big)), a.mountpoint, foreground=True,
                            direct_io=a.direct_io, on_ready=ready)

    if a.background:
        return mountd.spawn_background(run, a.mountpoint, timeout=READY_TIMEOUT)
    rc = run()
    print(f"EXIT {rc}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(_daemon_main(sys.argv[1:]))


# --------------------------------------------------------------------------------------
# fixtures

from ctfs.mount import mountd  # noqa: E402

pytestmark = [pytest.mark.timeout(120)]
import numpy as np  # noqa: E402


class Daemon:
    def __init__(self, mp: Path, proc: subprocess.Popen, errlog: Path) -> None:
        self.mp, self.proc, self.errlog = mp, proc, errlog
        self.stdout = ""

    def wait_line(self, prefix: str, timeout: float = READY_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        buf = ""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if r:
                line = self.proc.stdout.readline()
                if not line:
                    break
                self.stdout += line
                if line.startswith(prefix):
                    return line.strip()
                buf += line
            elif self.proc.poll() is not None:
                rest = self.proc.stdout.read()
                self.stdout += rest
                for line in rest.splitlines():
                    if line.startswith(prefix):
                        return line.strip()
                break
        raise AssertionError(f"daemon never printed {prefix!r}; rc={self.proc.poll()} "
                             f"stdout={self.stdout!r} stderr={self.errlog.read_text()!r}")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cleanup_mount(mp: Path) -> None:
    for _ in range(3):
        if not mountd.is_mounted(mp):
            return
        try:
            mountd.unmount(str(mp))
        except mountd.MountError:
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
            subprocess.run(["umount", "-l", str(mp)], capture_output=True)


class DaemonFactory:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.daemons: list[Daemon] = []
        self.mounts: list[Path] = []
        self.n = 0

    def mountpoint(self, name: str | None = None) -> Path:
        self.n += 1
        mp = self.base / (name or f"mnt{self.n}")
        mp.mkdir(parents=True, exist_ok=True)
        if mp not in self.mounts:
            self.mounts.append(mp)
        return mp

    def start(self, mp: Path | None = None, *, direct_io=False, big=BIG, wait=True) -> Daemon:
        mp = mp or self.mountpoint()
        errlog = self.base / f"daemon{len(self.daemons)}.err"
        args = [sys.executable, str(Path(__file__).resolve()), "serve", str(mp), "--big", str(big)]
        if direct_io:
            args.append("--direct-io")
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(errlog, "w"),
                                stdin=subprocess.DEVNULL, text=True, env=_env())
        d = Daemon(mp, proc, errlog)
        self.daemons.append(d)
        if wait:
            d.wait_line("READY")
        return d

    def background(self, mp: Path, *, big=MiB) -> subprocess.CompletedProcess:
        args = [sys.executable, str(Path(__file__).resolve()), "serve", str(mp), "--big", str(big),
                "--background"]
        return subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=60,
                              stdin=subprocess.DEVNULL)

    def cleanup(self) -> None:
        for d in self.daemons:
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
                try:
                    d.proc.wait(10)
                except subprocess.TimeoutExpired:
                    d.proc.kill()
                    d.proc.wait(10)
        for mp in self.mounts:
            _cleanup_mount(mp)


@pytest.fixture
def daemons(tmp_path):
    f = DaemonFactory(tmp_path)
    try:
        yield f
    finally:
        f.cleanup()


@pytest.fixture(scope="module")
def module_daemons(tmp_path_factory):
    f = DaemonFactory(tmp_path_factory.mktemp("fuse"))
    try:
        yield f
    finally:
        f.cleanup()


@pytest.fixture(scope="module")
def files():
    return make_files(BIG)


@pytest.fixture(scope="module", params=["cached", "direct_io"])
def mounted(request, module_daemons):
    d = module_daemons.start(module_daemons.mountpoint(request.param),
                             direct_io=request.param == "direct_io")
    return d.mp, request.param


def sha(b) -> str:
    return hashlib.sha256(b).hexdigest()


# --------------------------------------------------------------------------------------
# data path


def test_tree_listing_and_stat(mounted, files):
    mp, _ = mounted
    assert sorted(os.listdir(mp)) == sorted({p.split("/")[1] for p in files})
    assert "inner.bin" in os.listdir(mp / "sub")
    st = os.stat(mp / "big.bin")
    assert st.st_size == BIG and (st.st_mode & 0o777) == 0o444
    assert st.st_uid == os.getuid() and st.st_gid == os.getgid()
    assert st.st_mtime_ns == 1_700_000_000_500_000_000
    assert os.path.isdir(mp / "sub") and (os.stat(mp).st_mode & 0o777) == 0o555
    with pytest.raises(FileNotFoundError):
        os.stat(mp / "nope")
    assert os.statvfs(mp).f_files == len(files)


def test_full_reads_sha256(mounted, files):
    mp, _ = mounted
    for path in ("/big.bin", "/small.txt", "/sub/inner.bin"):
        h = hashlib.sha256()
        with open(mp / path[1:], "rb", buffering=0) as f:
            while chunk := f.read(MiB):
                h.update(chunk)
        assert h.hexdigest() == sha(files[path]), path


def test_random_ranges(mounted, files):
    mp, _ = mounted
    data = files["/big.bin"]
    rng = np.random.default_rng(7)
    fd = os.open(mp / "big.bin", os.O_RDONLY)
    try:
        for _ in range(300):
            off = int(rng.integers(0, BIG + 10))
            ln = int(rng.integers(1, 3 * MiB))
            assert os.pread(fd, ln, off) == data[off:off + ln], (off, ln)
        assert os.pread(fd, 100, BIG - 10) == data[-10:]  # short at EOF
        assert os.pread(fd, 100, BIG + 5) == b""
    finally:
        os.close(fd)


def test_concurrent_readers(mounted, files):
    from concurrent.futures import ThreadPoolExecutor

    mp, _ = mounted
    data = files["/big.bin"]

    def worker(seed: int) -> int:
        rng = np.random.default_rng(seed)
        fd = os.open(mp / "big.bin", os.O_RDONLY)
        try:
            for _ in range(40):
                off = int(rng.integers(0, BIG))
                ln = int(rng.integers(1, 2 * MiB))
                assert os.pread(fd, ln, off) == data[off:off + ln]
        finally:
            os.close(fd)
        return seed

    with ThreadPoolExecutor(6) as ex:
        assert sorted(ex.map(worker, range(6))) == list(range(6))


def test_mmap_private(mounted, files):
    mp, _ = mounted
    data = files["/big.bin"]
    with open(mp / "big.bin", "rb") as f:
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        try:
            assert sha(m) == sha(data)
            assert m[BIG - 5:] == data[-5:]
        finally:
            m.close()
    arr = np.memmap(mp / "big.bin", dtype=np.uint8, mode="c")  # MAP_PRIVATE
    rng = np.random.default_rng(3)
    for _ in range(50):
        off = int(rng.integers(0, BIG - 4096))
        assert arr[off:off + 4096].tobytes() == data[off:off + 4096]
    del arr


def test_mmap_shared(mounted, files):
    mp, mode = mounted
    data = files["/sub/inner.bin"]
    try:
        arr = np.memmap(mp / "sub" / "inner.bin", dtype=np.uint8, mode="r")  # MAP_SHARED
    except OSError as e:
        # direct_io without FUSE_DIRECT_IO_ALLOW_MMAP (libfuse < 3.16 cannot negotiate it)
        assert mode == "direct_io" and e.errno == errno.ENODEV, e
        return
    assert arr.tobytes() == data


def test_safetensors_safe_open(mounted, files):
    import safetensors
    mp, _ = mounted
    assert "/sub/model.safetensors" in files
    with safetensors.safe_open(str(mp / "sub" / "model.safetensors"), framework="numpy") as f:
        w = f.get_tensor("w")
        b = f.get_tensor("b")
    assert w.shape == (512, 512) and w[511, 511] == 512 * 512 - 1
    assert np.array_equal(b, np.linspace(-1, 1, 4099).astype(np.float16))


def test_o_direct_reads(mounted, files):
    mp, _ = mounted
    data = files["/big.bin"]
    buf = mmap.mmap(-1, 2 * MiB)  # page-aligned
    fd = os.open(mp / "big.bin", os.O_RDONLY | os.O_DIRECT)
    try:
        h = hashlib.sha256()
        off = 0
        while True:
            n = os.preadv(fd, [buf], off)
            if n == 0:
                break
            h.update(memoryview(buf)[:n])
            off += n
        assert off == BIG and h.hexdigest() == sha(data)
        for off in (0, 4096, 5 * MiB + 8192, BIG - 4096):
            small = mmap.mmap(-1, 4096)
            assert os.preadv(fd, [small], off) == 4096
            assert small[:] == data[off:off + 4096]
            small.close()
    finally:
        os.close(fd)
        buf.close()


# --------------------------------------------------------------------------------------
# errors


def test_eio_region(mounted, files):
    mp, _ = mounted
    data = files["/bad.bin"]
    fd = os.open(mp / "bad.bin", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as ei:
            os.pread(fd, 4096, BAD_OFF)
        assert ei.value.errno == errno.EIO
        assert os.pread(fd, 4096, 0) == data[:4096]  # good regions still read
        assert os.pread(fd, 4096, BAD_SIZE - 4096) == data[-4096:]
    finally:
        os.close(fd)
    got = 0
    with pytest.raises(OSError) as ei:
        with open(mp / "bad.bin", "rb", buffering=0) as f:
            while chunk := f.read(MiB):
                assert chunk == data[got:got + len(chunk)]
                got += len(chunk)
    assert ei.value.errno == errno.EIO and got <= BAD_OFF


def test_permission_and_unexpected_errors(mounted):
    mp, _ = mounted
    with pytest.raises(PermissionError) as ei:
        open(mp / "secret.bin", "rb")
    assert ei.value.errno == errno.EACCES
    with pytest.raises(OSError) as ei:
        os.stat(mp / "boom.bin")  # the tree raises ValueError -> EIO, daemon survives
    assert ei.value.errno == errno.EIO
    assert (mp / "small.txt").read_bytes() == b"hello ctfs\n"


def test_writes_rejected(mounted):
    mp, _ = mounted
    ro = (errno.EROFS, errno.EACCES)
    for fn in (
        lambda: open(mp / "small.txt", "r+b"),
        lambda: open(mp / "small.txt", "ab"),
        lambda: open(mp / "new.txt", "wb"),
        lambda: os.mkdir(mp / "newdir"),
        lambda: os.unlink(mp / "small.txt"),
        lambda: os.rename(mp / "small.txt", mp / "x.txt"),
        lambda: os.truncate(mp / "small.txt", 0),
        lambda: os.chmod(mp / "small.txt", 0o666),
        lambda: os.symlink("small.txt", mp / "lnk"),
    ):
        with pytest.raises(OSError) as ei:
            fn()
        assert ei.value.errno in ro, ei.value
    assert (mp / "small.txt").read_bytes() == b"hello ctfs\n"


# --------------------------------------------------------------------------------------
# lifecycle


def test_sigterm_unmounts_and_requests_are_large(daemons):
    d = daemons.start(big=16 * MiB)
    with open(d.mp / "big.bin", "rb", buffering=0) as f:
        while f.read(4 * MiB):
            pass
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    assert not mountd.is_mounted(d.mp)
    out = d.stdout + d.proc.stdout.read()
    assert "EXIT 0" in out
    err = d.errlog.read_text()
    # "max FUSE read request N bytes" logged at stop; 1 MiB needs root (read_ahead_kb)
    maxreq = int(err.split("max FUSE read request ")[1].split()[0])
    assert maxreq == MiB if os.geteuid() == 0 else maxreq >= 128 * 1024, err


def test_sigterm_while_busy_detaches_lazily(daemons):
    files = make_files(MiB)
    d = daemons.start(big=MiB)
    f = open(d.mp / "sub" / "inner.bin", "rb", buffering=0)
    try:
        d.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while mountd.is_mounted(d.mp) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not mountd.is_mounted(d.mp)
        assert d.proc.poll() is None  # still serving the open file
        assert f.read() == files["/sub/inner.bin"]
    finally:
        f.close()
    assert d.proc.wait(15) == 0


def test_background_spawn_returns_when_ready(daemons):
    mp = daemons.mountpoint("mnt with space")  # mountinfo escapes it as \040
    t0 = time.monotonic()
    res = daemons.background(mp)
    assert res.returncode == 0, res.stderr
    # no waiting: the mount must already serve
    assert mountd.is_mounted(mp)
    assert (mp / "small.txt").read_bytes() == b"hello ctfs\n"
    assert time.monotonic() - t0 < 30
    mountd.unmount(str(mp))
    assert not mountd.is_mounted(mp)


def test_background_spawn_reports_errors(daemons, tmp_path):
    res = daemons.background(tmp_path / "does-not-exist")
    assert res.returncode != 0
    assert "does-not-exist" in res.stderr and "mount" in res.stderr


def test_kill9_then_unmount_and_remount(daemons):
    d = daemons.start(big=MiB)
    assert (d.mp / "small.txt").read_bytes() == b"hello ctfs\n"
    d.proc.kill()
    d.proc.wait(10)
    with pytest.raises(OSError) as ei:
        open(d.mp / "small.txt", "rb")  # (stat may be answered from the attr cache)
    assert ei.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert mountd.is_mounted(d.mp)
    mountd.unmount(str(d.mp))
    assert not mountd.is_mounted(d.mp)
    d2 = daemons.start(d.mp, big=MiB)
    assert (d2.mp / "small.txt").read_bytes() == b"hello ctfs\n"


def test_kill9_busy_dead_mount_is_cleared(daemons):
    d = daemons.start(big=MiB)
    fd = os.open(d.mp / "small.txt", os.O_RDONLY)  # keeps the dead mount busy
    try:
        d.proc.kill()
        d.proc.wait(10)
        with pytest.raises(OSError) as ei:
            os.listdir(d.mp)
        assert ei.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        mountd.unmount(str(d.mp))  # plain unmount is EBUSY: must detach lazily
        assert not mountd.is_mounted(d.mp)
        d2 = daemons.start(d.mp, big=MiB)
        assert (d2.mp / "small.txt").read_bytes() == b"hello ctfs\n"
    finally:
        try:
            os.close(fd)
        except OSError:  # FLUSH on the dead connection -> ENOTCONN
            pass


def test_double_mount_refused(daemons):
    d = daemons.start(big=MiB)
    d2 = daemons.start(d.mp, big=MiB, wait=False)
    assert d2.proc.wait(30) == 1
    assert "already mounted" in d2.errlog.read_text()
    assert (d.mp / "small.txt").read_bytes() == b"hello ctfs\n"


def test_unmount_errors(tmp_path):
    with pytest.raises(mountd.MountError, match="not a mount point"):
        mountd.unmount(str(tmp_path))
    assert not mountd.is_mounted(tmp_path)
    assert mountd.is_mounted("/")
