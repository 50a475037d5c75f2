"""results.json, results.md, PNG plots, and the goal ratios printed at the end."""
from __future__ import annotations

import json
import os
import sys

from .util import GB, fmt_bytes

# The paper's own figures (CryptoTensors, arXiv 2512.04580), measured on the authors' machine.
PAPER = {
    "ser_plain": "+2.5–10 %",
    "ser_enc_np": 61.3, "ser_enc_pt": 62.0,
    "deser_np": 125.5, "deser_pt": 5808.9,
    "mem_np": 52.2, "mem_pt": 187.6,
    "vllm_load_s": {"0.6B": 0.34, "1.7B": 0.594, "4B": 1.104, "8B": 1.806, "14B": 3.165, "32B": 7.668},
    "transformers_load_s": 1.16,
}


def med(f):
    return f.get("median") if isinstance(f, dict) else None


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def _pct(a, b):
    r = _ratio(a, b)
    return None if r is None else (r - 1) * 100


def _fmt_pct(x):
    return "–" if x is None else f"{x:+.1f} %"


def _fmt_s(f):
    if not isinstance(f, dict) or f.get("median") is None:
        return "–"
    return f"{f['median']:.3f} ({f['min']:.3f})"


def _in_mib(g) -> bool:
    """A goal whose value is a size in MiB (not a ratio)."""
    return "(MiB" in g["goal"]


def _fmt_x(x):
    return "–" if x is None else f"{x:.2f}×"


def _ok(x, op, target):
    if x is None:
        return None
    return x >= target if op == ">=" else x <= target


# --- goals and paper comparisons ------------------------------------------------------------

