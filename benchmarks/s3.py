"""Reading a model straight from S3-compatible object storage: ctfs and its peers against
one SeaweedFS server, the same file, in one run (``python -m benchmarks --only s3``).

Methods (every one reads the same 1 GiB safetensors file, or its encrypted copy, start to
end with 1 MiB reads from a fresh mount or a fresh process):

* ``ctfs_s3``: ``ctfs mount s3://...`` without a cache dir (fresh mount per run);
* ``ctfs_s3_cached``: the same with a cache dir filled once by ``ctfs prefetch``;
* ``ctfs_local``: ``ctfs mount`` of the encrypted directory on local disk (its ciphertext
  in the page cache: the "cold" of the fs section), the reference for the cached figure;
* ``rclone_crypt``: rclone ``crypt`` remote over the same S3 + ``rclone mount``;
* ``s3fs``: s3fs-fuse over the plaintext object (decrypts nothing);
* ``runai_c4`` / ``runai_c8``: Run:ai model streamer in a fresh process, concurrency 4 / 8,
  every tensor materialised (plaintext);
* ``raw_gets``: 8 ranged GETs of 8 MiB in flight into memory (obstore,
  ``benchmarks.s3_clients raw``): the ceiling;
* ``tensorizer_enc``: CoreWeave tensorizer's encrypted load of the same tensors (its own
  file, encrypted with a random key, uploaded beside), through its own S3 reader, in a fresh
  process, every tensor materialised; where tensorizer is installed (skipped otherwise).

**Transformers load** (loopback only): ``AutoModelForCausalLM.from_pretrained`` (bf16, every
parameter touched) of a synthetic Qwen3 model (0.6B; ``--quick``: tiny) in a fresh
process, from ``ctfs_s3`` and ``ctfs_s3_cached`` mounts, ``rclone_crypt`` and ``s3fs``
mounts of the same model, and the plaintext directory on local disk (page cache warm: the
ceiling), interleaved, ``--repeat`` runs.

Profiles: ``loopback`` (straight to the server) and ``wan`` (every method through
:class:`benchmarks.netproxy.NetProxy` with a time to first byte of 20 ms per request and
100 MB/s per connection). Methods run interleaved (each run: every method once, in turn),
so ratios are per run; the goals are medians of per-run ratios with their spread.

CPU: for mounts the daemon's user+system seconds per GB read (the reader's copy is not
counted); for in-process loaders the whole process's; the server's CPU beside each.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import psutil

from .models import make_blob, make_qwen3
from .mounts import CtfsMount, Mount, cleanup_all
from .netproxy import NetProxy
from .seaweed import KEY_ID, REGION, SECRET, SeaweedFS
from .util import GB, Samples, child_env, fig, fmt_bytes, installed, log, seq_read

NAME = "model.safetensors"
BUCKET = "bench"
WAN = {"ttfb": 0.020, "rate": 100e6}


def s3_mount(url, mnt, key_file, endpoint, extra=()) -> CtfsMount:
    """``ctfs mount s3://...`` through ENDPOINT, with the server's credentials."""
    return CtfsMount(url, mnt, key_file, ["--s3-endpoint", endpoint, *extra], env=_env())


