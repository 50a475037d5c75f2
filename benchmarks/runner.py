"""``python -m benchmarks``: what does encryption cost, and how does ctfs compare?"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback

from . import mounts
from .models import GB, QWEN3, Model, make_qwen3, relabel
from .util import REPO, PageReportingHold, Workers, can_drop_caches, child_env, installed, log

SECTIONS = ("serialise", "load", "fs", "frameworks")  # a run without --only
#: object storage: its own server, peers and results directory (``--only s3``)
EXTRA_SECTIONS = ("s3",)
MiB = 1 << 20


def parse_size(text: str) -> int:
    import re
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text}")
    unit = m.group(2).rstrip("b")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
            "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}[unit]
    return int(float(m.group(1)) * mult)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="tiny Qwen3-shaped model, 64 MiB filesystem file, no vLLM (CI; < 2 minutes)")
    ap.add_argument("--sizes", help="comma-separated Qwen3 sizes: " + ", ".join(QWEN3) +
                    " (default 0.6B,1.7B; --quick: tiny)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (min/median reported; default 3)")
    ap.add_argument("--fs-repeat", type=int, help="runs per filesystem figure, i.e. ctfs/gocryptfs pairs "
                    "(default: --repeat, at least 10 unless --quick; those runs are short and the noisiest)")
    ap.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS + EXTRA_SECTIONS)
                    + " (default: all but s3, which has its own results in benchmarks/results/s3)")
    ap.add_argument("--workdir", help="parent of the temporary work directory (default /var/tmp)")
    ap.add_argument("--out", help="results directory (default benchmarks/results; with --quick a new "
                    "temporary directory, so a quick run never overwrites the committed results)")
    ap.add_argument("--fs-size", type=parse_size, help="size of the filesystem test file (default 1GiB; --quick 64MiB)")
    ap.add_argument("--frameworks-size", help="model size for transformers/vLLM (default: the smallest of --sizes)")
    ap.add_argument("--vllm", dest="vllm", action="store_true", default=None, help="include vLLM (default unless --quick)")
    ap.add_argument("--no-vllm", dest="vllm", action="store_false")
    ap.add_argument("--vllm-python", help="python of the vLLM venv (default: from .ci/setup_vllm_venv.sh)")
    ap.add_argument("--fresh-processes", action="store_true",
                    help="a fresh interpreter per torch/transformers measurement (default: forked from a "
                         "pre-imported zygote; same peak-RSS semantics, saves the import seconds)")
    ap.add_argument("--profile", action="store_true",
                    help="fs section: after the pairs, sample each daemon with perf (cpu-clock, call "
                         "graphs) on a cold sequential and a cold random read: CPU by category and by "
                         "function, side by side (benchmarks/cpu_profile.py; needs perf)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--hold-page-reporting", action="store_true",
                    help="as root in a VM with free page reporting: hold it off for the run and restore it "
                         "after, so fresh memory costs no host page faults (see benchmarks/README.md)")
    o = ap.parse_args(argv)
    o.sizes = [s.strip() for s in (o.sizes or ("tiny" if o.quick else "0.6B,1.7B")).split(",") if s.strip()]
    for s in o.sizes:
        if s not in QWEN3:
            ap.error(f"unknown size {s!r} (known: {', '.join(QWEN3)})")
    o.only = [s.strip() for s in (o.only or ",".join(SECTIONS)).split(",") if s.strip()]
    for s in o.only:
        if s not in SECTIONS + EXTRA_SECTIONS:
            ap.error(f"unknown section {s!r} (known: {', '.join(SECTIONS + EXTRA_SECTIONS)})")
    if o.repeat < 1:
        ap.error("--repeat must be >= 1")
    if o.fs_repeat is not None and o.fs_repeat < 1:
        ap.error("--fs-repeat must be >= 1")
    o.fs_repeat = o.fs_repeat or (o.repeat if o.quick else max(10, o.repeat))
    o.fs_size = o.fs_size or (64 * MiB if o.quick else 1 << 30)
    o.frameworks_size = o.frameworks_size or min(o.sizes, key=lambda s: list(QWEN3).index(s))
    if o.frameworks_size not in QWEN3:
        ap.error(f"unknown --frameworks-size {o.frameworks_size!r}")
    if o.out:
        o.out = os.path.abspath(o.out)
    elif not o.quick:  # a run of the object-storage section alone has its own results
        o.out = os.path.join(REPO, "benchmarks", "results", *(["s3"] if o.only == ["s3"] else []))
    return o  # --quick without --out: main() makes a temporary directory


class Context:
    def __init__(self, opts, workdir: str):
        self.opts = opts
        self.workdir = workdir
        self.repeat = opts.repeat
        self.fs_repeat = opts.fs_repeat
        self.python = sys.executable
        self.env = child_env()
        self.drop_ok = can_drop_caches()
        self.vllm = opts.vllm if opts.vllm is not None else not opts.quick
        self.workers = Workers(workdir, fresh=opts.fresh_processes)
        from ctfs.format.keys import KeySet
        ks = KeySet.generate()
        jwks = ks.to_jwks()
        self.key_file = os.path.join(workdir, "keys.jwk")
        with open(os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump(jwks, f)
        self.ref_config = os.path.join(workdir, "reference-config.json")
        keys = jwks["keys"]
        with open(os.open(self.ref_config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump({"enc_key": next(k for k in keys if k["kty"] == "oct"),
                       "sign_key": next(k for k in keys if k["kty"] == "okp")}, f)


def describe_machine(workdir: str, prov: dict) -> dict:
    """The machine beyond the provenance block PROV (whose CPU, flags and versions it repeats)."""
    import psutil
    osname = None
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    osname = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    fstype = None
    try:
        st = os.stat(workdir).st_dev
        for part in psutil.disk_partitions(all=True):
            try:
                if os.stat(part.mountpoint).st_dev == st:
                    fstype = f"{part.fstype} ({part.device} on {part.mountpoint})"
            except OSError:
                pass
    except OSError:
        pass
    return {
        "cpu_model": prov["cpu_model"], "logical_cpus": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
        "aes_ni": prov["cpu_flags"]["aes"], "vaes": prov["cpu_flags"]["vaes"], "cpu_flags": prov["cpu_flags"],
        "ram_bytes": psutil.virtual_memory().total, "kernel": platform.release(), "os": osname,
        "machine": platform.machine(), "hostname": platform.node(), "workdir_fs": fstype,
        "root": os.geteuid() == 0, "drop_caches": can_drop_caches(), "versions": prov["versions"],
        "loadavg_start": list(os.getloadavg()),
    }


def _prepare_load_inputs(ctx, model: Model, f16: Model, base: str) -> dict:
    """Encrypted copies for the load/frameworks sections: the reference's (torch, numpy)
    and ctfs's, written by the libraries themselves (not timed)."""
    out = {"st_np": f16.path, "ref_pt": os.path.join(base, "ref-pt"), "ref_np": os.path.join(base, "ref-np"),
           "ctfs": os.path.join(base, "ctfs-enc")}
    log(f"load {model.name}: writing the reference's encrypted files (torch and numpy)")
    ctx.workers.run("save", {"lib": "ref_enc_pt", "files": model.files(), "out": out["ref_pt"],
                             "ref_config": ctx.ref_config}, "pt")
    ctx.workers.run("save", {"lib": "ref_enc_np", "files": f16.files(), "out": out["ref_np"],
                             "ref_config": ctx.ref_config})
    _ctfs_encrypt(ctx, model, out["ctfs"])
    if installed("tensorizer"):
        log(f"load {model.name}: writing tensorizer's encrypted file")
        os.makedirs(os.path.join(base, "tz-enc"), exist_ok=True)
        out["tz_enc"] = os.path.join(base, "tz-enc", "model.tensors")
        out["tz_key"] = os.path.join(base, "tz-enc", "key")
        ctx.workers.run("tz_save", {"files": model.files(), "out": out["tz_enc"], "key_out": out["tz_key"]}, "pt")
    return out