def goals(results: dict) -> list[dict]:
    S = results.get("sections", {})
    out = []

    def add(what, value, op, target, detail=""):
        out.append({"goal": what, "value": value, "op": op, "target": target,
                    "pass": _ok(value, op, target), "detail": detail})

    fs = S.get("fs", {}).get("fs", {})
    pairs = S.get("fs", {}).get("pairs", {})
    c, g = fs.get("ctfs", {}), fs.get("gocryptfs", {})
    if c and "read_gbps" in g:
        floor = med(fs.get("fuse_floor", {}).get("daemon_cpu_s_per_gb", {}).get("seq_cold"))
        # targets of issue 18: they must hold on a CPU whose AES-GCM runs at ~3.5 GB/s per core
        # (AES-NI + PCLMUL, no AVX-512 VAES path), not only on one that decrypts at 17 GB/s
        rows = [("read_gbps", "seq_cold", "fs cold read: ctfs / gocryptfs", ">=", 1.6, "GB/s", 2),
                ("read_gbps", "seq_truly_cold", "fs truly cold read: ctfs / gocryptfs", ">=", 1.5, "GB/s", 2),
                ("read_gbps", "seq_warm", "fs warm read: ctfs / gocryptfs", ">=", 0.95, "GB/s", 2),
                ("read_gbps", "rand_cold", "fs random 1 MiB reads, cold: ctfs / gocryptfs", ">=", 1.2, "GB/s", 2),
                ("daemon_cpu_s_per_gb", "seq_cold", "daemon CPU per GB (cold read): ctfs / gocryptfs", "<=",
                 0.75, "CPU-s/GB", 3),
                ("daemon_cpu_s_per_gb", "seq_truly_cold", "daemon CPU per GB (truly cold read): ctfs / gocryptfs",
                 "<=", 0.75, "CPU-s/GB", 3)]
        for metric, mode, label, op, target, unit, nd in rows:
            a, b = med(c[metric].get(mode)), med(g[metric].get(mode))
            if a is None and b is None:
                continue
            pr = pairs.get(metric, {}).get(mode)
            detail = f"medians {a and round(a, nd)} vs {b and round(b, nd)} {unit}"
            if pr and pr.get("median") is not None:
                value = pr["median"]
                detail = (f"median of {len(pr['runs'])} pairs, per pair {pr['min']:.2f}–{pr['max']:.2f}×; "
                          + detail)
            else:
                value = _ratio(a, b)
            if metric == "daemon_cpu_s_per_gb" and mode == "seq_cold" and floor is not None:
                detail += f"; FUSE layer alone (no decryption): {round(floor, 3)} = {_fmt_x(_ratio(floor, b))}"
            add(label, value, op, target, detail)
    for size, sec in S.get("load", {}).items():
        v = sec.get("variants", {})
        ref = med(v.get("ref_pt", {}).get("time_s"))
        for name, label in (("mount_cold", "ctfs mount (cold)"), ("ctfs_api", "ctfs.api")):
            t = med(v.get(name, {}).get("time_s"))
            add(f"load {sec.get('model', size)}: speed-up of {label} over the reference's encrypted torch load",
                _ratio(ref, t), ">=", 5.0, f"{t and round(t, 3)} s vs {ref and round(ref, 3)} s")
        tz = sec.get("pairs", {}).get("tz_enc_over_mount_cold")
        if tz and tz.get("min") is not None:
            a, b = med(v.get("mount_cold", {}).get("time_s")), med(v.get("tz_enc", {}).get("time_s"))
            add(f"load {sec.get('model', size)}: speed-up of a fresh ctfs mount over tensorizer's encrypted load, "
                "worst run", tz["min"], ">=", 1.5,
                f"per run {tz['min']:.2f}–{tz['max']:.2f}×, median {tz['median']:.2f}×; medians "
                f"{a and round(a, 3)} s vs {b and round(b, 3)} s")
    tf = S.get("frameworks", {}).get("transformers", {}).get("variants", {})
    if tf:
        a, b = med(tf.get("mount_cold", {}).get("time_s")), med(tf.get("plain", {}).get("time_s"))
        add(f"transformers {S['frameworks'].get('model')}: mount (cold) / local plaintext (cached)", _ratio(a, b),
            "<=", 1.3, f"{a and round(a, 3)} s vs {b and round(b, 3)} s")
        a, b = med(tf.get("mount_truly_cold", {}).get("time_s")), med(tf.get("plain_truly_cold", {}).get("time_s"))
        if a is not None and b is not None:
            add(f"transformers {S['frameworks'].get('model')}: mount / local plaintext, both truly cold", _ratio(a, b),
                "<=", 1.15, f"{round(a, 3)} s vs {round(b, 3)} s")
    s3 = S.get("s3", {}).get("profiles", {})
    s3_rows = [("loopback", "ctfs_s3 / rclone_crypt", ">=", 2.5), ("loopback", "ctfs_s3 / s3fs", ">=", 1.2),
               ("loopback", "ctfs_s3 / runai_best", ">=", 0.9),
               ("loopback", "ctfs_s3_cached / ctfs_local", ">=", 0.9),
               ("wan", "ctfs_s3 / raw_gets", ">=", 0.8), ("wan", "ctfs_s3 / rclone_crypt", ">=", 3.0)]
    for profile, key, op, target in s3_rows:
        pr = s3.get(profile, {}).get("pairs", {}).get(key)
        if not pr:
            continue
        sp = s3[profile]["read_gbps"]
        a, b = key.split(" / ")
        detail = (f"median of {len(pr['runs'])} interleaved runs, per run "
                  f"{pr['min'] if pr['min'] is None else round(pr['min'], 2)}–"
                  f"{pr['max'] if pr['max'] is None else round(pr['max'], 2)}×"
                  + (f"; medians {_r(med(sp.get(a)))} vs {_r(med(sp.get(b)))} GB/s" if b in sp else ""))
        add(f"s3 {profile}: {key}", pr["median"], op, target, detail)
    peaks = [(size, med(sec.get("variants", {}).get("ctfs_encrypt", {}).get("peak_rss")))
             for size, sec in S.get("serialise", {}).items()]
    peaks = [(s, p) for s, p in peaks if p is not None]
    if peaks:
        worst = max(p for _, p in peaks)
        add("ctfs encrypt peak RSS (MiB, worst size)", worst / (1 << 20), "<=", 512.0,
            ", ".join(f"{s}: {fmt_bytes(p)}" for s, p in peaks))
    return out