class ProcMount(Mount):
    """A FUSE daemon run in the foreground as a child (rclone, s3fs)."""

    def __init__(self, mnt, cmd, env, kind):
        super().__init__(mnt, mnt)
        self.cmd, self.env, self.kind = cmd, env, kind
        self._proc = None

    def _mount(self):
        self._proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        from .mounts import is_mounted
        while not is_mounted(self.mnt):
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited ({self._proc.returncode}): {self._proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)

    def _unmount(self):
        subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True, timeout=60)
        if self._proc is not None:
            try:
                self._proc.wait(20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc.stderr.close()
            self._proc = None

    def mount(self):
        super().mount()
        self.daemon = psutil.Process(self._proc.pid)
        return self


def _env(extra=None) -> dict:
    env = {k: v for k, v in child_env().items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_REGION=REGION,
               AWS_EC2_METADATA_DISABLED="true")
    env.update(extra or {})
    return env


RUNAI = """
import sys, time, resource
from runai_model_streamer import SafetensorsStreamer
n = 0
t = time.perf_counter()
with SafetensorsStreamer() as s:
    s.stream_file(sys.argv[1])
    for name, tensor in s.get_tensors():
        n += tensor.numel() * tensor.element_size()
        tensor.sum()  # materialised
dt = time.perf_counter() - t
r = resource.getrusage(resource.RUSAGE_SELF)
print(n, dt, r.ru_utime + r.ru_stime)
"""

TENSORIZER = """
import os, sys, time, resource
from tensorizer import DecryptionParams, TensorDeserializer
from tensorizer.stream_io import open_stream
with open(sys.argv[2], "rb") as f:
    key = f.read()
n = 0
t = time.perf_counter()
with open_stream(sys.argv[1], "rb", s3_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
                 s3_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"], s3_endpoint=sys.argv[3],
                 force_http=True) as f:  # the benchmark server speaks plain HTTP
    d = TensorDeserializer(f, device="cpu", encryption=DecryptionParams.from_key(key))
    for name, tensor in d.items():
        n += tensor.numel() * tensor.element_size()
        tensor.sum()  # materialised
    d.close()
dt = time.perf_counter() - t
r = resource.getrusage(resource.RUSAGE_SELF)
print(n, dt, r.ru_utime + r.ru_stime)
"""



def prepare(ctx, size: int) -> dict:
    d = os.path.join(ctx.workdir, "s3")
    plain_dir, enc_dir = os.path.join(d, "plain"), os.path.join(d, "enc")
    os.makedirs(plain_dir, exist_ok=True)
    log(f"s3: writing a {fmt_bytes(size)} plaintext file and its ctfs copy")
    nbytes = make_blob(os.path.join(plain_dir, NAME), size)
    subprocess.run([sys.executable, "-m", "ctfs.cli", "encrypt", plain_dir, enc_dir, "--key-file",
                    ctx.key_file, "--quiet", "--force"], check=True, env=ctx.env)
    log("s3: starting SeaweedFS and uploading (plaintext, ctfs, rclone crypt)")
    server = SeaweedFS(os.path.join(d, "seaweed")).start()
    server.bucket(BUCKET)
    server.upload_dir(plain_dir, BUCKET, "plain")
    server.upload_dir(enc_dir, BUCKET, "ctfs")
    out = {"dir": d, "server": server, "plain": os.path.join(plain_dir, NAME), "enc": enc_dir,
           "bytes": nbytes, "file_bytes": os.path.getsize(os.path.join(plain_dir, NAME))}
    size_name = "tiny" if ctx.opts.quick else "0.6B"
    log(f"s3: a synthetic Qwen3-{size_name} for the transformers load, plain and ctfs, uploaded")
    model = make_qwen3(size_name, os.path.join(d, "qwen-plain"))
    subprocess.run([sys.executable, "-m", "ctfs.cli", "encrypt", model.path, os.path.join(d, "qwen-ctfs"),
                    "--key-file", ctx.key_file, "--quiet", "--force"], check=True, env=ctx.env)
    server.upload_dir(model.path, BUCKET, "qwen-plain")
    server.upload_dir(os.path.join(d, "qwen-ctfs"), BUCKET, "qwen-ctfs")
    out.update(model=model, model_size=size_name, model_cache_dir=os.path.join(d, "cache-dir-qwen"))
    if shutil.which("rclone"):
        conf = os.path.join(d, "rclone.conf")
        ob = lambda s: subprocess.run(["rclone", "obscure", s], capture_output=True, text=True,
                                      check=True).stdout.strip()
        with open(os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(f"[sw]\ntype = s3\nprovider = Other\naccess_key_id = {KEY_ID}\n"
                    f"secret_access_key = {SECRET}\nendpoint = {server.endpoint}\nregion = {REGION}\n"
                    f"force_path_style = true\n\n[crypt]\ntype = crypt\nremote = sw:{BUCKET}/rclone\n"
                    f"filename_encryption = off\ndirectory_name_encryption = false\n"
                    f"password = {ob('ctfs-bench-1')}\npassword2 = {ob('ctfs-bench-2')}\n")
        for src, dst in ((out["plain"], "crypt:"), (model.path, "crypt:qwen")):
            subprocess.run(["rclone", "--config", conf, "copy", src, dst,
                            "--s3-upload-concurrency", "4", "--s3-chunk-size", "64M"],
                           check=True, env=_rclone_env(), capture_output=True, timeout=900)
        out["rclone_conf"] = conf
    if installed("tensorizer"):
        log("s3: tensorizer's encrypted copy, uploaded")
        tz = os.path.join(d, "tz")
        os.makedirs(tz, exist_ok=True)
        ctx.workers.run("tz_save", {"files": [out["plain"]], "out": os.path.join(tz, "model.tensors"),
                                    "key_out": os.path.join(d, "tz.key")}, "pt")
        server.upload_dir(tz, BUCKET, "tz")
        out["tz_key"] = os.path.join(d, "tz.key")
    out["cache_dir"] = os.path.join(d, "cache-dir")
    log("s3: ctfs prefetch into the cache dir (for the warm-cache figure)")
    for prefix, cd in (("ctfs", out["cache_dir"]), ("qwen-ctfs", out["model_cache_dir"])):
        subprocess.run([sys.executable, "-m", "ctfs.cli", "prefetch", f"s3://{BUCKET}/{prefix}", "--cache-dir",
                        cd, "--s3-endpoint", server.endpoint], check=True, env=_env(),
                       capture_output=True, timeout=900)
    return out


def loads(ctx, p) -> dict:
    """Transformers loads of the same model through each method, interleaved (loopback)."""
    from .util import warm
    d, endpoint = p["dir"], p["server"].endpoint
    model = p["model"]
    mounts = {
        "ctfs_s3": s3_mount(f"s3://{BUCKET}/qwen-ctfs", os.path.join(d, "mnt-q-ctfs"), ctx.key_file, endpoint),
        "ctfs_s3_cached": s3_mount(f"s3://{BUCKET}/qwen-ctfs", os.path.join(d, "mnt-q-ctfs-c"), ctx.key_file,
                                      endpoint, ["--cache-dir", p["model_cache_dir"]]),
    }
    if "rclone_conf" in p:
        mnt = os.path.join(d, "mnt-q-rclone")
        mounts["rclone_crypt"] = ProcMount(mnt, ["rclone", "--config", p["rclone_conf"], "mount", "crypt:qwen", mnt,
                                                 "--read-only", "--vfs-cache-mode", "off"], _rclone_env(), "rclone")
    if shutil.which("s3fs"):
        mnt = os.path.join(d, "mnt-q-s3fs")
        mounts["s3fs"] = ProcMount(mnt, ["s3fs", f"{BUCKET}:/qwen-plain", mnt, "-f", "-o",
                                         f"url={endpoint},use_path_request_style,"
                                         f"passwd_file={os.path.join(d, 's3fs.passwd')},ro"], _env(), "s3fs")
    secs = Samples()
    for rep in range(ctx.repeat):
        for name in ["plain_local", *mounts]:
            if name == "plain_local":
                warm(model.path)
                r = ctx.workers.run("transformers", {"model": model.path}, "tf")
            else:
                m = mounts[name]
                m.mount()
                try:
                    r = ctx.workers.run("transformers", {"model": m.mnt}, "tf")
                finally:
                    m.unmount()
            secs.add(name, r.data["seconds"])
        log(f"s3 transformers Qwen3-{p['model_size']} run {rep + 1}/{ctx.repeat}: "
            + ", ".join(f"{k} {v[-1]:.2f}" for k, v in secs.items()) + " s")
    ratios = {f"{a} / {b}": fig([x / y for x, y in zip(secs[a], secs[b])])
              for a, b in (("ctfs_s3", "plain_local"), ("ctfs_s3_cached", "plain_local"),
                           ("rclone_crypt", "ctfs_s3"), ("s3fs", "ctfs_s3")) if a in secs and b in secs}
    return {"model": f"Qwen3-{p['model_size']}", "bytes": model.nbytes, "runs": ctx.repeat,
            "what": "AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16) + touch every parameter, "
                    "fresh process, fresh mount",
            "time_s": secs.figures(), "ratios": ratios}


def _rclone_env() -> dict:
    env = _env()
    env.pop("AWS_CA_BUNDLE", None)  # rclone 1.60 fails to start while it is set
    for k in [k for k in env if k.startswith("AWS_")]:
        env.pop(k)
    return env


def _rclone_conf_for(p, endpoint) -> str:
    text = open(p["rclone_conf"]).read().replace(p["server"].endpoint, endpoint)
    path = p["rclone_conf"] + ".run"
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
    return path


def methods(ctx, p, endpoint) -> dict:
    """name -> callable() -> (bytes, seconds, client CPU-s)."""
    d = p["dir"]
    size = p["file_bytes"]
    out = {}

    def via_mount(m):
        def run():
            m.mount()
            try:
                time.sleep(0.2)
                c0 = m.cpu_s()
                n, dt = seq_read(os.path.join(m.mnt, NAME))
                return n, dt, m.cpu_s() - c0
            finally:
                m.unmount()
        return run

    out["ctfs_s3"] = via_mount(s3_mount(f"s3://{BUCKET}/ctfs", os.path.join(d, "mnt-ctfs"),
                                           ctx.key_file, endpoint))
    out["ctfs_s3_cached"] = via_mount(s3_mount(f"s3://{BUCKET}/ctfs", os.path.join(d, "mnt-ctfs-c"),
                                                  ctx.key_file, endpoint, ["--cache-dir", p["cache_dir"]]))
    local = CtfsMount(p["enc"], os.path.join(d, "mnt-local"), ctx.key_file)

    def local_run():
        from .util import files_under, warm
        warm(files_under(p["enc"]))
        return via_mount(local)()
    out["ctfs_local"] = local_run
    if "rclone_conf" in p:
        conf = _rclone_conf_for(p, endpoint)
        mnt = os.path.join(d, "mnt-rclone")
        out["rclone_crypt"] = via_mount(ProcMount(mnt, ["rclone", "--config", conf, "mount", "crypt:", mnt,
                                                        "--read-only", "--vfs-cache-mode", "off"],
                                                  _rclone_env(), "rclone"))
    if shutil.which("s3fs"):
        pw = os.path.join(d, "s3fs.passwd")
        with open(os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(f"{KEY_ID}:{SECRET}\n")
        mnt = os.path.join(d, "mnt-s3fs")
        m = ProcMount(mnt, ["s3fs", f"{BUCKET}:/plain", mnt, "-f", "-o",
                            f"url={endpoint},use_path_request_style,passwd_file={pw},ro"],
                      _env(), "s3fs")
        out["s3fs"] = via_mount(m)

    def proc(code, args, env):
        def run():
            cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "benchmarks.s3_clients", "raw"]
            r = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=900)
            if r.returncode:
                raise RuntimeError(r.stderr[-2000:])
            n, dt, cpu = r.stdout.split()[-3:]
            return int(n), float(dt), float(cpu)
        return run
    if installed("runai_model_streamer"):
        for c in (4, 8):
            out[f"runai_c{c}"] = proc(RUNAI, [f"s3://{BUCKET}/plain/{NAME}"],
                                      _env({"AWS_ENDPOINT_URL": endpoint,
                                            "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
                                            "RUNAI_STREAMER_CONCURRENCY": str(c)}))
    if "tz_key" in p:  # encrypted in-process peer: tensorizer's own S3 reader + libsodium
        out["tensorizer_enc"] = proc(TENSORIZER, [f"s3://{BUCKET}/tz/model.tensors", p["tz_key"], endpoint], _env())
    out["raw_gets"] = proc(None, [endpoint, BUCKET, f"plain/{NAME}", str(size)], _env())
    return out


def run(ctx, size: int) -> dict:
    p = prepare(ctx, size)
    server = p["server"]
    result = {"file_bytes": p["file_bytes"], "unit": "GB/s", "profiles": {},
              "skipped": {}, "server": "SeaweedFS " + _weed_version()}
    if not installed("tensorizer"):
        result["skipped"]["tensorizer"] = "tensorizer is not installed here (pip install tensorizer; Debian libsodium23)"
    if not installed("runai_model_streamer"):
        result["skipped"]["runai"] = "runai-model-streamer is not installed"
    try:
        for profile in ("loopback", "wan"):
            proxy = NetProxy(server.port, **WAN) if profile == "wan" else None
            endpoint = proxy.endpoint if proxy else server.endpoint
            ms = methods(ctx, p, endpoint)
            speed, cpu, srv = Samples(), Samples(), Samples()
            reps = ctx.fs_repeat if profile == "loopback" else max(3, ctx.fs_repeat // 2)
            try:
                for rep in range(reps):
                    for name, fn in ms.items():
                        s0 = server.cpu_seconds()
                        try:
                            n, dt, c = fn()
                        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                            log(f"s3 {profile} {name}: FAILED: {e}")
                            result.setdefault("errors", []).append(f"{profile} {name}: {str(e)[-300:]}")
                            speed.add(name, None)
                            cpu.add(name, None)
                            srv.add(name, None)
                            continue
                        speed.add(name, n / dt / GB)
                        cpu.add(name, c / (n / GB))
                        srv.add(name, (server.cpu_seconds() - s0) / (n / GB))
                    log(f"s3 {profile} run {rep + 1}/{reps}: " +
                        ", ".join(f"{k} {v[-1]:.2f}" if v[-1] is not None else f"{k} -"
                                  for k, v in speed.items()) + " GB/s")
            finally:
                if proxy is not None:
                    proxy.close()
            result["profiles"][profile] = {
                "read_gbps": speed.figures(), "client_cpu_s_per_gb": cpu.figures(),
                "server_cpu_s_per_gb": srv.figures(), "runs": reps,
                "network": WAN if profile == "wan" else "loopback, server and client share the CPUs",
                "pairs": _pairs(speed)}
        log("s3: transformers loads (loopback)")
        result["transformers"] = loads(ctx, p)
        result["server_peak_rss"] = server.rss()
    finally:
        cleanup_all()
        server.stop()
    return result


def _pairs(speed: Samples) -> dict:
    """Per-run ratios of ctfs against each peer (and the cached mount against local ctfs)."""
    def ratio(a, b):
        xs = speed.get(a, [])
        ys = speed.get(b, [])
        return fig([x / y if x is not None and y else None for x, y in zip(xs, ys)])
    out = {}
    for peer in ("rclone_crypt", "s3fs", "raw_gets", "runai_c4", "runai_c8", "tensorizer_enc"):
        if peer in speed:
            out[f"ctfs_s3 / {peer}"] = ratio("ctfs_s3", peer)
    if "runai_c4" in speed and "runai_c8" in speed:
        best = [max((x or 0), (y or 0)) or None for x, y in zip(speed["runai_c4"], speed["runai_c8"])]
        out["ctfs_s3 / runai_best"] = fig([x / y if x is not None and y else None
                                           for x, y in zip(speed["ctfs_s3"], best)])
    out["ctfs_s3_cached / ctfs_local"] = ratio("ctfs_s3_cached", "ctfs_local")
    return out


def _weed_version() -> str:
    from .seaweed import weed_binary
    try:
        return subprocess.run([weed_binary(), "version"], capture_output=True, text=True,
                              timeout=30).stdout.split("\n")[0].strip()
    except Exception:  # noqa: BLE001
        return "?"


def summary(result: dict) -> str:
    lines = []
    for profile, r in result.get("profiles", {}).items():
        lines.append(f"{profile}: " + ", ".join(
            f"{k} {v['median']:.2f}" for k, v in r["read_gbps"].items() if v["median"] is not None))
        lines.append("  ratios: " + ", ".join(
            f"{k} {v['median']:.2f}x ({v['min']:.2f}-{v['max']:.2f})" for k, v in r["pairs"].items()
            if v["median"] is not None))
    return "\n".join(lines)


if __name__ == "__main__":  # a quick look: python -m benchmarks.s3 SIZE_MIB
    print(json.dumps({"see": "python -m benchmarks --only s3"}))