def _ctfs_encrypt(ctx, model: Model, dst: str) -> None:
    if not os.path.isdir(dst):
        log(f"{model.name}: ctfs encrypt")
        ctx.workers.run("ctfs_encrypt", {"src": model.path, "dst": dst, "key_file": ctx.key_file})


def _section(results: dict, name: str, key: str | None, fn):
    """Run one section; an error is recorded (and logged) instead of ending the run."""
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001
        log(f"{name}{' ' + key if key else ''}: FAILED: {e}")
        value = {"error": traceback.format_exc()[-4000:]}
        results["errors"].append(f"{name}{' ' + key if key else ''}: {e}")
    if key is None:
        results["sections"][name] = value
    else:
        results["sections"].setdefault(name, {})[key] = value


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parse_args(argv)
    if opts.out is None:
        opts.out = tempfile.mkdtemp(prefix="ctfs-bench-quick-")
        log(f"--quick: results go to {opts.out} (not benchmarks/results; --out DIR to choose)")
    from . import provenance
    prov = provenance.collect("benchmarks", argv)
    if prov["dirty"]:
        log("the work tree differs from commit " + str(prov["commit"])[:12] + " (" +
            ", ".join(prov["dirty_paths"][:5]) + "): results.json records it as dirty")
    import signal
    signal.signal(signal.SIGTERM, _sigterm)  # so the finally blocks unmount and clean up
    parent = opts.workdir or "/var/tmp"
    os.makedirs(parent, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="ctfs-bench-", dir=parent)
    t0 = time.time()
    log(f"work directory {workdir}; sections {','.join(opts.only)}; sizes {','.join(opts.sizes)}; "
        f"repeat {opts.repeat} (fs {opts.fs_repeat})")
    results = {"title": "ctfs benchmarks", "provenance": prov, "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "options": {k: v for k, v in vars(opts).items()}, "machine": describe_machine(workdir, prov),
               "sections": {}, "errors": []}
    ctx = None
    hold = PageReportingHold(enabled=opts.hold_page_reporting)
    results["machine"]["page_reporting"] = hold.record
    try:
        hold.__enter__()
        ctx = Context(opts, workdir)
        results["options"]["vllm"] = ctx.vllm
        if not ctx.drop_ok:
            log("cannot write /proc/sys/vm/drop_caches (not root?): truly cold figures are skipped")
        if "fs" in opts.only:
            from . import fs
            log(f"== fs: {opts.fs_size} bytes")
            _section(results, "fs", None, lambda: fs.run(ctx, opts.fs_size))
            shutil.rmtree(os.path.join(workdir, "fs"), ignore_errors=True)
        if "s3" in opts.only:
            from . import s3
            log(f"== s3: {opts.fs_size} bytes")
            _section(results, "s3", None, lambda: s3.run(ctx, opts.fs_size))
            shutil.rmtree(os.path.join(workdir, "s3"), ignore_errors=True)
        for size in opts.sizes:
            need_fw = "frameworks" in opts.only and size == opts.frameworks_size
            if not ({"serialise", "load"} & set(opts.only) or need_fw):
                continue
            _one_size(ctx, results, size, need_fw)
        if "frameworks" in opts.only and opts.frameworks_size not in opts.sizes:
            _one_size(ctx, results, opts.frameworks_size, True, only_frameworks=True)
    finally:
        hold.restore()
        if ctx is not None:
            ctx.workers.close()
        mounts.cleanup_all()
        if opts.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    results["duration_s"] = round(time.time() - t0, 1)
    from . import report
    report.write_all(results, opts.out, vllm_python=ctx and getattr(ctx, "vllm_python", None))
    log(f"done in {results['duration_s']:.0f} s: {opts.out}/results.json, results.md")
    return 1 if results["errors"] else 0