def paper_comparison(results: dict) -> list[dict]:
    S = results.get("sections", {})
    rows = []
    for size, sec in S.get("serialise", {}).items():
        v = sec.get("variants", {})
        t = {k: med(x.get("time_s")) for k, x in v.items()}
        rows += [
            {"what": f"serialisation {size}: reference unencrypted vs safetensors (numpy)",
             "ours_pct": _pct(t.get("ref_np"), t.get("st_np")), "paper": PAPER["ser_plain"]},
            {"what": f"serialisation {size}: reference unencrypted vs safetensors (torch)",
             "ours_pct": _pct(t.get("ref_pt"), t.get("st_pt")), "paper": PAPER["ser_plain"]},
            {"what": f"serialisation {size}: reference encrypted vs safetensors (numpy)",
             "ours_pct": _pct(t.get("ref_enc_np"), t.get("st_np")), "paper": PAPER["ser_enc_np"]},
            {"what": f"serialisation {size}: reference encrypted vs safetensors (torch)",
             "ours_pct": _pct(t.get("ref_enc_pt"), t.get("st_pt")), "paper": PAPER["ser_enc_pt"]},
            {"what": f"serialisation {size}: ctfs encrypt vs safetensors (torch)",
             "ours_pct": _pct(t.get("ctfs_encrypt"), t.get("st_pt")), "paper": None},
        ]
    for size, sec in S.get("load", {}).items():
        v = sec.get("variants", {})
        t = {k: med(x.get("time_s")) for k, x in v.items()}
        m = {k: med(x.get("peak_rss")) for k, x in v.items()}
        rows += [
            {"what": f"deserialisation {size}: reference encrypted vs safetensors (numpy), time",
             "ours_pct": _pct(t.get("ref_np"), t.get("st_np")), "paper": PAPER["deser_np"]},
            {"what": f"deserialisation {size}: reference encrypted vs safetensors (torch), time",
             "ours_pct": _pct(t.get("ref_pt"), t.get("st_pt")), "paper": PAPER["deser_pt"]},
            {"what": f"deserialisation {size}: reference encrypted vs safetensors (numpy), peak RSS",
             "ours_pct": _pct(m.get("ref_np"), m.get("st_np")), "paper": PAPER["mem_np"]},
            {"what": f"deserialisation {size}: reference encrypted vs safetensors (torch), peak RSS",
             "ours_pct": _pct(m.get("ref_pt"), m.get("st_pt")), "paper": PAPER["mem_pt"]},
            {"what": f"deserialisation {size}: ctfs mount (cold) vs safetensors (torch), time",
             "ours_pct": _pct(t.get("mount_cold"), t.get("st_pt")), "paper": None},
            {"what": f"deserialisation {size}: ctfs.api vs safetensors (torch), time",
             "ours_pct": _pct(t.get("ctfs_api"), t.get("st_pt")), "paper": None},
        ]
    return rows


# --- markdown -------------------------------------------------------------------------------

def _paper_cell(p):
    if p is None:
        return "–"
    return p if isinstance(p, str) else f"{p:+.1f} %"


def _page_reporting(pr) -> str:
    """One sentence on the VM's free page reporting during the run (benchmarks.util.PageReportingHold)."""
    if not pr or not pr.get("available"):
        return "No free page reporting (not a VM with virtio-balloon reporting)."
    if pr.get("held"):
        during = pr.get("reported_kib_during")
        return (f"Free page reporting held off for the run (page_reporting_order {pr.get('order_before')} → "
                f"{pr.get('held_at')}{'' if during is None else f', {during} KiB reported meanwhile'}"
                f"{'' if pr.get('restored') else '; NOT restored'}).")
    return (f"Free page reporting on (page_reporting_order {pr.get('order_before')}): fresh memory "
            "costs host page faults, so figures are noisier (`--hold-page-reporting` holds it off).")


def _r(x, nd=2):
    return None if x is None else round(x, nd)


