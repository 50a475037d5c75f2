"""Daemon memory bound: RSS stays <= cache size + 150 MiB while a model twice the cache size
is read end to end through the mount (both kernel modes).

    python -m benchmarks.memory_bound [--cache-size 256MiB] [--out DIR]

Prints the figures and writes memory_bound.json into --out (default benchmarks/results): the
provenance block (commit, command, CPU, kernel, versions; ``benchmarks.provenance``) and one
row per mode.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

HEADROOM = 150 << 20


def _write_plain(path: str, nbytes: int) -> None:
    """A plain safetensors file of random bytes written in 64 MiB pieces (little memory)."""
    n_tensors = max(1, nbytes // (64 << 20))
    per = nbytes // n_tensors
    header, off = {}, 0
    for i in range(n_tensors):
        header[f"t{i:03d}"] = {"dtype": "U8", "shape": [per], "data_offsets": [off, off + per]}
        off += per
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _ in range(n_tensors):
            f.write(rng.integers(0, 256, per, dtype=np.uint8).tobytes())


def _daemon(mnt: str) -> psutil.Process:
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "mount" in cmd and mnt in cmd:
            return p
    raise LookupError(mnt)


def measure(work: str, cache: int, extra: list[str]) -> dict:
    ctfs = [sys.executable, "-m", "ctfs.cli"]
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    subprocess.run([*ctfs, "mount", os.path.join(work, "enc"), mnt, "--key-file",
                    os.path.join(work, "k.jwk"), "--cache-size", str(cache), *extra], check=True)
    try:
        daemon = _daemon(mnt)
        start = daemon.memory_info().rss
        peak, stop = [start], threading.Event()

        def poll():
            while not stop.is_set():
                peak[0] = max(peak[0], daemon.memory_info().rss)
                time.sleep(0.01)
        t = threading.Thread(target=poll, daemon=True)
        t.start()
        total = 0
        t0 = time.perf_counter()
        for _ in range(2):
            with open(os.path.join(mnt, "model.safetensors"), "rb", buffering=0) as f:
                while chunk := f.read(4 << 20):
                    total += len(chunk)
        secs = time.perf_counter() - t0
        stop.set()
        t.join()
        return {"mode": "direct_io" if extra else "page cache", "cache_bytes": cache,
                "rss_start": start, "rss_peak": peak[0], "bound": cache + HEADROOM,
                "within_bound": peak[0] <= cache + HEADROOM, "bytes_read": total,
                "gbps": total / secs / 1e9}
    finally:
        subprocess.run([*ctfs, "umount", mnt], capture_output=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-size", default="256MiB")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    from benchmarks import provenance
    prov = provenance.collect("benchmarks.memory_bound", argv)
    from ctfs.units import parse_size
    from ctfs.format.keys import KeySet
    from ctfs.format.writer import encrypt_file
    cache = parse_size(args.cache_size)
    work = tempfile.mkdtemp(prefix="ctfs-membound-", dir="/var/tmp")
    try:
        print(f"[memory] writing a {2 * cache >> 20} MiB model", file=sys.stderr)
        _write_plain(os.path.join(work, "plain.safetensors"), 2 * cache)
        keys = KeySet.generate()
        with open(os.open(os.path.join(work, "k.jwk"), os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            json.dump(keys.to_jwks(), f)
        os.mkdir(os.path.join(work, "enc"))
        encrypt_file(os.path.join(work, "plain.safetensors"), os.path.join(work, "enc", "model.safetensors"), keys)
        os.unlink(os.path.join(work, "plain.safetensors"))
        rows = [measure(work, cache, []), measure(work, cache, ["--direct-io"])]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "memory_bound.json"), "w") as f:
        json.dump({"provenance": prov, "rows": rows}, f, indent=2)
    for r in rows:
        print(f"{r['mode']:>10}: cache {r['cache_bytes'] >> 20} MiB, model read twice "
              f"({r['bytes_read'] >> 20} MiB), daemon RSS start {r['rss_start'] >> 20} MiB, peak "
              f"{r['rss_peak'] >> 20} MiB, bound {r['bound'] >> 20} MiB: "
              f"{'PASS' if r['within_bound'] else 'FAIL'} ({r['gbps']:.2f} GB/s)")
    return 0 if all(r["within_bound"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
