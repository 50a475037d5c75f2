"""Who may read a mount, checked with real second users (setpriv): by default only the
mounting user (the kernel refuses everyone else: FUSE without allow_other); with
--allow-uid/--allow-gid the mount is allow_other and every lookup, stat, listing and
open() is checked against the caller's uid/gid from the FUSE request, whatever the page
cache holds."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from ctfs.ops import control
from ctfs.format.keys import KeySet
from ctfs.format.modeldir import encrypt_path
from ctfs.format.writer import EncryptOptions
from mounting import CTFS, ctfs, force_unmount, is_mounted, mounted, write_keys

# Acting as other users needs root and setpriv (util-linux), as in CI: fail, never skip.
assert os.geteuid() == 0 and shutil.which("setpriv"), "tests/test_access.py needs root and setpriv"

NAME = "model.safetensors"
DENIED_UID = 65534        # nobody
ALLOWED_UID = 65533
ALLOWED_GID = 65532
GROUP_MEMBER_UID = 65531  # not listed itself, but its primary gid is


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("acc")
    plain, enc = d / "plain", d / "enc"
    plain.mkdir()
    rng = np.random.default_rng(11)
    save_file({"w": rng.standard_normal((256, 1024), dtype=np.float32)}, str(plain / NAME))
    (plain / "config.json").write_text('{"model_type": "test"}\n')
    keys = KeySet.generate()
    key_file = write_keys(keys, d / "keys.jwk")
    encrypt_path(str(plain), str(enc), keys, EncryptOptions(chunk_size=64 * 1024))
    return {"enc": enc, "key_file": key_file}


@pytest.fixture
def public_dir():
    """A directory other users can traverse (pytest's tmp_path parents are 0700)."""
    d = tempfile.mkdtemp(prefix="ctfs-test-")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        for name in os.listdir(d):
            force_unmount(os.path.join(d, name))
        shutil.rmtree(d, ignore_errors=True)


def as_user(uid: int, gid: int, *cmd) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *cmd],
                          capture_output=True, text=True, timeout=30)