def _s3_table(sec) -> list[str]:
    L = ["## Object storage (S3, SeaweedFS on this host)", "",
         f"One {fmt_bytes(sec.get('file_bytes'))} file read start to end (1 MiB reads) by every "
         f"method in turn, per run; server {sec.get('server')}. CPU: the daemon's (mounts) or the "
         f"process's (in-process loaders) CPU-seconds per GB, and the server's.", ""]
    for profile, r in sec.get("profiles", {}).items():
        L += [f"### {profile} ({r.get('network')}), {r.get('runs')} runs", "",
              "| method | GB/s median (min–max) | client CPU-s/GB | server CPU-s/GB |", "|---|---|---|---|"]
        for name, f in r["read_gbps"].items():
            c, sv = r["client_cpu_s_per_gb"].get(name, {}), r["server_cpu_s_per_gb"].get(name, {})
            gb = "–" if f.get("median") is None else f"{f['median']:.2f} ({f['min']:.2f}–{f['max']:.2f})"
            L.append(f"| {name} | {gb} | {_r(c.get('median'))} | {_r(sv.get('median'))} |")
        L += ["", "| ratio (per run) | median (min–max) |", "|---|---|"]
        for k, f in r.get("pairs", {}).items():
            L.append(f"| {k} | {_fmt_spread(f)} |")
        L.append("")
    tf = sec.get("transformers")
    if tf:
        L += [f"### transformers load of {tf['model']} ({fmt_bytes(tf.get('bytes'))}), loopback, "
              f"{tf.get('runs')} runs", "", f"{tf.get('what')}.", "",
              "| method | seconds median (min–max) |", "|---|---|"]
        for name, f in tf["time_s"].items():
            L.append(f"| {name} | " + ("–" if f.get("median") is None else
                                       f"{f['median']:.2f} ({f['min']:.2f}–{f['max']:.2f})") + " |")
        L += ["", "| ratio of times (per run) | median (min–max) |", "|---|---|"]
        for k, f in tf.get("ratios", {}).items():
            L.append(f"| {k} | {_fmt_spread(f)} |")
        L.append("")
    for k, why in sec.get("skipped", {}).items():
        L.append(f"* {k}: skipped: {why}")
    for e in sec.get("errors", []):
        L.append(f"* error: {e}")
    return L + [""]


def markdown(results: dict) -> str:
    M = results["machine"]
    S = results["sections"]
    from .provenance import markdown as provenance_md
    L = ["# ctfs benchmarks", "",
         f"Run {results['started']} → {results.get('finished')} ({results.get('duration_s')} s), "
         f"`python -m benchmarks {_argline(results['options'])}`.", "",
         *provenance_md(results["provenance"]),
         "## Machine", "",
         f"{M.get('cpu_model')}, {M.get('logical_cpus')} logical CPUs (AES-NI {M.get('aes_ni')}, VAES "
         f"{M.get('vaes')}), {fmt_bytes(M.get('ram_bytes'))} RAM, {M.get('os')}, kernel {M.get('kernel')}, "
         f"work directory on {M.get('workdir_fs')}. Load average at start {_la(M.get('loadavg_start'))}, "
         f"at end {_la(M.get('loadavg_end'))}. {_page_reporting(M.get('page_reporting'))}", "",
         "Versions: " + ", ".join(f"{k} {v}" for k, v in M.get("versions", {}).items() if v) + ".", "",
         "Figures are **median (min)** of the runs; times in seconds, throughput in GB/s (1e9 B/s). "
         "The *paper* column holds the CryptoTensors paper's own figures (their machine), for "
         "orientation only.", ""]
    G = results.get("goals", [])
    if G:
        L += ["## Goals", "", "| goal | measured | target | result | detail |", "|---|---|---|---|---|"]
        for g in G:
            val = "–" if g["value"] is None else (f"{g['value']:.0f}" if _in_mib(g) else _fmt_x(g["value"]))
            tgt = f"{g['op']} {g['target']:g}" + ("" if _in_mib(g) else "×")
            res = "n/a" if g["pass"] is None else ("PASS" if g["pass"] else "FAIL")
            L.append(f"| {g['goal']} | {val} | {tgt} | **{res}** | {g['detail']} |")
        L.append("")
    if "serialise" in S:
        L += ["## Serialisation", "",
              "Same tensors (materialised in memory first; `ctfs encrypt` streams file to file), one "
              "fresh process per run. Peak RSS includes the tensors themselves (base RSS column: "
              "resident size right before the timed call).", ""]
        for size, sec in S["serialise"].items():
            L += _err(sec) or _ser_table(size, sec)
    if "load" in S:
        L += ["## Deserialisation (load every tensor)", "",
              "Every tensor of every shard loaded and kept (like a model load), one byte per 4 KiB page "
              "touched (safetensors maps files lazily). safetensors torch `load_file` maps the file: on a "
              "cached plaintext it maps page-cache pages without copying, so it is a lower bound no "
              "decrypting loader can approach; safetensors numpy `load_file` copies. numpy variants read "
              "an F16-labelled copy (numpy has no bfloat16; same bytes).", ""]
        for size, sec in S["load"].items():
            L += _err(sec) or _load_table(size, sec)
    if "fs" in S:
        L += _err(S["fs"]) or _fs_table(S["fs"])
    if "frameworks" in S:
        L += _err(S["frameworks"]) or _fw_table(S["frameworks"])
    if "s3" in S:
        L += _err(S["s3"]) or _s3_table(S["s3"])
    P = results.get("paper_comparison", [])
    if P:
        L += ["## Overheads next to the paper's", "", "| comparison | ours | paper |", "|---|---|---|"]
        for r in P:
            L.append(f"| {r['what']} | {_fmt_pct(r['ours_pct'])} | {_paper_cell(r['paper'])} |")
        L.append("")
    if results.get("errors"):
        L += ["## Errors", ""] + [f"* {e}" for e in results["errors"]] + [""]
    if results.get("plots"):
        L += ["## Plots", ""] + [f"![{p}]({p})" for p in results["plots"] if p.endswith(".png")] + [""]
    return "\n".join(L) + "\n"


