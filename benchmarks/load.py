"""Deserialisation: every tensor of a model loaded by safetensors from the plaintext, by the
reference library from its encrypted files, by ctfs's in-process API, and by safetensors
through a ctfs mount (cold, truly cold, warm). Time, loader peak RSS, daemon peak RSS."""
from __future__ import annotations

import os

from .models import Model
from .mounts import CtfsMount
from .util import Samples, drop_caches, fig, fmt_bytes, log, warm

LABELS = {
    "st_np": "safetensors numpy load_file, plaintext",
    "ref_np": "reference numpy safe_open(config=...) get_tensor, encrypted",
    "st_pt": "safetensors torch load_file, plaintext",
    "ref_pt": "reference torch safe_open(config=...) get_tensor, encrypted",
    "ctfs_api": "ctfs.api.load_file (in-process, no mount), encrypted",
    "tz_enc": "tensorizer TensorDeserializer, encrypted (libsodium), in process",
    "mount_cold": "safetensors torch load_file on a ctfs mount, cold (fresh mount, backing file cached)",
    "mount_truly_cold": "same, truly cold (all caches dropped)",
    "mount_warm": "same, warm (re-read on the same mount)",
}


def run(ctx, model: Model, inputs: dict) -> dict:
    """INPUTS: st_np/ref_np/ref_pt/ctfs -> directories of prepared files (see runner)."""
    t_, peak, base, dpeak, dcpu = Samples(), Samples(), Samples(), Samples(), Samples()
    mnt = os.path.join(ctx.workdir, "mnt-load")
    enc_dir = inputs["ctfs"]
    mount = CtfsMount(enc_dir, mnt, ctx.key_file)
    shards = model.shards
    files = {
        "st_np": [os.path.join(inputs["st_np"], s) for s in shards],
        "ref_np": [os.path.join(inputs["ref_np"], s) for s in shards],
        "st_pt": model.files(),
        "ref_pt": [os.path.join(inputs["ref_pt"], s) for s in shards],
        "ctfs_api": [os.path.join(enc_dir, s) for s in shards],
    }
    if "tz_enc" in inputs:  # tensorizer installed: its encrypted load is a peer
        files["tz_enc"] = [inputs["tz_enc"]]
    mfiles = [os.path.join(mnt, s) for s in shards]
    names = list(files) + ["mount"]
    try:
        for rep in range(ctx.repeat):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                if name != "mount":
                    warm(files[name])
                    r = ctx.workers.run("load", {"how": name, "files": files[name], "ref_config": ctx.ref_config,
                                                 "key_file": ctx.key_file, "tz_key": inputs.get("tz_key")},
                                        None if name.endswith("np") else "pt")
                    _record(t_, peak, base, name, r)
                    log(f"load {model.name} {name} run {rep + 1}/{ctx.repeat}: {r.data['seconds']:.3f} s, "
                        f"peak RSS {fmt_bytes(r.peak_rss)}")
                    continue
                modes = ["mount_cold", "mount_warm"] + (["mount_truly_cold"] if ctx.drop_ok else [])
                for mode in modes:
                    if mode == "mount_cold":
                        mount.unmount()
                        warm(files["ctfs_api"])  # backing (encrypted) files cached; mount page cache empty
                        mount.mount()
                    elif mode == "mount_truly_cold":
                        mount.unmount()
                        drop_caches()
                        mount.mount()
                    c0 = mount.cpu_s()
                    r = ctx.workers.run("load", {"how": "st_pt", "files": mfiles}, "pt")
                    _record(t_, peak, base, mode, r)
                    dcpu.add(mode, mount.cpu_s() - c0)
                    dpeak.add(mode, mount.peak_rss())
                    log(f"load {model.name} {mode} run {rep + 1}/{ctx.repeat}: {r.data['seconds']:.3f} s, "
                        f"peak RSS {fmt_bytes(r.peak_rss)}, daemon {fmt_bytes(mount.peak_rss())}")
    finally:
        mount.unmount()
    t, p, b, dp, dc = (x.figures() for x in (t_, peak, base, dpeak, dcpu))
    out = {}
    for n in LABELS:
        if n not in t:
            continue
        out[n] = {"label": LABELS[n], "time_s": t[n], "peak_rss": p[n], "base_rss": b[n]}
        if n in dp:
            out[n]["daemon_peak_rss"] = dp[n]
            out[n]["daemon_cpu_s"] = dc[n]
    res = {"model": model.name, "bytes": model.nbytes, "params": model.n_params, "shards": len(shards),
           "variants": out}
    if "tz_enc" in t_:
        # each run has one tensorizer load and one fresh-mount load: their ratio, per run
        res["pairs"] = {"of": "tensorizer encrypted load time / ctfs fresh-mount (cold) load time, same run",
                        "tz_enc_over_mount_cold": fig([a / b for a, b in zip(t_["tz_enc"], t_["mount_cold"])])}
    else:
        res["tz_enc"] = {"skipped": "tensorizer not installed (pip install tensorizer)"}
    return res


def _record(t_, peak, base, name, r) -> None:
    t_.add(name, r.data["seconds"])
    peak.add(name, r.peak_rss)
    base.add(name, r.data.get("base_rss"))
