"""Unmodified frameworks loading the same model from a local plaintext directory and from a
ctfs mount of its encrypted copy: transformers ``from_pretrained`` and vLLM (CPU build, in
its own venv) engine start-up."""
from __future__ import annotations

import os
import re
import subprocess

from .models import Model
from .mounts import CtfsMount
from .util import REPO, Samples, child_env, drop_caches, fmt_bytes, log, warm

HERE = os.path.dirname(os.path.abspath(__file__))
_WEIGHTS = re.compile(r"Loading weights took ([0-9.]+) seconds")
_MODEL = re.compile(r"Model loading took ([0-9.]+) GiB(?: memory)? and ([0-9.]+) seconds")


def run(ctx, model: Model, enc_dir: str) -> dict:
    out = {"model": model.name, "bytes": model.nbytes, "params": model.n_params}
    mnt = os.path.join(ctx.workdir, "mnt-frameworks")
    mount = CtfsMount(enc_dir, mnt, ctx.key_file)
    try:
        out["transformers"] = _transformers(ctx, model, enc_dir, mount)
        out["vllm"] = _vllm(ctx, model, enc_dir, mount)
    finally:
        mount.unmount()
    return out


def _fresh_mount(mount, enc_dir):
    mount.unmount()
    warm(enc_dir)
    mount.mount()


def _transformers(ctx, model, enc_dir, mount) -> dict:
    t_, peak, dpeak = Samples(), Samples(), Samples()
    names = ["plain", "mount_cold", "mount_warm"]
    if ctx.drop_ok:
        names += ["plain_truly_cold", "mount_truly_cold"]
    just_loaded = False  # the previous step loaded the model through the live mount
    for rep in range(ctx.repeat):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            if name == "plain":
                warm(model.path)
                target = model.path
            elif name == "plain_truly_cold":
                mount.unmount()
                drop_caches()
                target = model.path
            else:
                if name == "mount_cold":
                    _fresh_mount(mount, enc_dir)
                elif name == "mount_truly_cold":
                    mount.unmount()
                    drop_caches()
                    mount.mount()
                elif not just_loaded:  # mount_warm: right after a load through the same mount
                    if not mount.daemon:
                        _fresh_mount(mount, enc_dir)
                    ctx.workers.run("transformers", {"model": mount.mnt}, "tf")
                target = mount.mnt
            r = ctx.workers.run("transformers", {"model": target}, "tf")
            just_loaded = name.startswith("mount")
            t_.add(name, r.data["seconds"])
            peak.add(name, r.peak_rss)
            if name.startswith("mount"):
                dpeak.add(name, mount.peak_rss())
            log(f"transformers {model.name} {name} run {rep + 1}/{ctx.repeat}: {r.data['seconds']:.3f} s, "
                f"peak RSS {fmt_bytes(r.peak_rss)}")
    t, p, d = t_.figures(), peak.figures(), dpeak.figures()
    res = {"what": "AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16) + touch every parameter",
           "variants": {n: {"time_s": t[n], "peak_rss": p[n]} for n in names}}
    for n in d:
        res["variants"][n]["daemon_peak_rss"] = d[n]
    return res


def vllm_python(ctx) -> tuple[str | None, str]:
    if ctx.opts.vllm_python:
        return ctx.opts.vllm_python, "--vllm-python"
    script = os.path.join(REPO, ".ci", "setup_vllm_venv.sh")
    if not os.path.exists(script):
        return None, "no .ci/setup_vllm_venv.sh"
    log("vllm: bash .ci/setup_vllm_venv.sh (idempotent)")
    p = subprocess.run(["bash", script], capture_output=True, text=True, timeout=3600)
    lines = p.stdout.strip().splitlines()
    if p.returncode or not lines or not os.access(lines[-1].strip(), os.X_OK):
        return None, f"setup_vllm_venv.sh failed ({p.returncode}): {p.stderr[-300:]}"
    return lines[-1].strip(), "setup_vllm_venv.sh"


def _vllm(ctx, model, enc_dir, mount) -> dict:
    if not ctx.vllm:
        return {"skipped": "--quick (pass --vllm to include it)" if ctx.opts.quick else "--no-vllm"}
    py, how = vllm_python(ctx)
    if not py:
        return {"skipped": f"no vLLM venv: {how}"}
    samples = {k: Samples() for k in ("total_s", "engine_s", "weights_s", "model_loading_s", "peak_rss")}
    names = ["plain", "mount_cold"]
    env = child_env(pythonpath=False)
    env.pop("OMP_NUM_THREADS", None)
    for rep in range(ctx.repeat):
        for name in (names if rep % 2 == 0 else names[::-1]):
            if name == "plain":
                warm(model.path)
                target = model.path
            else:
                _fresh_mount(mount, enc_dir)
                target = mount.mnt
            r = ctx.workers.command([py, os.path.join(HERE, "vllm_start.py"), "--model", target], env=env,
                                    timeout=900, cwd=ctx.workdir)
            if r.rc != 0 or "engine_s" not in r.data:
                raise RuntimeError(f"vLLM start-up on {target} failed ({r.rc}):\n{r.stderr[-3000:]}")
            text = r.stdout + r.stderr
            w = _WEIGHTS.search(text)
            ml = _MODEL.search(text)
            samples["total_s"].add(name, r.data["total_s"])
            samples["engine_s"].add(name, r.data["engine_s"])
            samples["weights_s"].add(name, float(w.group(1)) if w else None)
            samples["model_loading_s"].add(name, float(ml.group(2)) if ml else None)
            samples["peak_rss"].add(name, r.peak_rss)
            log(f"vllm {model.name} {name} run {rep + 1}/{ctx.repeat}: engine {r.data['engine_s']:.2f} s, "
                f"weights {w.group(1) if w else '?'} s")
    figs = {k: v.figures() for k, v in samples.items()}
    return {"python": py, "what": "LLM(model=dir, enforce_eager, CPU) construction; weights_s is vLLM's "
                                  "'Loading weights took' log figure",
            "variants": {n: {k: figs[k][n] for k in figs} for n in names}}
