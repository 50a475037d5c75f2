"""ctfs and gocryptfs mounts for the benchmarks: always unmounted, daemons always gone.

Every mount made here is registered, and :func:`cleanup_all` (called from a ``finally``
and at exit) unmounts whatever is left and kills daemons this run started."""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil

from .util import child_env, log

_LIVE: dict[str, "Mount"] = {}


def is_mounted(mnt: str) -> bool:
    mnt = os.path.abspath(mnt)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mnt for line in f)


def _find_daemon(mnt: str, name_hint: str) -> psutil.Process | None:
    mnt = os.path.abspath(mnt)
    for p in psutil.process_iter(["cmdline", "name", "status"]):
        cmd = p.info["cmdline"] or []
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if mnt in cmd and (name_hint in (p.info["name"] or "") or any(name_hint in c for c in cmd)):
            return p
    return None


def _wait_gone(p: psutil.Process, timeout: float) -> None:
    """Until P has exited. A zombie counts as gone: daemons are reparented to PID 1, which
    may reap late (seconds, in some containers)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        if time.monotonic() > deadline:
            try:
                p.kill()
            except psutil.Error:
                pass
            return
        time.sleep(0.01)


def _force_unmount(mnt: str) -> None:
    for cmd in (["fusermount3", "-u", mnt], ["fusermount3", "-uz", mnt], ["umount", "-l", mnt]):
        if not is_mounted(mnt):
            return
        if shutil.which(cmd[0]):
            subprocess.run(cmd, capture_output=True)


def proc_counters(pid: int) -> dict:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    out = {"minflt": int(fields[7]), "majflt": int(fields[9]), "ctxsw": 0}
    for tid in os.listdir(f"/proc/{pid}/task"):  # per thread: summed over the live ones
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        out["ctxsw"] += int(line.split()[1])
        except FileNotFoundError:
            pass
    return out


class Mount:
    """A FUSE mount whose daemon is a separate process (``self.daemon``)."""
    kind = "?"

    def __init__(self, src: str, mnt: str):
        self.src = src if "://" in str(src) else os.path.abspath(src)  # s3://... as it is
        self.mnt = os.path.abspath(mnt)
        self.daemon: psutil.Process | None = None

    # subclasses: _mount(), _unmount()
    def mount(self) -> "Mount":
        os.makedirs(self.mnt, exist_ok=True)
        if is_mounted(self.mnt):
            self.unmount()
        _LIVE[self.mnt] = self
        self._mount()
        deadline = time.monotonic() + 30
        while not is_mounted(self.mnt):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind}: {self.mnt} did not appear")
            time.sleep(0.02)
        self.daemon = _find_daemon(self.mnt, self.kind)
        return self

    def unmount(self) -> None:
        d = self.daemon
        try:
            if is_mounted(self.mnt):
                self._unmount()
        finally:
            deadline = time.monotonic() + 10
            while is_mounted(self.mnt) and time.monotonic() < deadline:
                time.sleep(0.05)
            _force_unmount(self.mnt)
            if d is not None:
                _wait_gone(d, 10)
            self.daemon = None
            _LIVE.pop(self.mnt, None)

    def remount(self) -> "Mount":
        self.unmount()
        return self.mount()

    def cpu_s(self) -> float:
        """User + system CPU seconds of the daemon so far."""
        t = self.daemon.cpu_times()
        return t.user + t.system

    def counters(self) -> dict:
        """The daemon's minor and major faults so far (every thread's, live or ended:
        /proc/PID/stat) and context switches (summed over its live threads)."""
        return proc_counters(self.daemon.pid)

    def peak_rss(self) -> int | None:
        from .util import vm_hwm
        return vm_hwm(self.daemon.pid) if self.daemon else None

    def __enter__(self):
        return self.mount()

    def __exit__(self, *exc):
        self.unmount()


class CtfsMount(Mount):
    kind = "ctfs"

    def __init__(self, src, mnt, key_file, extra=(), env=None):
        super().__init__(src, mnt)
        self.key_file, self.extra = key_file, list(extra)
        self.env = env  # None: child_env() (an s3:// source needs its credentials here)

    def _mount(self):
        p = subprocess.run([sys.executable, "-m", "ctfs.cli", "mount", self.src, self.mnt,
                            "--key-file", self.key_file, "--log-level", "warning", *self.extra],
                           capture_output=True, text=True, env=self.env or child_env(), timeout=120)
        if p.returncode:
            raise RuntimeError(f"ctfs mount failed ({p.returncode}): {p.stderr[-2000:]}")

    def _unmount(self):
        subprocess.run([sys.executable, "-m", "ctfs.cli", "umount", self.mnt], capture_output=True,
                       env=self.env or child_env(), timeout=60)


class FloorMount(Mount):
    """``benchmarks.fuse_floor``: ctfs's FUSE layer serving SIZE bytes from memory (no
    decryption, no cache, no source): the CPU floor of the FUSE read path."""
    kind = "fuse_floor"

    def __init__(self, mnt, size):
        super().__init__(mnt, mnt)
        self.size = int(size)
        self._proc: subprocess.Popen | None = None

    def _mount(self):
        self._proc = subprocess.Popen([sys.executable, "-m", "benchmarks.fuse_floor", self.mnt, str(self.size)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      env=child_env())
        deadline = time.monotonic() + 60
        while not is_mounted(self.mnt):
            if self._proc.poll() is not None:
                raise RuntimeError(f"fuse_floor exited ({self._proc.returncode}): {self._proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                break  # Mount.mount raises
            time.sleep(0.02)

    def _unmount(self):
        subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True, timeout=60)
        if self._proc is not None:
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc.stderr.close()
            self._proc = None


class GocryptfsMount(Mount):
    """gocryptfs with ``-kernel_cache`` (the peer that also keeps plaintext in the page cache)."""
    kind = "gocryptfs"

    def __init__(self, cipher_dir, mnt, passfile):
        super().__init__(cipher_dir, mnt)
        self.passfile = passfile

    @staticmethod
    def available() -> bool:
        return shutil.which("gocryptfs") is not None

    @staticmethod
    def init(cipher_dir: str, passfile: str) -> None:
        os.makedirs(cipher_dir, exist_ok=True)
        # a low scrypt cost only speeds up mounting; it has no effect on the data path
        subprocess.run(["gocryptfs", "-init", "-q", "-scryptn", "10", "-passfile", passfile, cipher_dir],
                       check=True, capture_output=True, timeout=120)

    def _mount(self):
        p = subprocess.run(["gocryptfs", "-q", "-kernel_cache", "-passfile", self.passfile, self.src, self.mnt],
                           capture_output=True, text=True, timeout=120)
        if p.returncode:
            raise RuntimeError(f"gocryptfs mount failed ({p.returncode}): {p.stderr[-2000:]}")

    def _unmount(self):
        subprocess.run(["fusermount3", "-u", self.mnt] if shutil.which("fusermount3") else ["umount", self.mnt],
                       capture_output=True, timeout=60)


def cleanup_all() -> None:
    for m in list(_LIVE.values()):
        try:
            log(f"cleanup: unmounting {m.mnt}")
            m.unmount()
        except Exception as e:  # keep going: leave nothing mounted
            log(f"cleanup: {m.mnt}: {e}")
            _force_unmount(m.mnt)
            if m.daemon is not None:
                try:
                    m.daemon.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
            _LIVE.pop(m.mnt, None)


atexit.register(cleanup_all)