def sha_of(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def mount_options(mnt) -> list[str]:
    mnt = os.path.abspath(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == mnt:
                return parts[parts.index("-", 6) + 3].split(",")
    raise AssertionError(f"{mnt} not mounted")


@contextlib.contextmanager
def foreground_mount(src, mnt, key_file, log_path, *extra):
    """``ctfs mount -f`` with the daemon's log in ``log_path``; always unmounted."""
    os.makedirs(mnt, exist_ok=True)
    with open(log_path, "w") as log:
        p = subprocess.Popen([*CTFS, "mount", src, mnt, "--key-file", key_file, "-f", *extra],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not (is_mounted(mnt) and os.path.exists(control.socket_path(mnt))):
            if p.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mount failed:\n{open(log_path).read()}")
            time.sleep(0.02)
        yield mnt
    finally:
        if is_mounted(mnt):
            ctfs("umount", mnt, check=False)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        force_unmount(mnt)


def test_default_mount_only_the_mounting_user(model, public_dir):
    mnt = os.path.join(public_dir, "mnt")
    with mounted(model["enc"], mnt, model["key_file"]):
        assert "allow_other" not in mount_options(mnt)
        expect = sha_of(os.path.join(mnt, NAME))    # root (the mounting user) reads
        for uid in (DENIED_UID, ALLOWED_UID):       # the kernel refuses everyone else
            for cmd in (("cat", os.path.join(mnt, NAME)), ("cat", os.path.join(mnt, "config.json")),
                        ("ls", mnt)):
                p = as_user(uid, uid, *cmd)
                assert p.returncode != 0 and "Permission denied" in p.stderr, (uid, cmd, p)
        assert sha_of(os.path.join(mnt, NAME)) == expect


def test_allow_uid_and_gid_every_open_checked(model, public_dir, tmp_path):
    mnt = os.path.join(public_dir, "mnt")
    log = tmp_path / "daemon.log"
    with foreground_mount(model["enc"], mnt, model["key_file"], log,
                          "--allow-uid", str(ALLOWED_UID), "--allow-gid", str(ALLOWED_GID)):
        assert "allow_other" in mount_options(mnt)
        view = os.path.join(mnt, NAME)
        expect = sha_of(view)                       # page cache now holds the plaintext
        p = as_user(ALLOWED_UID, ALLOWED_UID, "sha256sum", view)
        assert p.returncode == 0 and p.stdout.split()[0] == expect, p.stderr
        p = as_user(GROUP_MEMBER_UID, ALLOWED_GID, "sha256sum", view)
        assert p.returncode == 0 and p.stdout.split()[0] == expect, p.stderr
        # cached pages or not, someone not listed is refused: at the lookup, which reaches
        # us every time (no entry cache on such mounts), before the open is checked
        for name in (NAME, "config.json"):
            p = as_user(DENIED_UID, DENIED_UID, "cat", os.path.join(mnt, name))
            assert p.returncode != 0 and "Permission denied" in p.stderr and p.stdout == ""
        # a listed user is refused too while the mount is locked
        ctfs("lock", mnt)
        p = as_user(ALLOWED_UID, ALLOWED_UID, "cat", view)
        assert p.returncode != 0 and "Permission denied" in p.stderr and p.stdout == ""
        ctfs("unlock", mnt)
        p = as_user(ALLOWED_UID, ALLOWED_UID, "sha256sum", view)
        assert p.returncode == 0 and p.stdout.split()[0] == expect, p.stderr
    text = log.read_text()
    assert f"stat refused: /{NAME} by uid={DENIED_UID} gid={DENIED_UID}" in text
    assert f"open refused (mount locked): /{NAME} by uid={ALLOWED_UID}" in text
    for uid in (ALLOWED_UID, GROUP_MEMBER_UID):  # never refused while unlocked
        assert f"by uid={uid} gid=" not in text


def test_allow_uid_metadata_refused_to_others(model, public_dir, tmp_path):
    """With an access list, a user not on it learns nothing from the mount: listing, stat,
    access(2) and statfs are refused like open, for names that exist and names that do
    not, even right after a listed user looked them up (the kernel keeps no entry or
    attribute cache on such mounts)."""
    mnt = os.path.join(public_dir, "mnt")
    log = tmp_path / "daemon.log"
    view = os.path.join(mnt, NAME)
    with foreground_mount(model["enc"], mnt, model["key_file"], log, "--allow-uid", str(ALLOWED_UID)):
        for _ in range(2):
            p = as_user(ALLOWED_UID, ALLOWED_UID, "ls", mnt)
            assert p.returncode == 0 and sorted(p.stdout.split()) == ["config.json", NAME], p
            p = as_user(ALLOWED_UID, ALLOWED_UID, "stat", "-c", "%s", view)
            assert p.returncode == 0 and int(p.stdout) == os.path.getsize(view), p
            for cmd in (("ls", mnt), ("stat", view), ("stat", os.path.join(mnt, "no-such-file")),
                        ("stat", "-f", mnt), ("ls", "-d", mnt)):
                p = as_user(DENIED_UID, DENIED_UID, *cmd)
                assert p.returncode != 0 and "Permission denied" in p.stderr, (cmd, p)
                assert NAME not in p.stdout and "config.json" not in p.stdout, (cmd, p)
            p = as_user(DENIED_UID, DENIED_UID, "/usr/bin/python3", "-c",
                        "import os,sys; print(os.access(sys.argv[1], os.R_OK), os.path.exists(sys.argv[1]))",
                        view)
            assert p.returncode == 0 and p.stdout.split() == ["False", "False"], p
        assert sorted(os.listdir(mnt)) == ["config.json", NAME]  # the mounting user (root)
    text = log.read_text()
    assert text.count(f"by uid={DENIED_UID} gid={DENIED_UID}") == 1, text  # first refusal only
    assert f"refused: / by uid={DENIED_UID}" in text or f"refused: /{NAME} by uid={DENIED_UID}" in text
    assert f"by uid={ALLOWED_UID}" not in text


def test_control_socket_unreachable_for_other_users(model, public_dir):
    mnt = os.path.join(public_dir, "mnt")
    with mounted(model["enc"], mnt, model["key_file"], "--allow-uid", str(DENIED_UID)):
        # even a user allowed to read the files cannot lock/unlock/query the mount
        client = ("import socket,sys\n"
                  "s=socket.socket(socket.AF_UNIX)\n"
                  "try: s.connect(sys.argv[1])\n"
                  "except OSError as e: print(e.errno); sys.exit(3)\n")
        p = as_user(DENIED_UID, DENIED_UID, "/usr/bin/python3", "-c", client,
                    control.socket_path(mnt))
        assert p.returncode == 3 and p.stdout.strip() == "13", p  # EACCES
        assert ctfs("status", mnt, "--json").returncode == 0
