"""Filesystem throughput of the same plaintext file: plain ext4 (or whatever holds the
work directory), a ctfs mount of its encrypted copy, and gocryptfs ``-kernel_cache``; plus
``fuse_floor`` (:mod:`benchmarks.fuse_floor`): ctfs's FUSE layer serving the same number of
bytes from memory, without decryption or cache, the CPU floor of a read through it.

Per run and per filesystem:

* ``seq_truly_cold``: unmount, drop every cache (``echo 3 > /proc/sys/vm/drop_caches``),
  mount, read sequentially;
* ``seq_cold``: unmount (the FUSE page cache goes with the mount), re-read the backing
  (encrypted) files so they sit in the host page cache, mount, read sequentially;
* ``seq_warm``: read again at once (FUSE page cache kept);
* ``rand_cold`` / ``rand_warm``: the same two for every 1 MiB block in a random order.

The plain file has no "cold" state distinct from truly cold (its page cache is its only
cache): it gets ``seq_truly_cold``, ``seq_warm``, ``rand_truly_cold``, ``rand_warm``.
Reads use one reused 1 MiB buffer (``readv``/``preadv``). Throughput in GB/s (1e9 B/s).
Daemon CPU: user+system seconds of the daemon process during the read, per GB read; beside
it the daemon's minor page faults per GB (all its threads) and context switches per GB (its
live threads).

**Pairs.** Within a run, each step is taken by ctfs and then at once by gocryptfs (then by
``fuse_floor``), so every ctfs figure has a gocryptfs figure measured seconds after it on the
same machine state; ``pairs`` holds each pair's ratio (ctfs / gocryptfs, for throughput and
for daemon CPU per GB), and the goals are the medians of those per-pair ratios, reported with
their spread (min–max). The plain file is read before or after the FUSE steps, alternately.
"""
from __future__ import annotations

import os
import shutil
import subprocess

from .models import make_blob
from .mounts import CtfsMount, FloorMount, GocryptfsMount
from .util import GB, Samples, drop_caches, fig, files_under, fmt_bytes, log, rand_read, seq_read, warm

NAME = "model.safetensors"