def _la(x):
    return "–" if not x else " / ".join(f"{v:.2f}" for v in x)


def _argline(o):
    parts = []
    if o.get("quick"):
        parts.append("--quick")
    parts.append("--sizes " + ",".join(o.get("sizes", [])))
    parts.append(f"--repeat {o.get('repeat')}")
    if o.get("fs_repeat") and o.get("fs_repeat") != o.get("repeat"):
        parts.append(f"--fs-repeat {o.get('fs_repeat')}")
    parts.append("--only " + ",".join(o.get("only", [])))
    if o.get("hold_page_reporting"):
        parts.append("--hold-page-reporting")
    return " ".join(parts)


def _err(sec):
    if isinstance(sec, dict) and "error" in sec:
        return ["```", sec["error"].strip()[-1500:], "```", ""]
    return None


def _ser_table(size, sec):
    v = sec["variants"]
    L = [f"### {sec['model']} ({sec['params'] / 1e9:.2f} B parameters, {sec['bytes'] / GB:.2f} GB, "
         f"{sec['shards']} shard(s))", "",
         "| variant | time s | peak RSS | base RSS | vs safetensors (same framework) | paper |",
         "|---|---|---|---|---|---|"]
    paper = {"ref_np": PAPER["ser_plain"], "ref_pt": PAPER["ser_plain"], "ref_enc_np": PAPER["ser_enc_np"],
             "ref_enc_pt": PAPER["ser_enc_pt"]}
    for n, x in v.items():
        base = "st_np" if n.endswith("np") else "st_pt"
        vs = "baseline" if n == base else _fmt_pct(_pct(med(x["time_s"]), med(v[base]["time_s"])))
        L.append(f"| {x['label']} | {_fmt_s(x['time_s'])} | {fmt_bytes(med(x['peak_rss']))} | "
                 f"{fmt_bytes(med(x['base_rss']))} | {vs} | {_paper_cell(paper.get(n))} |")
    return L + [""]


def _load_table(size, sec):
    v = sec["variants"]
    L = [f"### {sec['model']} ({sec['bytes'] / GB:.2f} GB, {sec['shards']} shard(s))", "",
         "| variant | time s | GB/s | peak RSS | daemon peak RSS | vs safetensors (same framework) | paper time | paper memory |",
         "|---|---|---|---|---|---|---|---|"]
    paper = {"ref_np": (PAPER["deser_np"], PAPER["mem_np"]), "ref_pt": (PAPER["deser_pt"], PAPER["mem_pt"])}
    for n, x in v.items():
        base = "st_np" if n.endswith("np") else "st_pt"
        t = med(x["time_s"])
        vs = "baseline" if n == base else _fmt_pct(_pct(t, med(v.get(base, {}).get("time_s"))))
        gbps = f"{sec['bytes'] / GB / t:.2f}" if t else "–"
        pt, pm = paper.get(n, (None, None))
        L.append(f"| {x['label']} | {_fmt_s(x['time_s'])} | {gbps} | {fmt_bytes(med(x['peak_rss']))} | "
                 f"{fmt_bytes(med(x.get('daemon_peak_rss')))} | {vs} | {_paper_cell(pt)} | {_paper_cell(pm)} |")
    return L + [""]


