"""The systemd integration, without systemd as PID 1: the unit files verify, and the
unit's own ExecStart=/ExecStop= lines, run here with NOTIFY_SOCKET, CREDENTIALS_DIRECTORY
and JOURNAL_STREAM as systemd would set them, notify READY=1 only once the mount serves,
report STATUS=, send STOPPING=1 and unmount on SIGTERM or ExecStop, and log one line per
event without timestamps or key material."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from ctfs.format.keys import KeySet
from ctfs.format.modeldir import encrypt_path
from ctfs.ops.notify import Notifier, socket_address
from ctfs.format.writer import EncryptOptions
from mounting import force_unmount, is_mounted, scrape_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
UNIT = UNITS / "ctfs@.service"
VLLM_UNIT = UNITS / "vllm-example.service"
README = UNITS / "README.md"
INSTALLED_CTFS = "/usr/local/bin/ctfs"     # what the unit files say
INSTALLED_VLLM = "/opt/vllm/bin/vllm"

# Directives that give the service a private mount namespace (systemd's
# exec_needs_mount_namespace()), so the FUSE mount would not be visible to the host.
NAMESPACE_DIRECTIVES = [
    "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateNetwork", "PrivateIPC",
    "PrivateUsers", "ProtectSystem", "ProtectHome", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
    "ProcSubset", "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "ExecPaths",
    "NoExecPaths", "BindPaths", "BindReadOnlyPaths", "TemporaryFileSystem", "RootDirectory",
    "RootImage", "MountFlags", "DynamicUser", "LogNamespace", "MountImages", "ExtensionImages",
]


# --- unit files ----------------------------------------------------------------------
def unit_entries(path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; duplicates kept, comments and continuations handled."""
    out, section, pending = [], "", ""
    for raw in pathlib.Path(path).read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def directive(path, key, section="Service") -> list[str]:
    return [v for s, k, v in unit_entries(path) if s == section and k == key]


def ctfs_executable() -> list[str]:
    script = os.path.join(sysconfig.get_path("scripts"), "ctfs")
    if os.access(script, os.X_OK):
        return [script]
    found = shutil.which("ctfs")
    return [found] if found else [sys.executable, "-m", "ctfs.cli"]


def command_line(value: str, config_dir, instance: str = "model") -> list[str]:
    """An Exec*= line as argv here: prefixes dropped, %i and /etc/ctfs/ substituted,
    /usr/local/bin/ctfs replaced by the ctfs installed for this Python."""
    value = value.lstrip("-@+!:")
    value = value.replace("%i", instance).replace("/etc/ctfs/", f"{config_dir}/")
    argv = shlex.split(value)
    assert argv[0] == INSTALLED_CTFS, argv
    return ctfs_executable() + argv[1:]


