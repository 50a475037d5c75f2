"""Where a figure came from: the code (git commit, dirty or not), the command line, the date,
the CPU and the flags that decide its speed, the kernel, the VM's free page reporting and the
library versions. Every result file the benchmarks write carries this block, so a figure
quoted anywhere can be checked against the machine and the code that produced it."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

from .util import REPO

#: CPU flags that decide how fast AES-GCM, copies and checksums run (``/proc/cpuinfo`` names)
CPU_FLAGS = ("aes", "vaes", "pclmulqdq", "vpclmulqdq", "avx2", "avx512f", "avx512vl", "sha_ni")
PACKAGES = ("ctfs", "torch", "safetensors", "numpy", "cryptography", "cryptotensors", "transformers",
            "mfusepy", "regopy", "psutil", "matplotlib")
PAGE_REPORTING = "/sys/module/page_reporting/parameters/page_reporting_order"


def _first_line(args, timeout=30) -> str | None:
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (p.stdout or p.stderr).strip()
    return text.splitlines()[0] if text else None


def cpu() -> dict:
    """The CPU model and, for each flag in CPU_FLAGS, whether this CPU has it."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu_model": model, "cpu_flags": {f: f in flags for f in CPU_FLAGS}}


def git(repo: str = REPO) -> dict:
    """The commit checked out in REPO and whether the tree differs from it (tracked or new
    files; the paths, up to 20)."""
    commit = _first_line(["git", "-C", repo, "rev-parse", "HEAD"])
    if commit is None or len(commit) != 40:
        return {"commit": None, "dirty": None, "dirty_paths": []}
    try:
        status = subprocess.run(["git", "-C", repo, "status", "--porcelain"], capture_output=True,
                                text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"commit": commit, "dirty": None, "dirty_paths": []}
    return {"commit": commit, "dirty": bool(status), "dirty_paths": [s[3:] for s in status[:20]]}


def page_reporting() -> dict:
    """The VM's free page reporting as found now (its order; absent outside such a VM)."""
    try:
        with open(PAGE_REPORTING) as f:
            return {"available": True, "order": int(f.read().strip())}
    except (OSError, ValueError):
        return {"available": False}


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        from cryptography.hazmat.backends.openssl.backend import backend
        out["openssl"] = backend.openssl_version_text()
    except Exception:  # noqa: BLE001 - informative only
        out["openssl"] = None
    out["gocryptfs"] = _first_line(["gocryptfs", "-version"])
    out["fusermount3"] = _first_line(["fusermount3", "-V"])
    return out


def collect(prog: str, argv=None) -> dict:
    """The provenance block of a result file written by ``python -m PROG ARGV``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return {
        **git(),
        "command": " ".join(["python", "-m", prog, *argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **cpu(),
        "logical_cpus": os.cpu_count(),
        "kernel": platform.release(),
        "page_reporting": page_reporting(),
        "openssl_ia32cap": os.environ.get("OPENSSL_ia32cap"),
        "versions": versions(),
    }


def markdown(p: dict) -> list[str]:
    """The provenance block as Markdown lines."""
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in p["cpu_flags"].items())
    pr = p["page_reporting"]
    commit = p["commit"] or "unknown (not a git checkout)"
    dirty = "" if p["dirty"] is None else (" (**tree dirty**: " + ", ".join(p["dirty_paths"]) + ")"
                                           if p["dirty"] else " (clean tree)")
    return [
        "## Provenance", "",
        f"* commit `{commit}`{dirty}",
        f"* command `{p['command']}`, started {p['date']}",
        f"* CPU {p['cpu_model']}, {p['logical_cpus']} logical CPUs; {flags}"
        + (f"; OPENSSL_ia32cap={p['openssl_ia32cap']}" if p.get("openssl_ia32cap") else ""),
        f"* kernel {p['kernel']}; free page reporting "
        + (f"on (page_reporting_order {pr['order']})" if pr.get("available") else "not present"),
        "* versions: " + ", ".join(f"{k} {v}" for k, v in p["versions"].items() if v),
        "",
    ]
