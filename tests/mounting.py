"""Helpers for tests that really mount: run the `ctfs` CLI, always unmount afterwards."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import psutil

CTFS = [sys.executable, "-m", "ctfs.cli"]


def ctfs(*args, check=True, timeout=120, env=None, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([*CTFS, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       env=env, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"ctfs {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
    return p


def is_mounted(mnt) -> bool:
    mnt = os.path.abspath(mnt)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mnt for line in f)


def force_unmount(mnt) -> None:
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def daemon_process(mnt) -> psutil.Process:
    mnt = os.path.abspath(mnt)
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "mount" in cmd and mnt in cmd:
            return p
    raise LookupError(f"no ctfs daemon for {mnt}")


@contextlib.contextmanager
def mounted(src, mnt, key_file, *extra, env=None):
    os.makedirs(mnt, exist_ok=True)
    try:
        ctfs("mount", src, mnt, "--key-file", key_file, *extra, env=env)
        assert is_mounted(mnt)
        yield mnt
    finally:
        error = None
        if is_mounted(mnt):
            p = ctfs("umount", mnt, check=False)
            if p.returncode != 0:  # something still maps a file: collect it and retry once
                import gc
                gc.collect()
                p = ctfs("umount", mnt, check=False)
                if p.returncode != 0:
                    error = p.stderr
        force_unmount(mnt)
        if error and sys.exc_info()[0] is None:
            raise AssertionError(f"ctfs umount {mnt} failed (a test kept files open?): {error}")


def scrape_metrics(url) -> dict[str, float]:
    """A Prometheus text page as {"name{labels}": value}."""
    import urllib.request
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def write_secret(path, text: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return str(path)


def write_keys(keyset, path) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(keyset.to_jwks(), f)
    return str(path)


@contextlib.contextmanager
def foreground_daemon(args, log_path, env=None, prefix=()):
    """``ctfs mount ARGS --foreground --log-level debug`` with stderr in ``log_path``; yields
    the process once the mount is up, and always unmounts and reaps it."""
    mnt = args[1]
    os.makedirs(mnt, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*prefix, *CTFS, "mount", *map(str, args), "--foreground", "--log-level", "debug"],
                                env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not is_mounted(mnt):
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited {proc.returncode}:\n{open(log_path).read()}")
            assert time.monotonic() < deadline, "mount not ready"
            time.sleep(0.05)
        yield proc
    finally:
        if is_mounted(mnt):
            ctfs("umount", mnt, check=False)
        force_unmount(mnt)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