SHORT = {
    "st_np": "safetensors np", "ref_np": "reference np, unencrypted", "ref_enc_np": "reference np, encrypted",
    "st_pt": "safetensors pt", "ref_pt": "reference pt, unencrypted", "ref_enc_pt": "reference pt, encrypted",
    "ctfs_encrypt": "ctfs encrypt", "ctfs_api": "ctfs.api (no mount)", "mount_cold": "ctfs mount, cold",
    "tz_enc": "tensorizer, encrypted",
    "mount_truly_cold": "ctfs mount, truly cold", "mount_warm": "ctfs mount, warm",
}
LOAD_SHORT = {**SHORT, "ref_np": "reference np, encrypted", "ref_pt": "reference pt, encrypted"}

FS_MODES = ("seq_truly_cold", "seq_cold", "seq_warm", "rand_truly_cold", "rand_cold", "rand_warm")


def _fs_table(sec):
    F = sec["fs"]
    L = ["## Filesystem throughput", "",
         f"One {sec['file_bytes'] / GB:.2f} GB file, read with a reused 1 MiB buffer; GB/s, median (min). "
         "*cold*: fresh mount, backing file in the host page cache; *truly cold*: all caches dropped; "
         "*warm*: immediate re-read. Daemon CPU: user+system CPU seconds of the daemon per GB read "
         "(cold sequential read), with its minor page faults and context switches per GB.", "",
         "| filesystem | " + " | ".join(m.replace("_", " ") for m in FS_MODES)
         + " | daemon CPU s/GB | minor faults /GB | context switches /GB | daemon peak RSS |",
         "|---" * (len(FS_MODES) + 5) + "|"]
    for kind, e in F.items():
        if "skipped" in e:
            L.append(f"| {kind} | " + " | ".join("–" for _ in FS_MODES) + f" | – | – | – | {e['skipped']} |")
            continue
        r = e["read_gbps"]
        cells = [(f"{r[m]['median']:.2f} ({r[m]['min']:.2f})" if m in r and r[m]["median"] is not None else "–")
                 for m in FS_MODES]
        cpu = e.get("daemon_cpu_s_per_gb", {}).get("seq_cold")
        flt, csw = (med(e.get(k, {}).get("seq_cold")) for k in ("daemon_minflt_per_gb", "daemon_ctxsw_per_gb"))
        L.append(f"| {kind} | " + " | ".join(cells) + f" | {_fmt_s(cpu) if cpu else '–'} | "
                 f"{'–' if flt is None else f'{flt:,.0f}'} | {'–' if csw is None else f'{csw:,.0f}'} | "
                 f"{fmt_bytes(med(e.get('daemon_peak_rss', {}).get('seq_cold')))} |")
    if "fuse_floor" in F:
        L += ["", "*fuse_floor*: ctfs's FUSE layer serving the same bytes from memory (no decryption, "
              "no cache, no source file; `benchmarks/fuse_floor.py`): what a read through a Python "
              "libfuse3 daemon costs before any cryptography."]
    P = sec.get("pairs")
    if P:
        L += ["", "Per-pair ratios, ctfs / gocryptfs (each ctfs step followed at once by the same gocryptfs "
              "step): median (min–max) over the pairs.", "",
              "| step | pairs | throughput | daemon CPU per GB |", "|---|---|---|---|"]
        for m in FS_MODES:
            r, c = P["read_gbps"].get(m), P["daemon_cpu_s_per_gb"].get(m)
            if r and r.get("median") is not None:
                L.append(f"| {m.replace('_', ' ')} | {len(r['runs'])} | {_fmt_spread(r)} | {_fmt_spread(c)} |")
    prof = sec.get("profile")
    if prof:
        L += [""] + _profile_tables(prof)
    return L + [""]