def prepare(ctx, size: int) -> dict:
    d = os.path.join(ctx.workdir, "fs")
    plain_dir, enc_dir = os.path.join(d, "plain"), os.path.join(d, "enc")
    os.makedirs(plain_dir, exist_ok=True)
    log(f"fs: writing a {fmt_bytes(size)} plaintext file")
    nbytes = make_blob(os.path.join(plain_dir, NAME), size)
    log("fs: ctfs encrypt")
    subprocess.run([ctx.python, "-m", "ctfs.cli", "encrypt", plain_dir, enc_dir, "--key-file", ctx.key_file,
                    "--quiet", "--force"], check=True, env=ctx.env)
    out = {"plain": os.path.join(plain_dir, NAME), "enc": enc_dir, "bytes": nbytes,
           "file_bytes": os.path.getsize(os.path.join(plain_dir, NAME))}
    if GocryptfsMount.available():
        log("fs: gocryptfs -init and copy the plaintext in")
        gc = os.path.join(d, "gocryptfs")
        pw = os.path.join(d, "gocryptfs.pass")
        with open(os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write("ctfs-benchmark\n")
        GocryptfsMount.init(gc, pw)
        with GocryptfsMount(gc, os.path.join(d, "mnt-gocryptfs"), pw) as m:
            shutil.copyfile(out["plain"], os.path.join(m.mnt, NAME))
            os.sync()
        out.update(gocryptfs=gc, gocryptfs_pass=pw)
    return out


def run(ctx, size: int) -> dict:
    p = prepare(ctx, size)
    fsd = os.path.join(ctx.workdir, "fs")
    mounts = {"ctfs": CtfsMount(p["enc"], os.path.join(fsd, "mnt-ctfs"), ctx.key_file)}
    backing = {"ctfs": files_under(p["enc"])}
    if "gocryptfs" in p:
        mounts["gocryptfs"] = GocryptfsMount(p["gocryptfs"], os.path.join(fsd, "mnt-gocryptfs"), p["gocryptfs_pass"])
        backing["gocryptfs"] = files_under(p["gocryptfs"])
    mounts["fuse_floor"] = FloorMount(os.path.join(fsd, "mnt-floor"), p["file_bytes"])
    backing["fuse_floor"] = []
    speed, cpu, dpeak = {k: Samples() for k in ("plain", *mounts)}, {k: Samples() for k in mounts}, \
        {k: Samples() for k in mounts}
    flt, csw = {k: Samples() for k in mounts}, {k: Samples() for k in mounts}
    kinds = ["plain", *mounts]
    try:
        for rep in range(ctx.fs_repeat):
            if rep % 2 == 0:
                _plain(ctx, p["plain"], speed["plain"], rep)
            for step in _steps(ctx):
                for kind in mounts:  # ctfs, then gocryptfs right after it, then fuse_floor
                    _fuse_step(ctx, step, mounts[kind], backing[kind], speed[kind], cpu[kind], dpeak[kind],
                               flt[kind], csw[kind])
            for kind in mounts:
                mounts[kind].unmount()
                log(f"fs {kind} run {rep + 1}/{ctx.fs_repeat}: " + _last(speed[kind])
                    + f"; daemon CPU {_last(cpu[kind], 's/GB')}; minor faults {_last(flt[kind], '/GB')}")
            if rep % 2 == 1:
                _plain(ctx, p["plain"], speed["plain"], rep)
        prof = None
        if getattr(ctx.opts, "profile", False):
            from . import cpu_profile as profile
            prof = profile.run(ctx, mounts, backing, lambda m: os.path.join(m.mnt, NAME),
                               lambda step: seq_read if step.startswith("seq") else rand_read)
    finally:
        for m in mounts.values():
            m.unmount()
    out = {"file_bytes": p["file_bytes"], "tensor_bytes": p["bytes"], "unit": "GB/s", "fs": {}}
    if prof is not None:
        out["profile"] = prof
    for kind in kinds:
        e = {"read_gbps": speed[kind].figures()}
        if kind in cpu:
            e["daemon_cpu_s_per_gb"] = cpu[kind].figures()
            e["daemon_peak_rss"] = dpeak[kind].figures()
            e["daemon_minflt_per_gb"] = flt[kind].figures()
            e["daemon_ctxsw_per_gb"] = csw[kind].figures()
        out["fs"][kind] = e
    if "gocryptfs" in mounts:
        out["pairs"] = {"of": "ctfs / gocryptfs, each step of ctfs followed at once by the same step of gocryptfs",
                        "read_gbps": pair_ratios(speed["ctfs"], speed["gocryptfs"]),
                        "daemon_cpu_s_per_gb": pair_ratios(cpu["ctfs"], cpu["gocryptfs"])}
    else:
        out["fs"]["gocryptfs"] = {"skipped": "gocryptfs not installed"}
    return out


def pair_ratios(a: Samples, b: Samples) -> dict:
    """{step: figure of a[i] / b[i]}: the ratio within each pair, with its spread."""
    return {k: fig([x / y if x is not None and y else None for x, y in zip(a[k], b.get(k, []))])
            for k in a if k in b}


def _steps(ctx) -> list[tuple[str, object, str | None]]:
    steps = [("seq_cold", seq_read, "cold"), ("seq_warm", seq_read, None),
             ("rand_cold", rand_read, "cold"), ("rand_warm", rand_read, None)]
    if ctx.drop_ok:
        steps.insert(0, ("seq_truly_cold", seq_read, "truly"))
    return steps


def _plain(ctx, path, sp, rep):
    for mode, reader in (("seq", seq_read), ("rand", rand_read)):
        if ctx.drop_ok:
            drop_caches()
            n, dt = reader(path)
            sp.add(f"{mode}_truly_cold", n / dt / GB)
        else:
            warm(path)
        n, dt = reader(path)
        sp.add(f"{mode}_warm", n / dt / GB)
    log(f"fs plain run {rep + 1}/{ctx.fs_repeat}: " + _last(sp))


def _fuse_step(ctx, step, m, backing, sp, cpu, dpeak, flt, csw) -> None:
    """One step (name, reader, how fresh) on mount M: remount as the step needs, read, record."""
    name, reader, fresh = step
    if fresh == "truly":
        m.unmount()
        drop_caches()
        m.mount()
    elif fresh == "cold":
        m.unmount()
        warm(backing)
        m.mount()
    elif m.daemon is None:
        m.mount()
    c0, k0 = m.cpu_s(), m.counters()
    n, dt = reader(os.path.join(m.mnt, NAME))
    c, k1 = m.cpu_s() - c0, m.counters()
    sp.add(name, n / dt / GB)
    cpu.add(name, c / (n / GB))
    flt.add(name, (k1["minflt"] - k0["minflt"]) / (n / GB))
    csw.add(name, (k1["ctxsw"] - k0["ctxsw"]) / (n / GB))
    dpeak.add(name, m.peak_rss())


def _last(s: Samples, unit: str = "GB/s") -> str:
    return ", ".join(f"{k} {v[-1]:.2f}" for k, v in s.items()) + f" {unit}"
