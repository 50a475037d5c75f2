"""Shared plumbing: progress lines, statistics, fresh worker processes with their peak RSS,
page-cache control and the readers used by the throughput runs."""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

GB = 10**9
MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_T0 = time.monotonic()


def log(msg: str) -> None:
    """One progress line on stderr."""
    el = time.monotonic() - _T0
    print(f"[bench {int(el) // 60:3d}:{int(el) % 60:02d}] {msg}", file=sys.stderr, flush=True)


def fig(samples) -> dict:
    """A figure: every run, its min and median (None-safe)."""
    xs = [float(x) for x in samples if x is not None]
    if not xs:
        return {"runs": [], "min": None, "median": None, "max": None}
    return {"runs": xs, "min": min(xs), "median": statistics.median(xs), "max": max(xs)}


class Samples(dict):
    """name -> list of per-run values; ``figures()`` turns it into {name: fig}."""

    def add(self, name: str, value) -> None:
        self.setdefault(name, []).append(value)

    def figures(self) -> dict:
        return {k: fig(v) for k, v in self.items()}


def installed(module: str) -> bool:
    """Whether MODULE imports here (an optional peer: Run:ai, tensorizer)."""
    import importlib
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def child_env(extra: dict | None = None, *, pythonpath: bool = True) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    else:
        env.pop("PYTHONPATH", None)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "TRANSFORMERS_VERBOSITY": "error"})
    if extra:
        env.update(extra)
    return env


@dataclass
class ProcResult:
    rc: int
    wall_s: float
    peak_rss: int            # bytes: ru_maxrss of the child (and the children it waited for)
    cpu_s: float             # user + system CPU of the child
    stdout: str
    stderr: str
    data: dict = field(default_factory=dict)   # the child's last JSON line on stdout


class Zygote:
    """A ``benchmarks.worker --serve KIND`` process: imports once, forks one child per
    measurement (saves the seconds of ``import torch`` per run; same peak-RSS semantics)."""

    def __init__(self, kind: str, logfile: str):
        self.kind = kind
        self.err = open(logfile, "ab")
        self.p = subprocess.Popen([sys.executable, "-m", "benchmarks.worker", "--serve", kind],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                  env=child_env(), cwd=REPO, text=True, start_new_session=True)
        hello = self.p.stdout.readline()
        if not hello:
            self.close()
            raise RuntimeError(f"worker zygote {kind} did not start (see {logfile})")

    def run(self, task: str, args: dict) -> ProcResult:
        t0 = time.monotonic()
        self.p.stdin.write(json.dumps({"task": task, "args": args}) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        wall = time.monotonic() - t0
        if not line:
            raise RuntimeError(f"worker zygote {self.kind} died")
        res = json.loads(line)
        if not res.get("ok"):
            raise RuntimeError(f"worker {task} failed:\n{res.get('error')}")
        return ProcResult(0, wall, res["peak_rss"], res["cpu_s"], "", "", res["data"])

    def close(self) -> None:
        try:
            if self.p.poll() is None:
                self.p.stdin.close()
                try:
                    self.p.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.p.pid, 9)
                    self.p.wait()
        finally:
            self.err.close()


class Workers:
    """Runs every measurement in a child forked from a zygote: ``bare`` (nothing imported:
    the child imports what it needs, like a fresh interpreter), ``pt`` (torch, safetensors,
    cryptotensors, ctfs pre-imported) or ``tf`` (transformers pre-imported).

    Why a zygote and not ``subprocess`` from here: Linux carries a process's peak RSS across
    exec (``ru_maxrss`` of an exec'd child starts at this, larger, process's RSS), while a
    child forked from a small zygote starts at the zygote's current RSS, i.e. exactly what
    a fresh interpreter that made the same imports would hold."""

    def __init__(self, logdir: str, fresh: bool = False):
        self.logdir, self.fresh = logdir, fresh
        self.zygotes: dict[str, Zygote] = {}

    def run(self, task: str, args: dict, kind: str | None = None) -> ProcResult:
        kind = "bare" if (self.fresh or not kind) else kind
        z = self.zygotes.get(kind)
        if z is None or z.p.poll() is not None:
            z = self.zygotes[kind] = Zygote(kind, os.path.join(self.logdir, f"zygote-{kind}.log"))
        return z.run(task, args)

    def command(self, cmd: list[str], *, env: dict | None = None, cwd: str | None = None,
                timeout: float = 3600) -> ProcResult:
        """Run CMD from the bare zygote: its peak RSS is CMD's own (and its children's)."""
        r = self.run("cmd", {"cmd": cmd, "env": env, "cwd": cwd, "timeout": timeout})
        d = r.data
        return ProcResult(d["rc"], d["seconds"], r.peak_rss, r.cpu_s, d["stdout"], d["stderr"], d.get("json") or {})

    def close(self) -> None:
        for z in self.zygotes.values():
            z.close()
        self.zygotes.clear()


