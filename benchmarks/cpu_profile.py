"""Where a FUSE daemon's CPU goes on a cold read (``python -m benchmarks --only fs --profile``).
(Not named ``profile``: that would shadow the standard library's module for the scripts
run from this directory, such as ``vllm_start.py``.)

After the interleaved pairs, each filesystem's daemon (ctfs, gocryptfs, ``fuse_floor``) is
sampled with ``perf record -e cpu-clock -g`` during one fresh-mount cold sequential read
and one cold random read of the same file. ``cpu-clock`` is a software clock: on a VM
without hardware counters (this one) it is what stands in for cycles, sampling where the
CPU time goes. Each sample's whole stack puts it in one category (first match below), and
the top functions (self time) are kept. Shares of samples times the daemon's measured CPU
seconds per GB give seconds per GB per category and per function, side by side.
"""
from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import time

from .util import GB, log

#: (category, stack substrings): a sample's category is the first whose substring occurs
#: in one of its frames (symbol or object). Order matters: a reply's copy into the page
#: cache is a memcpy called from the write to /dev/fuse, a ciphertext read's copy is one
#: called from read/preadv.
CATEGORIES = (
    ("decryption", ("aesni", "gcm", "ghash", "aes_", "crypto/aes", "crypto/cipher", "crypto/internal",
                    "gcmAes", "ChaCha", "chacha", "poly1305", "sodium")),
    ("FUSE reply: copy into the page cache", ("fuse_dev_do_write", "fuse_dev_write", "fuse_dev_splice_write")),
    ("FUSE request: receive", ("fuse_dev_do_read", "fuse_dev_read", "fuse_dev_splice_read")),
    ("ciphertext read (page cache -> buffer)", ("filemap_read", "ext4_file_read_iter", "iomap_dio",
                                                "generic_file_read_iter", "vfs_read", "do_preadv")),
    ("page faults", ("asm_exc_page_fault", "handle_mm_fault", "do_anonymous_page", "clear_page")),
    ("scheduling, wakeups, futexes", ("schedule", "finish_task_switch", "futex", "try_to_wake_up",
                                      "runtime.futex", "runtime.mcall", "runtime.park", "runtime.schedule")),
    ("memory copy in the daemon", ("memcpy", "memmove", "memset")),
    ("Python interpreter", ("libpython", "_PyEval", "PyObject")),
    ("Go runtime", ("runtime.",)),
    # a stripped binary (Debian's gocryptfs): its user-space time, crypto included, unsplit
    ("user space without symbols (stripped binary)", ("[unknown]",)),
)
OTHER = "other"


def available() -> str | None:
    """None if perf can sample here, else why not."""
    if shutil.which("perf") is None:
        return "perf is not installed (Debian: linux-perf)"
    p = subprocess.run(["perf", "stat", "-e", "cpu-clock", "true"], capture_output=True, text=True)
    if p.returncode:
        return f"perf cannot sample: {p.stderr.strip()[-200:]}"
    return None


def record(pid: int, out: str, fn):
    """Run ``fn()`` while perf samples PID's threads (cpu-clock, call graphs); fn's result."""
    p = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "1999", "-g", "-p", str(pid),
                          "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # perf attaches to every thread first
    try:
        return fn()
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def samples(data: str):
    """Yield each sample's stack from a perf.data file: a list of (symbol, object) frames,
    innermost first."""
    p = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym,dso"], capture_output=True,
                       text=True, errors="replace")
    stack: list[tuple[str, str]] = []
    for line in p.stdout.splitlines():
        line = line.strip()
        if not line:
            if stack:
                yield stack
            stack = []
            continue
        parts = line.split(None, 1)
        rest = parts[1] if len(parts) > 1 else ""
        obj = rest[rest.rfind("(") + 1:-1] if rest.endswith(")") else ""
        sym = rest[:rest.rfind("(")].strip() if obj else rest
        sym = sym.split("+0x")[0]
        stack.append((sym, os.path.basename(obj)))
    if stack:
        yield stack


def categorise(stack) -> str:
    for name, needles in CATEGORIES:
        for sym, obj in stack:
            if any(n in sym or n in obj for n in needles):
                return name
    return OTHER


def summarise(data: str, cpu_s_per_gb: float, top: int = 15) -> dict:
    cats: collections.Counter = collections.Counter()
    funcs: collections.Counter = collections.Counter()
    n = 0
    for st in samples(data):
        n += 1
        cats[categorise(st)] += 1
        sym, obj = st[0]
        funcs[f"{sym or '?'} [{obj or '?'}]"] += 1
    if not n:
        return {"samples": 0}
    per = cpu_s_per_gb / n
    return {"samples": n, "cpu_s_per_gb": cpu_s_per_gb,
            "categories": {k: {"share": v / n, "cpu_s_per_gb": v * per} for k, v in cats.most_common()},
            "functions": [{"function": k, "share": v / n, "cpu_s_per_gb": v * per}
                          for k, v in funcs.most_common(top)]}


def run(ctx, mounts: dict, backing: dict, path_in, reader_of) -> dict:
    """Profile each mount in MOUNTS ({kind: Mount}) on a cold sequential and a cold random
    read. ``backing[kind]``: files to warm first; ``path_in(mount)``: the file to read;
    ``reader_of(step)``: the reader function of "seq"/"rand"."""
    why = available()
    if why:
        log(f"fs profile: skipped: {why}")
        return {"skipped": why}
    from .util import warm
    out: dict = {"method": "perf record -e cpu-clock -F 1999 -g -p DAEMON during the read; "
                           "categories by the first matching frame of each sample's stack",
                 "steps": {}}
    d = os.path.join(ctx.workdir, "profile")
    os.makedirs(d, exist_ok=True)
    for step in ("seq_cold", "rand_cold"):
        res = out["steps"].setdefault(step, {})
        for kind, m in mounts.items():
            m.unmount()
            warm(backing[kind])
            m.mount()
            data = os.path.join(d, f"{kind}.{step}.data")
            c0 = m.cpu_s()
            n, dt = record(m.daemon.pid, data, lambda: reader_of(step)(path_in(m)))
            cpu = (m.cpu_s() - c0) / (n / GB)
            res[kind] = {"read_gbps": n / dt / GB, **summarise(data, cpu)}
            m.unmount()
            log(f"fs profile {step} {kind}: {n / dt / GB:.2f} GB/s, {cpu:.3f} CPU-s/GB, "
                f"{res[kind].get('samples', 0)} samples")
    return out