def _one_size(ctx, results, size: str, need_fw: bool, only_frameworks: bool = False) -> None:
    opts = ctx.opts
    base = os.path.join(ctx.workdir, f"qwen3-{size}")
    max_shard = 4 * 10**6 if size == "tiny" else 2 * GB
    log(f"== Qwen3-{size}: generating the synthetic model")
    model = make_qwen3(size, os.path.join(base, "plain"), max_shard_size=max_shard)
    log(f"Qwen3-{size}: {model.n_params / 1e9:.3f} B parameters, {model.nbytes / GB:.2f} GB in "
        f"{len(model.shards)} shard(s)")
    try:
        f16 = None
        if not only_frameworks and {"serialise", "load"} & set(opts.only):
            f16 = Model(name=model.name + "-f16", path=os.path.join(base, "plain-f16"), shards=model.shards,
                        nbytes=model.nbytes, n_params=model.n_params)
            os.makedirs(f16.path, exist_ok=True)
            for s in model.shards:
                relabel(os.path.join(model.path, s), os.path.join(f16.path, s), "F16")
        if not only_frameworks and "serialise" in opts.only:
            from . import serialise
            log(f"== serialise Qwen3-{size}")
            _section(results, "serialise", size, lambda: serialise.run(ctx, model, f16))
        enc = os.path.join(base, "ctfs-enc")
        if not only_frameworks and "load" in opts.only:
            from . import load

            def go():
                inputs = _prepare_load_inputs(ctx, model, f16, base)
                return load.run(ctx, model, inputs)
            log(f"== load Qwen3-{size}")
            _section(results, "load", size, go)
            for d in ("ref-pt", "ref-np", "plain-f16"):
                shutil.rmtree(os.path.join(base, d), ignore_errors=True)
        if need_fw:
            from . import frameworks

            def fw():
                _ctfs_encrypt(ctx, model, enc)
                return frameworks.run(ctx, model, enc)
            log(f"== frameworks Qwen3-{size}")
            _section(results, "frameworks", None, fw)
    finally:
        shutil.rmtree(base, ignore_errors=True)