def test_units_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: apt-get install systemd (.ci/install.sh does)"
    exe = ctfs_executable()
    if len(exe) > 1:  # no ctfs script installed: a wrapper with an absolute path
        wrapper = tmp_path / "ctfs"
        wrapper.write_text(f"#!/bin/sh\nexec {shlex.join(exe)} \"$@\"\n")
        wrapper.chmod(0o755)
        exe = [str(wrapper)]
    stand_in = tmp_path / "vllm"  # harmless stand-in: verify only needs it executable
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    d = tmp_path / "units"
    d.mkdir()
    for src in (UNIT, VLLM_UNIT):
        text = src.read_text().replace(INSTALLED_CTFS, exe[0]).replace(INSTALLED_VLLM, str(stand_in))
        (d / src.name).write_text(text)
    p = subprocess.run([analyze, "verify", "--man=no", "ctfs@.service", "ctfs@model.service",
                        "vllm-example.service"], cwd=d, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    # bad values and unknown keys are only warnings: fail on any that names our units
    ours = [ln for ln in p.stderr.splitlines() if "ctfs@" in ln or "vllm-example" in ln or str(d) in ln]
    assert not ours, p.stderr


def test_unit_is_notify_hardened_and_keeps_the_mount_visible():
    assert directive(UNIT, "Type") == ["notify"]
    assert directive(UNIT, "NotifyAccess") == ["main"]
    assert directive(UNIT, "Restart") == ["on-failure"]
    [start] = directive(UNIT, "ExecStart")
    assert shlex.split(start) == [INSTALLED_CTFS, "mount", "--foreground", "--config", "/etc/ctfs/%i.toml"]
    [stop] = directive(UNIT, "ExecStop")
    assert shlex.split(stop.lstrip("-")) == [INSTALLED_CTFS, "umount", "--config", "/etc/ctfs/%i.toml"]
    # secrets through credentials only, never on a command line
    creds = directive(UNIT, "LoadCredentialEncrypted") + directive(UNIT, "LoadCredential")
    assert creds and all(c.startswith("ctfs-keys:") for c in creds)
    for _, key, value in unit_entries(UNIT):
        if key.startswith("Exec"):
            assert not re.search(r"--key-file|--vault-token|secret|CRYPTOTENSOR_KEYS", value), value
    assert not [k for _, k, _ in unit_entries(UNIT) if k in ("Environment", "EnvironmentFile")]
    present = {k for _, k, _ in unit_entries(UNIT)}
    assert not present & set(NAMESPACE_DIRECTIVES), present & set(NAMESPACE_DIRECTIVES)
    # every directive kept, and every namespace directive left out, has its reason
    readme = README.read_text()
    for key in sorted({k for s, k, _ in unit_entries(UNIT) if s == "Service"} | set(NAMESPACE_DIRECTIVES)):
        assert re.search(rf"^\|\s*`{key}=[^|]*\|[^|]*\|\s*\S", readme, re.M), f"README has no reason for {key}="
    # the vLLM example waits for and depends on the mount
    assert "ctfs@model.service" in directive(VLLM_UNIT, "Requires", "Unit")
    assert "ctfs@model.service" in directive(VLLM_UNIT, "After", "Unit")


def test_example_config_parses(monkeypatch):
    import pwd

    from ctfs.ops.config import load
    real = pwd.getpwnam
    monkeypatch.setattr(pwd, "getpwnam",
                        lambda n: pwd.struct_passwd(("vllm", "x", 990, 990, "", "/", "/bin/false"))
                        if n == "vllm" else real(n))
    fc = load(str(UNITS / "example.toml"))
    assert fc.provider == "systemd-creds" and fc.provider_options == {"credential": "ctfs-keys"}
    assert fc.values["mountpoint"] == "/run/ctfs/model" and fc.values["allow_uids"] == [990]
    assert fc.values["cache_size"] == 4 << 30 and fc.values["metrics"] == "127.0.0.1:9101"
    assert fc.values["source_io"] == "auto"
    assert fc.values["fuse_reply"] == "auto"


def test_s3_example_config_and_drop_in(tmp_path, monkeypatch):
    import pwd

    from ctfs.ops.config import load
    real = pwd.getpwnam
    monkeypatch.setattr(pwd, "getpwnam",
                        lambda n: pwd.struct_passwd(("vllm", "x", 990, 990, "", "/", "/bin/false"))
                        if n == "vllm" else real(n))
    fc = load(str(UNITS / "s3-vault-example.toml"))
    assert fc.values["src"] == "s3://models/llama-8b" and fc.provider == "vault"
    assert fc.values["cache_dir"] == "/var/cache/ctfs/llama" and fc.values["s3_path_style"] is True
    assert fc.values["s3_timeout"] == 120 and fc.values["cache_dir_size"] == 50 << 30
    drop = UNITS / "ctfs-s3.conf"
    # S3 credentials come in as a systemd credential file, never on a command line
    assert directive(drop, "LoadCredential") == ["aws-credentials:/etc/ctfs/aws-credentials"]
    assert directive(drop, "Environment") == ["AWS_SHARED_CREDENTIALS_FILE=%d/aws-credentials"]
    assert directive(drop, "CacheDirectory") == ["ctfs/%i"]
    assert not [k for _, k, v in unit_entries(drop) if k.startswith("Exec")]
    analyze = shutil.which("systemd-analyze")
    assert analyze
    d = tmp_path / "units"
    (d / "ctfs@llama.service.d").mkdir(parents=True)
    wrapper = tmp_path / "ctfs"
    wrapper.write_text("#!/bin/sh\nexit 0\n")
    wrapper.chmod(0o755)
    (d / "ctfs@.service").write_text(UNIT.read_text().replace(INSTALLED_CTFS, str(wrapper)))
    (d / "ctfs@llama.service.d" / "s3.conf").write_text(drop.read_text())
    p = subprocess.run([analyze, "verify", "--man=no", "ctfs@llama.service"], cwd=d,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert not [ln for ln in p.stderr.splitlines() if "s3.conf" in ln or "ctfs@" in ln], p.stderr


# --- sd_notify -------------------------------------------------------------------------
@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_datagrams_and_leaves_the_environment(tmp_path, abstract):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"@ctfs-test-{os.getpid()}-{time.monotonic_ns()}" if abstract else str(tmp_path / "notify")
    s.bind(socket_address(name))
    s.settimeout(5)
    env = {"NOTIFY_SOCKET": name, "OTHER": "1"}
    n = Notifier.from_env(env)
    assert env == {"OTHER": "1"} and n.enabled
    assert n.status("authorising\nREADY=1 sneaked in")
    assert s.recv(4096) == b"STATUS=authorising READY=1 sneaked in"
    n.ready("serving 2 file(s)")
    assert s.recv(4096) == b"READY=1\nSTATUS=serving 2 file(s)"
    assert n.stopping() and not n.stopping()  # once
    assert s.recv(4096) == b"STOPPING=1"
    n.close()
    s.close()


def test_notifier_without_socket_is_a_noop():
    n = Notifier.from_env({})
    assert not n.enabled and not n.ready("x") and not n.status("y")
    assert not Notifier.from_env({"NOTIFY_SOCKET": "relative"}).enabled


# --- journald-friendly logging ---------------------------------------------------------
def test_log_lines_are_single_unless_debug(monkeypatch):
    from ctfs.cli import LogFormatter
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        rec = logging.getLogger("ctfs.x").makeRecord("ctfs.x", logging.ERROR, __file__, 1,
                                                    "failed for %s", ("m",), sys.exc_info())
    one = LogFormatter("%(levelname)s %(name)s: %(message)s", tracebacks=False, priority_prefix=True)
    assert one.format(rec) == "<3>ERROR ctfs.x: failed for m: ValueError: boom | second line"
    full = LogFormatter("%(levelname)s %(name)s: %(message)s", tracebacks=True, priority_prefix=False)
    text = full.format(rec)
    assert "Traceback (most recent call last)" in text and text.startswith("ERROR ctfs.x: failed for m")


# --- the unit's command lines, for real --------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("sysd")
    plain = d / "plain"
    plain.mkdir()
    rng = np.random.default_rng(5)
    save_file({"w": rng.standard_normal((256, 200)).astype(np.float32),
               "b": rng.standard_normal(300).astype(np.float16)}, str(plain / "model.safetensors"))
    (plain / "config.json").write_text('{"model_type": "test"}\n')
    keys = KeySet.generate()
    encrypt_path(str(plain), str(d / "enc"), keys, EncryptOptions(chunk_size=64 * 1024))
    creds = d / "creds"  # what systemd makes of LoadCredential(Encrypted)=ctfs-keys:...
    creds.mkdir(mode=0o700)
    fd = os.open(creds / "ctfs-keys", os.O_WRONLY | os.O_CREAT, 0o400)
    os.write(fd, json.dumps(keys.to_jwks()).encode())
    os.close(fd)
    secret = [k["k"] for k in keys.to_jwks()["keys"] if k["kty"] == "oct"][0]
    want = sha_of(plain / "model.safetensors")
    return {"dir": d, "enc": d / "enc", "creds": creds, "secret": secret, "sha": want}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha_of(path) -> str:
    """sha256 of a safetensors file's data section (the view's header differs from the
    plaintext original's only by padding: crypto metadata removed, same length)."""
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


class NotifyListener:
    """The service manager's side of NOTIFY_SOCKET. On READY=1 it checks, before reading
    any further message, that the mount is listed and that a read through it is right."""

    def __init__(self, mnt, want_sha):
        self.name = f"@ctfs-test-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(socket_address(self.name))
        self.sock.settimeout(0.2)
        self.mnt, self.want_sha = mnt, want_sha
        self.messages: list[dict] = []
        self.ready_check: dict | None = None
        self.done = threading.Event()
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()

    def _loop(self):
        while not self.done.is_set():
            try:
                data = self.sock.recv(65536).decode()
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            msg = {"fields": fields, "mounted": is_mounted(self.mnt), "t": time.monotonic()}
            if fields.get("READY") == "1" and self.ready_check is None:
                check = {"mounted": msg["mounted"]}
                try:
                    check["sha"] = sha_of(self.mnt / "model.safetensors")
                except OSError as e:
                    check["sha"] = f"error: {e}"
                self.ready_check = check
            self.messages.append(msg)

    def wait_for(self, key, value="1", timeout=30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if m["fields"].get(key) == value:
                    return m
            time.sleep(0.02)
        raise AssertionError(f"no {key}={value} within {timeout}s; got {self.messages}")

    def statuses(self) -> list[str]:
        return [m["fields"]["STATUS"] for m in self.messages if "STATUS" in m["fields"]]

    def close(self):
        self.done.set()
        self.t.join(2)
        self.sock.close()


def start_unit(model, tmp_path, listener, metrics_port=None, stderr=None):
    """Write /etc/ctfs/model.toml (here: tmp_path/etc/model.toml) and run the unit's ExecStart=."""
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    cfg = [f'source = "{model["enc"]}"', f'mountpoint = "{mnt}"', 'cache_size = "8MiB"',
           'log_level = "info"']
    if metrics_port:
        cfg.append(f'metrics = "127.0.0.1:{metrics_port}"')
    cfg += ["[provider]", 'name = "systemd-creds"', 'credential = "ctfs-keys"']
    (etc / "model.toml").write_text("\n".join(cfg) + "\n")
    [start] = directive(UNIT, "ExecStart")
    argv = command_line(start, etc)
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY", "JOURNAL_STREAM", "INVOCATION_ID")}
    env.update(NOTIFY_SOCKET=listener.name, CREDENTIALS_DIRECTORY=str(model["creds"]),
               INVOCATION_ID="0123456789abcdef0123456789abcdef",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if stderr is not None:
        st = os.fstat(stderr.fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"  # stderr "is" the journal
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=stderr if stderr is not None else subprocess.DEVNULL, env=env, cwd="/")
    return proc, mnt, etc


def stop_unit(listener, proc, mnt) -> None:
    """Teardown of a unit started by :func:`start_unit`, whatever the test left running."""
    listener.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    force_unmount(mnt)


def scrape(port) -> dict[str, float]:
    return scrape_metrics(f"http://127.0.0.1:{port}/metrics")


def wait_status(listener, prefix, after=None, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = listener.statuses()
        if after is not None:
            idx = [i for i, st in enumerate(statuses) if st.startswith(after)]
            statuses = statuses[idx[-1] + 1:] if idx else []
        if any(st.startswith(prefix) for st in statuses):
            return
        time.sleep(0.05)
    raise AssertionError(f"no STATUS={prefix}... within {timeout}s: {listener.statuses()}")


def test_execstart_notifies_ready_only_when_serving_and_stops_on_sigterm(model, tmp_path):
    port = free_port()
    listener = NotifyListener(tmp_path / "mnt", model["sha"])
    log_path = tmp_path / "stderr.log"
    with open(log_path, "wb") as errf:
        proc, mnt, _ = start_unit(model, tmp_path, listener, metrics_port=port, stderr=errf)
    try:
        ready = listener.wait_for("READY")
        # at READY=1 the mount was listed and a read through it gave the plaintext's bytes
        assert listener.ready_check == {"mounted": True, "sha": model["sha"]}
        assert ready["mounted"]
        before = listener.messages[:listener.messages.index(ready)]
        assert before and all("READY" not in m["fields"] for m in before)
        statuses = listener.statuses()
        assert statuses[0].startswith("authorising 1 file(s) in ")
        assert ready["fields"]["STATUS"].startswith("serving 1 file(s)") and str(mnt) in ready["fields"]["STATUS"]
        # metrics from the config file, on 127.0.0.1 only, after a read
        assert sha_of(mnt / "model.safetensors") == model["sha"]
        m = scrape(port)
        assert m["ctfs_bytes_decrypted_total"] > 0 and m["ctfs_files"] == 1
        assert m["ctfs_cache_capacity_bytes"] == 8 << 20 and m["ctfs_locked"] == 0
        # lock / unlock show in STATUS= (and in the metrics)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        ctfs_cli = ctfs_executable()
        subprocess.run([*ctfs_cli, "lock", str(mnt)], check=True, capture_output=True, env=env, timeout=30)
        wait_status(listener, "locked: ")
        assert scrape(port)["ctfs_locked"] == 1
        subprocess.run([*ctfs_cli, "unlock", str(mnt)], check=True, capture_output=True, env=env, timeout=30)
        wait_status(listener, "serving 1 file(s)", after="locked: ")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        stop = listener.wait_for("STOPPING", timeout=5)
        assert listener.messages.index(stop) > listener.messages.index(ready)
        assert not is_mounted(mnt)
    finally:
        stop_unit(listener, proc, tmp_path / "mnt")
    # journald: one line per event, priority prefix then level, no timestamp, no key
    text = log_path.read_text()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines, "the daemon logged nothing"
    for ln in lines:
        assert re.match(r"<[0-7]>(DEBUG|INFO|WARNING|ERROR|CRITICAL) ctfs[.\w]*: ", ln), ln
        assert not re.search(r"\d{4}-\d\d-\d\d|\d\d:\d\d:\d\d,\d{3}", ln), ln
    assert any("<6>INFO ctfs.fuse: serving" in ln for ln in lines), lines
    assert model["secret"] not in text
    assert not any(model["secret"] in json.dumps(m["fields"]) for m in listener.messages)


def test_execstop_unmounts_a_running_daemon(model, tmp_path):
    listener = NotifyListener(tmp_path / "mnt", model["sha"])
    proc, mnt, etc = start_unit(model, tmp_path, listener)
    try:
        listener.wait_for("READY")
        assert listener.ready_check == {"mounted": True, "sha": model["sha"]}
        [stop] = directive(UNIT, "ExecStop")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        p = subprocess.run(command_line(stop, etc), capture_output=True, text=True, timeout=60, env=env)
        assert p.returncode == 0, p.stderr
        assert proc.wait(timeout=20) == 0
        listener.wait_for("STOPPING", timeout=5)
        assert not is_mounted(mnt)
        # once more, nothing mounted: ExecStop's '-' prefix makes systemd ignore the failure
        p = subprocess.run(command_line(stop, etc), capture_output=True, text=True, timeout=60, env=env)
        assert p.returncode != 0 and "not a mount point" in p.stderr
    finally:
        stop_unit(listener, proc, tmp_path / "mnt")


def test_failed_start_reports_status_and_never_ready(model, tmp_path):
    """A missing credential: exit 1, STATUS=failed: ..., no READY=1, one log line for it."""
    creds = tmp_path / "nocreds"
    creds.mkdir()
    listener = NotifyListener(tmp_path / "mnt", model["sha"])
    with open(tmp_path / "stderr.log", "wb") as errf:
        proc, mnt, _ = start_unit(dict(model, creds=creds), tmp_path, listener, stderr=errf)
    try:
        assert proc.wait(timeout=30) == 1
        deadline = time.monotonic() + 5
        while not any(s.startswith("failed: ") for s in listener.statuses()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(s.startswith("failed: ") and "ctfs-keys" in s for s in listener.statuses()), listener.statuses()
        assert not [m for m in listener.messages if "READY" in m["fields"]]
        assert not is_mounted(mnt)
    finally:
        stop_unit(listener, proc, mnt)
    lines = (tmp_path / "stderr.log").read_text().splitlines()
    errors = [ln for ln in lines if ln.startswith("<3>ERROR")]
    assert len(errors) == 1 and "ctfs-keys" in errors[0], lines
    assert "Traceback" not in "\n".join(lines)