def _profile_tables(prof) -> list[str]:
    if "skipped" in prof:
        return [f"Profile: skipped ({prof['skipped']})."]
    L = ["### Where the daemons' CPU goes (profile)", "",
         f"One more fresh-mount read per filesystem after the pairs, sampled with {prof['method']}. "
         "CPU-seconds per GB read, by category, then the functions with the most self time.", ""]
    for step, kinds in prof.get("steps", {}).items():
        ks = [k for k, v in kinds.items() if v.get("samples")]
        if not ks:
            continue
        cats: list[str] = []
        for k in ks:
            cats += [c for c in kinds[k]["categories"] if c not in cats]
        L += [f"**{step.replace('_', ' ')}** (" + ", ".join(
                  f"{k} {kinds[k]['read_gbps']:.2f} GB/s" for k in ks) + ")", "",
              "| category | " + " | ".join(f"{k} CPU-s/GB" for k in ks) + " |",
              "|---" * (len(ks) + 1) + "|"]
        for c in cats:
            L.append(f"| {c} | " + " | ".join(
                f"{kinds[k]['categories'].get(c, {}).get('cpu_s_per_gb', 0):.3f}" for k in ks) + " |")
        L.append("| **total** | " + " | ".join(f"**{kinds[k]['cpu_s_per_gb']:.3f}**" for k in ks) + " |")
        L += [""]
        for k in ks:
            L += [f"{k}, top functions: " + "; ".join(
                f"`{f['function']}` {100 * f['share']:.1f} %" for f in kinds[k]["functions"][:8]), ""]
    return L


def _fmt_spread(f) -> str:
    if not isinstance(f, dict) or f.get("median") is None:
        return "–"
    return f"{f['median']:.2f}× ({f['min']:.2f}–{f['max']:.2f})"


def _fw_table(sec):
    L = [f"## Frameworks ({sec['model']}, {sec['bytes'] / GB:.2f} GB)", ""]
    tf = sec.get("transformers", {})
    if "variants" in tf:
        v = tf["variants"]
        base = med(v["plain"]["time_s"])
        base_tc = med(v.get("plain_truly_cold", {}).get("time_s"))
        L += [f"transformers: {tf['what']}.", "",
              "| source | time s | vs local plaintext (same cache state) | peak RSS | daemon peak RSS | paper |", "|---|---|---|---|---|---|"]
        for n, x in v.items():
            L.append(f"| {n.replace('_', ' ')} | {_fmt_s(x['time_s'])} | "
                     f"{'baseline' if n.startswith('plain') else _fmt_x(_ratio(med(x['time_s']), base_tc if n.endswith('truly_cold') else base))} | "
                     f"{fmt_bytes(med(x['peak_rss']))} | {fmt_bytes(med(x.get('daemon_peak_rss')))} | "
                     f"{str(PAPER['transformers_load_s']) + ' s (their GPU machine)' if n == 'plain' else '–'} |")
        L.append("")
    vl = sec.get("vllm", {})
    if "variants" in vl:
        v = vl["variants"]
        size = sec["model"].split("-")[-1]
        L += [f"vLLM (CPU build): {vl['what']}.", "",
              "| source | engine start-up s | weights loading s | total s (incl. import) | peak RSS | paper (weights, GPU) |",
              "|---|---|---|---|---|---|"]
        for n, x in v.items():
            p = PAPER["vllm_load_s"].get(size)
            L.append(f"| {n.replace('_', ' ')} | {_fmt_s(x['engine_s'])} | {_fmt_s(x['weights_s'])} | "
                     f"{_fmt_s(x['total_s'])} | {fmt_bytes(med(x['peak_rss']))} | {f'{p} s' if p and n == 'plain' else '–'} |")
        L += ["", "Paper, vLLM model load time (s): " + ", ".join(
            f"{k} {v}" for k, v in PAPER["vllm_load_s"].items()) + "."]
    elif vl:
        L.append(f"vLLM: skipped ({vl.get('skipped')}).")
    return L + [""]


# --- plots ----------------------------------------------------------------------------------