# --- page cache ---------------------------------------------------------------------------

def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches() -> bool:
    """Empty the page cache, dentries and inodes (root only); False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm(paths) -> int:
    """Read PATHS (files, or directories walked) fully, so they sit in the page cache."""
    n = 0
    buf = bytearray(8 * MiB)
    mv = memoryview(buf)
    for p in ([paths] if isinstance(paths, str) else paths):
        files = [p] if os.path.isfile(p) else [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs]
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while True:
                    k = fh.readinto(mv)
                    if not k:
                        break
                    n += k
    return n


def files_under(d: str) -> list[str]:
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs)


# --- the VM's free page reporting -----------------------------------------------------------

PAGE_REPORTING = "/sys/module/page_reporting/parameters"


class PageReportingHold:
    """On request (``--hold-page-reporting``), holds a VM guest's free page reporting off
    while measuring, then restores it; either way records its state.

    With virtio-balloon free page reporting the guest hands the memory it frees (a dropped
    page cache, the pages of an unmounted FUSE file) back to its host, and the next write
    to such a page stalls on the host's page fault. That cost lands on whichever process
    first touches the page: the FUSE daemon copying a reply into new page-cache pages, the
    kernel filling the page cache of a dropped file. On this machine kind it adds between
    0 and 1.7 CPU-s per GB to a plain buffered read of a file after ``drop_caches`` (0.05
    with reporting held off), at random, to every peer alike, and swamps what the runs
    compare; in-process loaders that allocate fresh tensors pay it too. Setting
    ``page_reporting_order`` above the largest buddy order stops reporting; the old value
    comes back on exit (the runner's ``finally`` and SIGTERM handler). It is a property of the machine, not of ctfs or its peers, which are always
    measured under the same setting; by default the machine is measured as it is.

    ``record`` (for results.json) says what was found and done."""

    def __init__(self, enabled: bool = True, params: str = PAGE_REPORTING, orders=(11, 10)):
        self.enabled, self.params, self.orders = enabled, params, orders
        self.record: dict = {"available": False, "held": False}
        self._before: int | None = None

    def _path(self, name: str) -> str:
        return os.path.join(self.params, name)

    def _read(self, name: str) -> int | None:
        from ctfs.mount.mountd import read_sysfs_int
        return read_sysfs_int(self._path(name))

    def _write(self, name: str, value: int) -> bool:
        from ctfs.mount.mountd import write_sysfs
        return write_sysfs(self._path(name), value) is None

    def __enter__(self) -> "PageReportingHold":
        before = self._read("page_reporting_order")
        if before is None:
            return self
        self.record.update(available=True, order_before=before)
        kib = self._read("reported_kib")
        if kib is not None:
            self.record["reported_kib_before"] = kib
        if not self.enabled:
            log(f"free page reporting is on (page_reporting_order {before}): fresh memory costs host "
                "page faults here, figures are noisier (--hold-page-reporting holds it off)")
            return self
        for order in self.orders:
            if self._write("page_reporting_order", order):
                self._before = before
                self.record.update(held=True, held_at=order)
                log(f"free page reporting held off for the run (page_reporting_order {before} -> {order})")
                break
        else:
            log(f"could not hold free page reporting off (page_reporting_order {before}; not root?)")
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        if self._before is None:
            return
        kib = self._read("reported_kib")
        if kib is not None and "reported_kib_before" in self.record:
            self.record["reported_kib_during"] = kib - self.record["reported_kib_before"]
        self.record["restored"] = self._write("page_reporting_order", self._before)
        if self.record["restored"]:
            self._before = None
        else:
            log(f"could not restore page_reporting_order {self._before}")


# --- readers --------------------------------------------------------------------------------

def _timed_reads(path: str, offsets, bs: int) -> tuple[int, float]:
    """pread BS bytes at each offset into one reused buffer: (bytes, seconds)."""
    mv = memoryview(bytearray(bs))
    n = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for off in offsets:
            n += os.preadv(fd, [mv], off)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return n, dt


def seq_read(path: str, bs: int = MiB) -> tuple[int, float]:
    """Sequential read with a reused BS buffer: (bytes, seconds)."""
    return _timed_reads(path, range(0, os.path.getsize(path), bs), bs)


def rand_read(path: str, bs: int = MiB, seed: int = 0) -> tuple[int, float]:
    """Every BS-aligned block of PATH once, in a random order: (bytes, seconds)."""
    offs = list(range(0, os.path.getsize(path), bs))
    random.Random(seed).shuffle(offs)
    return _timed_reads(path, offs, bs)


def vm_hwm(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a live process, in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fmt_bytes(n) -> str:
    if n is None:
        return "–"
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.2f} {unit}" if unit == "GiB" else f"{n / k:.0f} {unit}"
    return f"{n} B"
