"""Serialisation: the same tensors saved by safetensors, by the reference library (plain
and encrypted) and encrypted by ``ctfs encrypt``; time and peak RSS of each run."""
from __future__ import annotations

import os
import shutil

from .models import Model
from .util import Samples, fmt_bytes, log, warm

# name -> (worker task, lib, zygote kind, label)
VARIANTS = {
    "st_np": ("save", "st_np", None, "safetensors numpy save_file"),
    "ref_np": ("save", "ref_np", None, "reference numpy save_file, unencrypted"),
    "ref_enc_np": ("save", "ref_enc_np", None, "reference numpy save_file, encrypted"),
    "st_pt": ("save", "st_pt", "pt", "safetensors torch save_file"),
    "ref_pt": ("save", "ref_pt", "pt", "reference torch save_file, unencrypted"),
    "ref_enc_pt": ("save", "ref_enc_pt", "pt", "reference torch save_file (serialize_file), encrypted"),
    "ctfs_encrypt": ("ctfs_encrypt", None, None, "ctfs encrypt (file to file, streamed)"),
}


def run(ctx, model: Model, f16: Model) -> dict:
    s_time, s_peak, s_base = Samples(), Samples(), Samples()
    names = list(VARIANTS)
    out = os.path.join(ctx.workdir, "serialise-out")
    for rep in range(ctx.repeat):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate: no fixed position bias
        for name in order:
            task, lib, kind, _ = VARIANTS[name]
            shutil.rmtree(out, ignore_errors=True)
            src = f16 if name.endswith("np") else model
            warm(src.files())  # inputs in the page cache right before the run
            if task == "save":
                args = {"lib": lib, "files": src.files(), "out": out, "ref_config": ctx.ref_config}
            else:
                args = {"src": model.path, "dst": out, "key_file": ctx.key_file}
            r = ctx.workers.run(task, args, kind)
            s_time.add(name, r.data["seconds"])
            s_peak.add(name, r.peak_rss)
            s_base.add(name, r.data.get("base_rss"))
            shutil.rmtree(out, ignore_errors=True)
            log(f"serialise {model.name} {name} run {rep + 1}/{ctx.repeat}: {r.data['seconds']:.3f} s, "
                f"peak RSS {fmt_bytes(r.peak_rss)}")
    t, p, b = s_time.figures(), s_peak.figures(), s_base.figures()
    return {"model": model.name, "bytes": model.nbytes, "params": model.n_params, "shards": len(model.shards),
            "variants": {n: {"label": VARIANTS[n][3], "time_s": t[n], "peak_rss": p[n], "base_rss": b[n]}
                         for n in names}}
