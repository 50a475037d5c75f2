"""``ctfs encrypt`` robustness: atomic output, Ctrl-C / SIGTERM, bounded memory, progress."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import pty
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ctfs.format.writer
from ctfs.cli import main
from ctfs.format.keys import KeySet
from ctfs.format.modeldir import encrypt_path
from ctfs.format.reader import CryptoFile
from ctfs.format.writer import EncryptOptions

_SCRIPT = os.path.join(os.path.dirname(sys.executable), "ctfs")
CTFS = [_SCRIPT] if os.access(_SCRIPT, os.X_OK) else [sys.executable, "-m", "ctfs.cli"]
MiB = 1 << 20


def _default_sigint():
    # a shell's background job starts with SIGINT ignored, and Python keeps it ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tree_state(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root (including hidden ones)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(glob.glob(str(parent / ".*.ctfs-tmp-*")) + glob.glob(str(parent / "*.ctfs-tmp-*")))


def write_plain(path: Path, tensors: dict[str, tuple[str, list[int]]], fill, *,
                metadata=None, block: int = 16 * MiB) -> int:
    """Write a plain safetensors file block by block: ``fill(offset, n)`` gives the data
    bytes at [offset, offset+n) of the data section (None: leave a hole, i.e. zeros).
    Returns the data section's start offset."""
    from ctfs.format.header import tensor_nbytes
    hdr, off = {}, 0
    if metadata:
        hdr["__metadata__"] = metadata
    for name, (dtype, shape) in tensors.items():
        n = tensor_nbytes(dtype, shape)
        hdr[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    body = json.dumps(hdr, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    start = 8 + len(body)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        for o in range(0, off, block):
            n = min(block, off - o)
            data = fill(o, n)
            if data is None:
                f.seek(n, os.SEEK_CUR)
            else:
                assert len(data) == n
                f.write(data)
        f.truncate(start + off)
    return start


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("keys") / "k.jwk"
    assert main(["keygen", str(p), "--name", "rb"]) == 0
    return p


@pytest.fixture(scope="module")
def keys(keyfile) -> KeySet:
    return KeySet.load(keyfile)


def small_model(root: Path) -> Path:
    """A directory with three ~1 MiB shards, an index, a config and a sub-folder."""
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    for i in range(3):
        save_file({f"l{i}.w": torch.randn(512, 512, generator=g), f"l{i}.b": torch.randn(512, generator=g)},
                  str(root / f"model-0000{i + 1}-of-00003.safetensors"), metadata={"format": "pt"})
    (root / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (root / "config.json").write_text("{}")
    (root / "sub").mkdir()
    (root / "sub" / "x.txt").write_text("x")
    return root


def run_cli(*args) -> tuple[int, str]:
    err = io.StringIO()
    old = signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main([str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, old)
    return rc, err.getvalue()


class _TruncateSourceAfter:
    """Replaces ctfs.format.writer._pread: on call ``n`` the source file is cut short first, as if
    it changed while being encrypted."""

    def __init__(self, n: int):
        self.n, self.calls, self.orig = n, 0, ctfs.format.writer._pread

    def __call__(self, fd, buf, size, offset, path):
        self.calls += 1
        if self.calls == self.n:
            os.truncate(path, os.path.getsize(path) // 2)
        return self.orig(fd, buf, size, offset, path)


# --- atomic output ----------------------------------------------------------------------

def test_failure_midway_single_file_leaves_nothing(tmp_path, keyfile, monkeypatch):
    src = tmp_path / "src.safetensors"
    save_file({"w": torch.randn(1024, 1024)}, str(src))  # 4 MiB: several 1 MiB reads
    out = tmp_path / "out"
    out.mkdir()
    hook = _TruncateSourceAfter(3)
    monkeypatch.setattr(ctfs.format.writer, "_pread", hook)
    rc, err = run_cli("encrypt", src, out / "dst.safetensors", "--key-file", keyfile,
                      "--chunk-size", "1MiB")
    assert hook.calls >= 3
    assert rc == 1 and "Traceback" not in err
    assert err.strip() == f"ctfs: error: {src}: unexpected end of file (changed while encrypting?)"
    assert os.listdir(out) == []


def test_failure_midway_directory_leaves_nothing(tmp_path, keyfile, monkeypatch):
    src = small_model(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    hook = _TruncateSourceAfter(4)  # first shard is 1 MiB + 2 KiB: 2 reads; fails in shard 2
    monkeypatch.setattr(ctfs.format.writer, "_pread", hook)
    rc, err = run_cli("encrypt", src, out / "model", "--key-file", keyfile, "--chunk-size", "1MiB")
    assert rc == 1 and "unexpected end of file" in err and "model-00002-of-00003" in err
    assert os.listdir(out) == []


@pytest.mark.parametrize("what", ["file", "dir"])
def test_interrupt_via_progress_leaves_nothing(tmp_path, keys, what):
    src = small_model(tmp_path / "src")
    if what == "file":
        src = src / "model-00002-of-00003.safetensors"
    out = tmp_path / "out"
    out.mkdir()
    seen = []

    def progress(n):
        seen.append(n)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encrypt_path(str(src), str(out / "dst"), keys, EncryptOptions(chunk_size=256 * 1024),
                     progress=progress)
    assert len(seen) == 5
    assert os.listdir(out) == []


@pytest.mark.parametrize("what", ["file", "dir"])
def test_failed_force_keeps_old_dst(tmp_path, keyfile, keys, monkeypatch, what):
    src = small_model(tmp_path / "src")
    if what == "file":
        src = src / "model-00001-of-00003.safetensors"
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "dst"
    rc, err = run_cli("encrypt", src, dst, "--key-file", keyfile)
    assert rc == 0, err
    before = tree_state(out)
    assert len(before) == (1 if what == "file" else 6)

    # an exception half-way through the new encryption
    def boom(n, _calls=[]):
        _calls.append(n)
        if len(_calls) == 3:
            raise RuntimeError("simulated failure")

    with pytest.raises(RuntimeError):
        encrypt_path(str(src), str(dst), keys, EncryptOptions(chunk_size=64 * 1024), force=True,
                     progress=boom)
    assert tree_state(out) == before and leftovers(out) == []
    # and a truncated source through the CLI
    work = tmp_path / "copy"
    shutil.copytree(src, work) if what == "dir" else shutil.copyfile(src, work)
    monkeypatch.setattr(ctfs.format.writer, "_pread", _TruncateSourceAfter(2))
    rc, err = run_cli("encrypt", work, dst, "--key-file", keyfile, "--force")
    assert rc == 1 and "unexpected end of file" in err
    assert tree_state(out) == before and sorted(os.listdir(out)) == ["dst"]
    monkeypatch.undo()
    # the old DST is still a good encrypted file/dir
    rc, err = run_cli("verify", dst, "--key-file", keyfile)
    assert rc == 0, err


# --- Ctrl-C / SIGTERM ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_sparse(tmp_path_factory) -> Path:
    """A ~300 MB plain file whose data is a hole (zeros): cheap to create and to read."""
    p = tmp_path_factory.mktemp("big") / "big.safetensors"
    write_plain(p, {"w0": ("F32", [150 * MiB // 4]), "w1": ("F16", [75 * MiB])}, lambda o, n: None)
    return p


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_encrypt(tmp_path, big_sparse, keyfile, sig):
    dst = tmp_path / "dst.safetensors"
    proc = subprocess.Popen(CTFS + ["encrypt", str(big_sparse), str(dst), "--key-file", str(keyfile),
                                    "--chunk-size", "4KiB"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 60
        started = False
        while time.monotonic() < deadline and proc.poll() is None:
            tmp = leftovers(tmp_path)
            if tmp and os.path.getsize(tmp[0]) > 0:  # it has started writing data
                started = True
                break
            time.sleep(0.005)
        assert started, f"no temp file seen (rc={proc.poll()})"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    # click turns KeyboardInterrupt into Abort (after a blank line closing the ^C echo)
    assert err.strip() in ("ctfs: interrupted", "ctfs: interrupted; nothing was left half-written")
    assert os.listdir(tmp_path) == []


# --- bounded memory -------------------------------------------------------------------------

_RSS_HELPER = r"""
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL)
print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _block(o: int, n: int) -> bytes:
    return np.random.default_rng(o).bytes(n)  # deterministic per 16 MiB block


@pytest.mark.slow
@pytest.mark.parametrize("version", ["2", "1"])
def test_encrypt_large_file_bounded_memory(tmp_path, keyfile, keys, version):
    src = tmp_path / "big.safetensors"
    tensors = {"a.weight": ("F32", [65536, 1024]),      # 256 MiB
               "b.weight": ("BF16", [131072, 1024]),    # 256 MiB
               "c.bias": ("F32", [13]),                  # 52 B: later blocks unaligned
               "d.weight": ("F16", [65536, 1024])}      # 128 MiB
    data_start = write_plain(src, tensors, _block, metadata={"format": "pt"})
    assert src.stat().st_size > 640 * MiB
    dst = tmp_path / "enc.safetensors"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", _RSS_HELPER] + CTFS +
                       ["encrypt", str(src), str(dst), "--key-file", str(keyfile), "-q",
                        "--format-version", version],
                       capture_output=True, text=True, timeout=600)
    rc, maxrss_kib = map(int, p.stdout.split())
    peak = maxrss_kib / 1024
    print(f"\nctfs encrypt v{version} of {src.stat().st_size / MiB:.0f} MiB: peak RSS {peak:.1f} MiB, "
          f"{time.monotonic() - t0:.1f} s")
    assert rc == 0, p.stderr
    assert peak < 300, f"peak RSS {peak:.1f} MiB"
    assert dst.stat().st_size > src.stat().st_size

    # sample plaintext ranges (never the whole file in memory)
    rnd = random.Random(5)
    with CryptoFile(dst, keys) as cf, open(src, "rb") as f:
        assert cf.data_len == src.stat().st_size - data_start
        infos = cf.tensors
        ranges = [(0, 4096), (cf.data_len - 4096, 4096)]
        for t in infos.values():
            ranges.append((t.start, min(t.nbytes, 100)))
            ranges.append((max(t.start, t.end - 100), min(t.nbytes, 100)))
        if version == "2":  # chunk boundaries and random spots
            ranges += [(2 * MiB - 10, 20), (infos["b.weight"].start + 6 * MiB - 1, 3 * MiB)]
            ranges += [(rnd.randrange(cf.data_len - MiB), rnd.randrange(1, MiB)) for _ in range(10)]
        else:  # v1 authenticates whole tensors: one read per tensor
            ranges = [(infos[n].start + 12345, 1000) for n in ("a.weight", "b.weight", "d.weight")] + \
                     [(infos["c.bias"].start, 52)]
        for off, n in ranges:
            f.seek(data_start + off)
            assert cf.read_data(off, n) == f.read(n), (off, n)
        # ciphertext really differs from the plaintext
        with open(dst, "rb") as g:
            g.seek(cf.data_start)
            f.seek(data_start)
            assert g.read(4096) != f.read(4096)


# --- progress ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_plain(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("small") / "s.safetensors"
    save_file({"w": torch.randn(512, 1024)}, str(p))  # 2 MiB
    return p


def test_progress_bar_on_tty(tmp_path, small_plain, keyfile):
    master, slave = pty.openpty()
    proc = subprocess.Popen(CTFS + ["encrypt", str(small_plain), str(tmp_path / "o"), "--key-file",
                                    str(keyfile), "--chunk-size", "64KiB"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    out = b""
    try:
        while True:
            r, _, _ = select.select([master], [], [], 30)
            if not r:
                break
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            out += data
    finally:
        os.close(master)
        proc.wait(timeout=30)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert re.search(r"encrypting\s+\[[#-]+\]\s+\d+%", text), text
    assert "encrypted 1 file(s)" in text


def test_no_progress_bar_without_tty(tmp_path, small_plain, keyfile):
    p = subprocess.run(CTFS + ["encrypt", str(small_plain), str(tmp_path / "o"), "--key-file",
                               str(keyfile), "--chunk-size", "64KiB"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stderr.startswith("encrypted 1 file(s), 2097152 tensor bytes")
    assert "%" not in p.stderr and "[" not in p.stderr and "\r" not in p.stderr
    assert p.stderr.count("\n") == 1 and p.stdout == ""
    q = subprocess.run(CTFS + ["encrypt", str(small_plain), str(tmp_path / "q"), "--key-file",
                               str(keyfile), "-q"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert q.returncode == 0 and q.stderr == "" and q.stdout == ""
