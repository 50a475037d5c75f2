"""Real mounts through the key providers: vault (KV v2 with token / token file / AppRole,
Transit with the wrapped file next to the model or at a KV path) against a real OpenBao,
plus file, env and systemd-creds. Secrets never reach the daemon's argv, environment or
log; --recheck locks the mount when the token is revoked; an unreachable server is retried
at mount (then a clear error) and tolerated after it."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import textwrap
import time
import uuid

import numpy as np
import pytest


from openbao import OpenBao  # noqa: E402  (fixtures come from conftest: one server per session)
from safetensors.numpy import load_file, save_file  # noqa: E402

from ctfs.format.header import read_header_path  # noqa: E402
from ctfs.format.keys import KeySet  # noqa: E402
from ctfs.format.modeldir import encrypt_path  # noqa: E402
from ctfs.format.writer import EncryptOptions  # noqa: E402
from mounting import ctfs, daemon_process, force_unmount, foreground_daemon, is_mounted, write_keys, write_secret  # noqa: E402

SHARD = "model.safetensors"


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VAULT_", "BAO_")) and k not in ("CREDENTIALS_DIRECTORY", "CRYPTOTENSOR_KEYS")}
    env.update(extra)
    return env


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def data_sha(path) -> str:
    h = read_header_path(path)
    with open(path, "rb") as f:
        f.seek(h.data_start)
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("vmodel")
    plain, enc = d / "plain", d / "enc"
    plain.mkdir()
    rng = np.random.default_rng(7)
    tensors = {"w": rng.standard_normal((300, 128)).astype(np.float32),
               "b": rng.standard_normal(300).astype(np.float16)}
    save_file(tensors, str(plain / SHARD), metadata={"format": "np"})
    (plain / "config.json").write_text('{"model_type": "test"}\n')
    keys = KeySet.generate(name="vm")
    key_file = write_keys(keys, d / "keys.jwk")
    encrypt_path(str(plain), str(enc), keys, EncryptOptions(chunk_size=16 * 1024))
    return {"dir": d, "plain": plain, "enc": enc, "keys": keys, "key_file": key_file,
            "tensors": tensors, "jwks": json.dumps(keys.to_jwks())}


def assert_serves_plaintext(model, mnt) -> None:
    view = os.path.join(mnt, SHARD)
    assert data_sha(view) == data_sha(model["plain"] / SHARD)
    got = load_file(view)
    for name, t in model["tensors"].items():
        np.testing.assert_array_equal(got[name], t)


def assert_no_secrets_in_process(pid: int, *secrets: str) -> None:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read()
    with open(f"/proc/{pid}/environ", "rb") as f:
        environ = f.read()
    for s in secrets:
        assert s.encode() not in cmdline, "secret in the daemon's argv"
        assert s.encode() not in environ, "secret in the daemon's environment"


@contextlib.contextmanager
def mounted(src, mnt, *args, env):
    os.makedirs(mnt, exist_ok=True)
    try:
        ctfs("mount", src, mnt, *args, env=env)
        assert is_mounted(mnt)
        yield str(mnt)
    finally:
        unmount_quietly(mnt)


def unmount_quietly(mnt) -> None:
    if is_mounted(mnt):
        ctfs("umount", mnt, check=False)
        deadline = time.time() + 10
        while is_mounted(mnt) and time.time() < deadline:
            time.sleep(0.05)
    force_unmount(mnt)


def kv_store(server: OpenBao, jwks: str) -> tuple[str, str]:
    name = uniq("model")
    server.client().secrets.kv.v2.create_or_update_secret(path=f"ctfs/{name}", secret={"jwks": jwks},
                                                          mount_point="secret")
    policy = uniq("kvread")
    server.create_policy(policy, f'path "secret/data/ctfs/{name}" {{ capabilities = ["read"] }}')
    return f"secret/ctfs/{name}", policy


# --- vault: KV v2 ---------------------------------------------------------------------------
def test_kv_token_env(model, openbao_server, tmp_path):
    path, policy = kv_store(openbao_server, model["jwks"])
    token = openbao_server.create_token([policy])
    env = base_env(VAULT_ADDR=openbao_server.addr, VAULT_TOKEN=token)
    with mounted(model["enc"], tmp_path / "mnt", "--key-provider", "vault", "--vault-kv-path", path,
                 env=env) as mnt:
        assert_serves_plaintext(model, mnt)
        assert_no_secrets_in_process(daemon_process(mnt).pid, token, model["keys"].to_jwks()["keys"][0]["k"])


def test_kv_token_file(model, openbao_server, tmp_path):
    path, policy = kv_store(openbao_server, model["jwks"])
    token = openbao_server.create_token([policy])
    tf = write_secret(tmp_path / "vault-token", token)
    with mounted(model["enc"], tmp_path / "mnt", "--key-provider", "vault", "--vault-kv-path", path,
                 "--vault-addr", openbao_server.addr, "--vault-token-file", tf, env=base_env()) as mnt:
        assert_serves_plaintext(model, mnt)
        assert_no_secrets_in_process(daemon_process(mnt).pid, token)


def test_kv_approle_secret_id_from_env(model, openbao_server, tmp_path):
    path, policy = kv_store(openbao_server, model["jwks"])
    role_id, secret_id = openbao_server.create_approle(uniq("ctfs"), [policy])
    env = base_env(BAO_ADDR=openbao_server.addr, VAULT_SECRET_ID=secret_id)
    with mounted(model["enc"], tmp_path / "mnt", "--key-provider", "vault", "--vault-kv-path", path,
                 "--vault-role-id", role_id, env=env) as mnt:
        assert_serves_plaintext(model, mnt)
        assert_no_secrets_in_process(daemon_process(mnt).pid, secret_id)


def test_missing_kid_is_named(model, openbao_server, tmp_path):
    other = KeySet.generate(name="someone-else")
    path, policy = kv_store(openbao_server, json.dumps(other.to_jwks()))
    env = base_env(VAULT_ADDR=openbao_server.addr, VAULT_TOKEN=openbao_server.create_token([policy]))
    os.makedirs(tmp_path / "mnt")
    r = ctfs("mount", model["enc"], tmp_path / "mnt", "--key-provider", "vault", "--vault-kv-path", path,
             env=env, check=False)
    assert r.returncode != 0 and not is_mounted(tmp_path / "mnt")
    assert "vm-enc" in r.stderr and "someone-else-enc" in r.stderr, r.stderr


# --- vault: Transit --------------------------------------------------------------------------
def transit_key(server: OpenBao, extra_hcl: str = "") -> tuple[str, str]:
    key = uniq("tk")
    server.create_transit_key(key)
    token = server.create_policy_token(uniq("transit"), textwrap.dedent(f"""
        path "transit/encrypt/{key}" {{ capabilities = ["update"] }}
        path "transit/decrypt/{key}" {{ capabilities = ["update"] }}
    """) + extra_hcl)
    return key, token


def test_transit_wrapped_file_next_to_model(model, openbao_server, tmp_path):
    key, token = transit_key(openbao_server)
    enc = tmp_path / "enc"
    shutil.copytree(model["enc"], enc)
    env = base_env(VAULT_ADDR=openbao_server.addr, VAULT_TOKEN=token)
    r = ctfs("vault-wrap", model["key_file"], enc / "keys.vault", "--transit-key", key, env=env)
    assert token not in r.stderr
    assert (enc / "keys.vault").stat().st_mode & 0o777 == 0o600
    assert model["keys"].to_jwks()["keys"][0]["k"] not in (enc / "keys.vault").read_text()
    with mounted(enc, tmp_path / "mnt", "--key-provider", "vault", "--vault-transit-file",
                 enc / "keys.vault", "--vault-transit-key", key, env=env) as mnt:
        assert_serves_plaintext(model, mnt)
        assert_no_secrets_in_process(daemon_process(mnt).pid, token)


def test_transit_wrapped_at_kv_path(model, openbao_server, tmp_path):
    name = uniq("wrapped")
    key, token = transit_key(openbao_server, f'path "secret/data/ctfs/{name}" '
                                          f'{{ capabilities = ["read", "create", "update"] }}\n')
    env = base_env(VAULT_ADDR=openbao_server.addr, VAULT_TOKEN=token)
    ctfs("vault-wrap", model["key_file"], "--transit-key", key, "--kv-path", f"secret/ctfs/{name}", env=env)
    with mounted(model["enc"], tmp_path / "mnt", "--key-provider", "vault", "--vault-kv-path",
                 f"secret/ctfs/{name}", "--vault-transit-key", key, env=env) as mnt:
        assert_serves_plaintext(model, mnt)


# --- other providers -----------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["file", "env", "systemd-creds"])
def test_file_env_systemd_creds_providers(model, tmp_path, provider):
    env, args = base_env(), ["--key-provider", provider]
    if provider == "file":
        args += ["--key-file", model["key_file"]]
    elif provider == "env":
        env["CRYPTOTENSOR_KEYS"] = model["jwks"]
    else:
        creds = tmp_path / "creds"
        creds.mkdir(mode=0o700)
        write_secret(creds / "model-keys", model["jwks"])
        env["CREDENTIALS_DIRECTORY"] = str(creds)
        args += ["--credential", "model-keys"]
    with mounted(model["enc"], tmp_path / "mnt", *args, env=env) as mnt:
        assert_serves_plaintext(model, mnt)
        assert_no_secrets_in_process(daemon_process(mnt).pid, model["keys"].to_jwks()["keys"][0]["k"])


def test_systemd_creds_missing_credential_is_clear(model, tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    os.makedirs(tmp_path / "mnt")
    r = ctfs("mount", model["enc"], tmp_path / "mnt", "--key-provider", "systemd-creds",
             env=base_env(CREDENTIALS_DIRECTORY=str(creds)), check=False)
    assert r.returncode != 0 and "credential 'ctfs-keys' not found" in r.stderr


def test_vault_token_from_systemd_credential(model, openbao_server, tmp_path):
    path, policy = kv_store(openbao_server, model["jwks"])
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    token = openbao_server.create_token([policy])
    write_secret(creds / "vault-token", token)
    env = base_env(VAULT_ADDR=openbao_server.addr, CREDENTIALS_DIRECTORY=str(creds))
    with mounted(model["enc"], tmp_path / "mnt", "--key-provider", "vault", "--vault-kv-path", path,
                 "--vault-token-credential", "vault-token", env=env) as mnt:
        assert_serves_plaintext(model, mnt)


# --- re-check, revocation, availability ---------------------------------------------------
def test_recheck_locks_when_token_revoked(model, openbao_server, tmp_path):
    path, policy = kv_store(openbao_server, model["jwks"])
    token = openbao_server.create_token([policy])
    env = base_env(VAULT_ADDR=openbao_server.addr, VAULT_TOKEN=token)
    log = tmp_path / "daemon.log"
    mnt = tmp_path / "mnt"
    with foreground_daemon([model["enc"], mnt, "--key-provider", "vault", "--vault-kv-path", path,
                            "--recheck", "1s"], log, env=env) as proc:
        view = mnt / SHARD
        assert_serves_plaintext(model, mnt)
        assert_no_secrets_in_process(proc.pid, token)
        time.sleep(1.2)                      # at least one successful re-check
        assert_serves_plaintext(model, mnt)
        openbao_server.revoke_token(token)
        deadline = time.monotonic() + 6
        while True:
            try:
                with open(view, "rb") as f:
                    f.read(4096)
            except PermissionError as e:
                assert e.errno == errno.EACCES
                break
            assert time.monotonic() < deadline, "mount not locked after revocation"
            time.sleep(0.2)
        with pytest.raises(PermissionError):
            open(mnt / SHARD, "rb")
    text = log.read_text()
    assert "locked" in text and "permission denied" in text
    assert token not in text and model["keys"].to_jwks()["keys"][0]["k"] not in text


def test_server_stopped_after_mount_keeps_serving(model, openbao_factory, tmp_path):
    server = openbao_factory()
    path, policy = kv_store(server, model["jwks"])
    token = server.create_token([policy])
    log = tmp_path / "daemon.log"
    mnt = tmp_path / "mnt"
    env = base_env(VAULT_ADDR=server.addr, VAULT_TOKEN=token)
    with foreground_daemon([model["enc"], mnt, "--key-provider", "vault", "--vault-kv-path", path,
                            "--recheck", "0.3s"], log, env=env):
        server.stop()
        deadline = time.monotonic() + 10
        while "unreachable on re-check" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert_serves_plaintext(model, mnt)  # fresh opens and reads still served
    text = log.read_text()
    assert "WARNING" in text and "locked" not in text
    assert token not in text


def test_server_unreachable_at_mount_times_out_clearly(model, openbao_factory, tmp_path):
    server = openbao_factory()
    addr = server.addr
    server.stop()
    os.makedirs(tmp_path / "mnt")
    t0 = time.monotonic()
    r = ctfs("mount", model["enc"], tmp_path / "mnt", "--key-provider", "vault", "--vault-kv-path",
             "secret/ctfs/x", "--timeout", "3s",
             env=base_env(VAULT_ADDR=addr, VAULT_TOKEN="s.unreachable-secret"), check=False)
    took = time.monotonic() - t0
    assert r.returncode != 0 and not is_mounted(tmp_path / "mnt")
    assert "unreachable for 3s" in r.stderr, r.stderr
    assert "s.unreachable-secret" not in r.stderr
    assert 2.5 < took < 20