def plots(results: dict, out: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["matplotlib not installed (pip install -e '.[bench]')"]
    S = results["sections"]
    made = []

    def bars(ax, labels, figs, unit):
        meds = [med(f) or 0 for f in figs]
        lo = [max(0, m - (f.get("min") or m)) if isinstance(f, dict) else 0 for m, f in zip(meds, figs)]
        hi = [max(0, (f.get("max") or m) - m) if isinstance(f, dict) else 0 for m, f in zip(meds, figs)]
        ax.barh(range(len(labels)), meds, xerr=[lo, hi], color="#4C72B0")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(unit)

    fs = S.get("fs", {}).get("fs")
    if fs:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        kinds = [k for k in fs if "read_gbps" in fs[k]]
        w = 0.8 / max(1, len(kinds))
        for i, k in enumerate(kinds):
            r = fs[k]["read_gbps"]
            ax.bar([j + i * w for j in range(len(FS_MODES))], [med(r.get(m)) or 0 for m in FS_MODES], w, label=k)
        ax.set_xticks([j + w * (len(kinds) - 1) / 2 for j in range(len(FS_MODES))],
                      [m.replace("_", "\n") for m in FS_MODES], fontsize=8)
        ax.set_ylabel("GB/s (median)")
        ax.set_title(f"Read throughput, {S['fs']['file_bytes'] / GB:.2f} GB file")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "fs.png"), dpi=110)
        plt.close(fig)
        made.append("fs.png")
    for sec_name, unit in (("serialise", "seconds"), ("load", "seconds")):
        sec = {k: v for k, v in S.get(sec_name, {}).items() if "variants" in v}
        if not sec:
            continue
        fig, axes = plt.subplots(len(sec), 1, figsize=(8, 3.2 * len(sec) + 0.5), squeeze=False)
        for ax, (size, s) in zip(axes[:, 0], sec.items()):
            names = list(s["variants"])
            short = LOAD_SHORT if sec_name == "load" else SHORT
            bars(ax, [short.get(n, n) for n in names], [s["variants"][n]["time_s"] for n in names], unit)
            ax.set_xscale("log")
            ax.set_title(f"{sec_name}: {s['model']} (median, whiskers min–max; log scale)")
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{sec_name}.png"), dpi=110)
        plt.close(fig)
        made.append(f"{sec_name}.png")
    fw = S.get("frameworks", {})
    if "transformers" in fw and "variants" in fw["transformers"]:
        labels, figs = [], []
        for n, x in fw["transformers"]["variants"].items():
            labels.append(f"transformers {n}")
            figs.append(x["time_s"])
        for n, x in fw.get("vllm", {}).get("variants", {}).items():
            labels.append(f"vLLM engine {n}")
            figs.append(x["engine_s"])
        fig, ax = plt.subplots(figsize=(8, 0.5 * len(labels) + 1.2))
        bars(ax, labels, figs, "seconds")
        ax.set_title(f"Frameworks: {fw['model']}")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "frameworks.png"), dpi=110)
        plt.close(fig)
        made.append("frameworks.png")
    return made


def write_all(results: dict, out: str, vllm_python=None) -> None:
    os.makedirs(out, exist_ok=True)
    results["goals"] = goals(results)
    results["paper_comparison"] = paper_comparison(results)
    results["paper"] = PAPER
    try:
        results["plots"] = plots(results, out)
    except Exception as e:  # noqa: BLE001 - plots are a convenience
        results["plots"] = [f"plotting failed: {e}"]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(results))
    print_goals(results)


def print_goals(results: dict, file=sys.stdout) -> None:
    print("\nctfs goals (medians):", file=file)
    for g in results.get("goals", []):
        res = "n/a " if g["pass"] is None else ("PASS" if g["pass"] else "FAIL")
        if g["value"] is None:
            val = "–"
        elif _in_mib(g):
            val = f"{g['value']:.0f}"
        else:
            val = f"{g['value']:.2f}×"
        print(f"  {res}  {g['goal']}: {val} (target {g['op']} {g['target']:g}) [{g['detail']}]", file=file)
    for r in results.get("paper_comparison", []):
        if r["paper"] is not None:
            print(f"  info  {r['what']}: {_fmt_pct(r['ours_pct'])} (paper {_paper_cell(r['paper'])})", file=file)
    file.flush()
