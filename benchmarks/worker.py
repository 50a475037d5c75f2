"""Measurements, each in its own process.

``python -m benchmarks.worker --serve KIND`` is a zygote (see :func:`serve`) that forks one
child per measurement; ``python -m benchmarks.worker TASK JSON`` runs one task directly.
Imports happen before the clock starts; the timed part is only the operation. A task
returns ``seconds`` (timed part) and ``base_rss`` (resident set size right before the timed
part: interpreter, libraries and, for serialisation, the tensors themselves). The peak RSS
comes from wait4's rusage of the child.
"""
from __future__ import annotations

import json
import os
import sys
import time

PAGE = 4096


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def touch_pt(t) -> int:
    """Read one byte of every 4 KiB page of a tensor (forces mmap-backed data in)."""
    import torch
    if t.numel() == 0:
        return 0
    b = t.reshape(-1).view(torch.uint8)
    return int(b[::PAGE].sum())


def touch_np(a) -> int:
    import numpy as np
    if a.size == 0:
        return 0
    return int(a.reshape(-1).view(np.uint8)[::PAGE].sum())


def _ref_config(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# --- serialisation ----------------------------------------------------------------------

def task_save(a: dict) -> dict:
    """Save every shard of a model with one library; tensors are materialised first
    (numpy variants read the F16-labelled copy: numpy has no bfloat16, same bytes)."""
    lib = a["lib"]
    if lib.endswith("np"):
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file
    config = _ref_config(a["ref_config"]) if lib.startswith("ref_enc") else None
    if lib == "st_np":
        from safetensors.numpy import save_file
    elif lib == "st_pt":
        from safetensors.torch import save_file
    elif lib in ("ref_np", "ref_enc_np"):
        from cryptotensors.numpy import save_file
    elif lib in ("ref_pt", "ref_enc_pt"):
        from cryptotensors.torch import save_file
    else:
        raise SystemExit(f"unknown lib {lib}")
    total, base = 0.0, 0
    os.makedirs(a["out"], exist_ok=True)
    for f in a["files"]:
        tensors = {k: v.copy() if lib.endswith("np") else v.clone() for k, v in load_file(f).items()}
        base = max(base, rss())
        out = os.path.join(a["out"], os.path.basename(f))
        kw = {"config": config} if config else {}
        t0 = time.perf_counter()
        save_file(tensors, out, metadata={"format": "pt"}, **kw)
        total += time.perf_counter() - t0
        del tensors
    return {"seconds": total, "base_rss": base}


def task_tz_save(a: dict) -> dict:
    """Every tensor of every shard into one encrypted tensorizer file (``a["out"]``), with a
    random key written to ``a["key_out"]`` (0600)."""
    from safetensors.torch import load_file
    from tensorizer import EncryptionParams, TensorSerializer
    tensors = {}
    for f in a["files"]:
        tensors.update(load_file(f))
    enc = EncryptionParams.random()
    base = rss()
    t0 = time.perf_counter()
    s = TensorSerializer(a["out"], encryption=enc)
    s.write_state_dict(tensors)
    s.close()
    dt = time.perf_counter() - t0
    with open(os.open(a["key_out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as kf:
        kf.write(enc.key)
    return {"seconds": dt, "base_rss": base}


def task_ctfs_encrypt(a: dict) -> dict:
    """``ctfs encrypt SRC DST`` through the real CLI entry point, in this process."""
    from ctfs import cli
    base = rss()
    t0 = time.perf_counter()
    rc = cli.main(["encrypt", a["src"], a["dst"], "--key-file", a["key_file"], "--quiet", "--force"])
    dt = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"ctfs encrypt failed: {rc}")
    return {"seconds": dt, "base_rss": base}


# --- deserialisation --------------------------------------------------------------------

def task_load(a: dict) -> dict:
    """Load every tensor of every file (kept until the end, like a model load) and touch
    every page of each, so lazily mapped loaders really read the data."""
    how = a["how"]
    files = a["files"]
    state = {}
    if how == "st_pt":
        from safetensors.torch import load_file

        def one(f):
            return load_file(f)
        touch = touch_pt
    elif how == "st_np":
        from safetensors.numpy import load_file

        def one(f):
            return load_file(f)
        touch = touch_np
    elif how in ("ref_np", "ref_pt"):
        import cryptotensors
        config = _ref_config(a["ref_config"])
        fw = how[-2:]
        if fw == "pt":
            import torch  # noqa: F401

        def one(f):
            with cryptotensors.safe_open(f, fw, config=config) as h:
                return {k: h.get_tensor(k) for k in h.keys()}
        touch = touch_pt if fw == "pt" else touch_np
    elif how == "tz_enc":
        # CoreWeave tensorizer's encrypted format, decrypted in process (libsodium):
        # every tensor materialised on the CPU, as its own loader does for a model.
        import torch  # noqa: F401
        from tensorizer import DecryptionParams, TensorDeserializer
        with open(a["tz_key"], "rb") as kf:
            key = kf.read()

        def one(f):
            d = TensorDeserializer(f, device="cpu", encryption=DecryptionParams.from_key(key))
            try:
                return {k: d[k] for k in d.keys()}
            finally:
                d.close()
        touch = touch_pt
    elif how == "ctfs_api":
        import torch  # noqa: F401
        import ctfs.api
        from ctfs.format.keys import KeySet
        keys = KeySet.load(a["key_file"])

        def one(f):
            return ctfs.api.load_file(f, "pt", keys=keys)
        touch = touch_pt
    else:
        raise SystemExit(f"unknown loader {how}")
    base = rss()
    t0 = time.perf_counter()
    chk = 0
    for f in files:
        d = one(f)
        for v in d.values():
            chk += touch(v)
        state.update(d)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "base_rss": base, "tensors": len(state), "check": chk}


def task_transformers(a: dict) -> dict:
    """``AutoModelForCausalLM.from_pretrained(DIR)`` (bf16), then touch every parameter."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    base = rss()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.bfloat16)
    t1 = time.perf_counter()
    chk = sum(touch_pt(p.data) for p in model.parameters())
    t2 = time.perf_counter()
    return {"seconds": t2 - t0, "from_pretrained_s": t1 - t0, "base_rss": base, "check": chk}


def task_cmd(a: dict) -> dict:
    """Run a command (e.g. the vLLM venv's python); output captured, last JSON line parsed."""
    import subprocess
    t0 = time.perf_counter()
    try:
        p = subprocess.run(a["cmd"], capture_output=True, text=True, env=a.get("env"), cwd=a.get("cwd"),
                           timeout=a.get("timeout"))
        rc, so, se = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, so, se = 124, str(e.stdout or ""), str(e.stderr or "") + "\ntimed out"
    dt = time.perf_counter() - t0
    js = None
    for line in reversed(so.strip().splitlines()):
        if line.startswith("{"):
            try:
                js = json.loads(line)
                break
            except ValueError:
                pass
    return {"seconds": dt, "rc": rc, "stdout": so[-20000:], "stderr": se[-20000:], "json": js}


TASKS = {"cmd": task_cmd, "save": task_save, "tz_save": task_tz_save, "ctfs_encrypt": task_ctfs_encrypt,
         "load": task_load,
         "transformers": task_transformers}

# What a zygote imports before forking measurement children (see serve()).
PRELOAD = {
    "bare": [],
    "pt": ["torch", "numpy", "safetensors.torch", "safetensors.numpy", "cryptotensors",
           "cryptotensors.torch", "ctfs.api", "ctfs.keys"],
    "tf": ["torch", "safetensors.torch", "transformers", "transformers.models.qwen3.modeling_qwen3"],
}


def serve(kind: str) -> int:
    """Zygote: import KIND's libraries once, then fork one child per request.

    Requests are JSON lines on stdin ({"task", "args"}); each answer is one JSON line on
    stdout: the child's result, its peak RSS (wait4 rusage of the child, which starts at the
    zygote's resident size, like a fresh interpreter that did the same imports) and CPU."""
    import importlib
    import traceback
    for m in PRELOAD[kind]:
        importlib.import_module(m)
    if kind == "tf":
        import transformers
        transformers.logging.set_verbosity_error()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints of libraries must not corrupt the protocol
    out.write(json.dumps({"ready": True, "rss": rss()}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the measurement
            os.close(r)
            try:
                res = {"ok": True, "data": TASKS[req["task"]](req["args"])}
            except BaseException:  # noqa: BLE001
                res = {"ok": False, "error": traceback.format_exc()[-4000:]}
            data = json.dumps(res).encode()
            while data:
                data = data[os.write(w, data):]
            os._exit(0)  # skip freeing gigabytes of tensors
        os.close(w)
        chunks = []
        while True:
            b = os.read(r, 1 << 16)
            if not b:
                break
            chunks.append(b)
        os.close(r)
        _, status, ru = os.wait4(pid, 0)
        try:
            res = json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            res = {}
        if not res:
            res = {"ok": False, "error": f"child died (status {status})"}
        res.update(peak_rss=ru.ru_maxrss * 1024, cpu_s=ru.ru_utime + ru.ru_stime)
        out.write(json.dumps(res) + "\n")
        out.flush()
    return 0


def main() -> int:
    if sys.argv[1] == "--serve":
        return serve(sys.argv[2])
    task, args = sys.argv[1], json.loads(sys.argv[2])
    out = TASKS[task](args)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip freeing gigabytes of tensors


if __name__ == "__main__":
    sys.exit(main())
