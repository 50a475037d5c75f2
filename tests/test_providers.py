"""Key providers against a real OpenBao dev server: vault (KV v2 / Transit; token, token
file, AppRole), systemd-creds, env, entry-point discovery, and the error contract
(ProviderDenied on a definite no, ProviderUnavailable when the server cannot be reached)."""
from __future__ import annotations

import json
import os
import pathlib
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


from openbao import OpenBao  # noqa: E402  (fixtures come from conftest: one server per session)

from ctfs.errors import CtfsError  # noqa: E402
from ctfs.format.keys import KeySet  # noqa: E402
from ctfs.service import load_keys  # noqa: E402
from ctfs.auth.providers import (ProviderDenied, ProviderError, ProviderUnavailable,  # noqa: E402
                            available, forget_env, get_provider)
from ctfs.auth.providers.vault import VaultProvider, parse_wrapped, wrap_file  # noqa: E402
from mounting import write_secret  # noqa: E402

SECRET_VARS = ("VAULT_TOKEN", "BAO_TOKEN", "VAULT_SECRET_ID", "BAO_SECRET_ID", "VAULT_ADDR",
               "BAO_ADDR", "VAULT_NAMESPACE", "BAO_NAMESPACE", "VAULT_CACERT", "BAO_CACERT",
               "VAULT_SKIP_VERIFY", "CREDENTIALS_DIRECTORY", "CRYPTOTENSOR_KEYS")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for v in SECRET_VARS:
        monkeypatch.delenv(v, raising=False)


@pytest.fixture(scope="module")
def keys():
    return KeySet.generate(name="prov")


def same_keys(a: KeySet, b: KeySet) -> bool:
    return a.to_jwks() == b.to_jwks()


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def kv_secret(server: OpenBao, keys: KeySet, *, field: str = "jwks") -> tuple[str, str]:
    """Store the JWK set in KV v2; returns (kv path for the provider, policy name)."""
    name = uniq("m")
    server.client().secrets.kv.v2.create_or_update_secret(
        path=f"ctfs/{name}", secret={field: json.dumps(keys.to_jwks())}, mount_point="secret")
    policy = uniq("read")
    server.create_policy(policy, f'path "secret/data/ctfs/{name}" {{ capabilities = ["read"] }}')
    return f"secret/ctfs/{name}", policy


def transit_setup(server: OpenBao) -> tuple[str, str]:
    """A transit key and a policy that may encrypt and decrypt with it."""
    key = uniq("tk")
    server.create_transit_key(key)
    policy = uniq("transit")
    server.create_policy(policy, textwrap.dedent(f"""
        path "transit/decrypt/{key}" {{ capabilities = ["update"] }}
        path "transit/encrypt/{key}" {{ capabilities = ["update"] }}
    """))
    return key, policy


def dead_addr() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# --- vault: KV v2 --------------------------------------------------------------------------
def test_kv_token_from_env_is_removed_and_never_shown(openbao_server, keys, monkeypatch):
    path, policy = kv_secret(openbao_server, keys)
    token = openbao_server.create_token([policy])
    monkeypatch.setenv("VAULT_ADDR", openbao_server.addr)
    monkeypatch.setenv("VAULT_TOKEN", token)
    p = get_provider("vault", vault_kv_path=path)
    try:
        assert "VAULT_TOKEN" not in os.environ
        assert token not in repr(p) and path in repr(p)
        got = p.load()
        assert same_keys(got, keys) and got.source == f"vault kv:{path}"
        assert token not in repr(got)
        p.check()
    finally:
        p.close()


def test_bao_env_equivalents_and_secret_data_as_jwks(openbao_server, keys, monkeypatch):
    name = uniq("whole")
    openbao_server.client().secrets.kv.v2.create_or_update_secret(
        path=f"ctfs/{name}", secret=keys.to_jwks(), mount_point="secret")  # data *is* the set
    monkeypatch.setenv("BAO_ADDR", openbao_server.addr)
    monkeypatch.setenv("BAO_TOKEN", openbao_server.root_token)
    p = VaultProvider(vault_kv_path=f"secret/ctfs/{name}")
    try:
        assert "BAO_TOKEN" not in os.environ
        assert same_keys(p.load(), keys)
    finally:
        p.close()


def test_kv_field_option_and_missing_field(openbao_server, keys, monkeypatch):
    path, policy = kv_secret(openbao_server, keys, field="material")
    token = openbao_server.create_token([policy])
    monkeypatch.setenv("VAULT_ADDR", openbao_server.addr)
    monkeypatch.setenv("VAULT_TOKEN", token)
    p = VaultProvider(vault_kv_path=path)
    with pytest.raises(ProviderError, match=r"no field 'jwks' \(fields: material\)"):
        p.load()
    p.close()
    p = VaultProvider(vault_kv_path=path.split("/", 1)[1], vault_kv_mount="secret",
                      vault_kv_field="material", vault_addr=openbao_server.addr,
                      vault_token_file=write_secret(
                          os.path.join(os.environ.get("TMPDIR", "/tmp"), uniq("tok")), token))
    try:
        assert same_keys(p.load(), keys)
    finally:
        p.close()
        os.unlink(p.token_file)


def test_revoked_token_and_removed_policy_are_denied(openbao_server, keys, monkeypatch):
    path, policy = kv_secret(openbao_server, keys)
    monkeypatch.setenv("VAULT_ADDR", openbao_server.addr)
    t1 = openbao_server.create_token([policy])
    monkeypatch.setenv("VAULT_TOKEN", t1)
    p = VaultProvider(vault_kv_path=path)
    p.load()
    openbao_server.revoke_token(t1)
    with pytest.raises(ProviderDenied, match="permission denied") as ei:
        p.check()
    assert t1 not in str(ei.value)
    p.close()

    t2 = openbao_server.create_token([policy])
    monkeypatch.setenv("VAULT_TOKEN", t2)
    p = VaultProvider(vault_kv_path=path)
    p.load()
    openbao_server.client().sys.delete_policy(policy)
    with pytest.raises(ProviderDenied, match="permission denied"):
        p.check()
    p.close()


def test_token_without_default_policy(openbao_server, keys, tmp_path):
    path, policy = kv_secret(openbao_server, keys)
    token = openbao_server.create_token([policy], no_default_policy=True)  # no lookup-self
    p = VaultProvider(vault_addr=openbao_server.addr, vault_kv_path=path,
                      vault_token_file=write_secret(tmp_path / "t", token))
    try:
        assert same_keys(p.load(), keys)
        openbao_server.revoke_token(token)
        with pytest.raises(ProviderDenied):
            p.check()
    finally:
        p.close()


def test_token_file_is_followed_when_rotated(openbao_server, keys, tmp_path):
    path, policy = kv_secret(openbao_server, keys)
    a, b = openbao_server.create_token([policy]), openbao_server.create_token([policy])
    tf = write_secret(tmp_path / "sink", a)
    p = VaultProvider(vault_addr=openbao_server.addr, vault_token_file=tf, vault_kv_path=path)
    try:
        assert same_keys(p.load(), keys)
        write_secret(tf, b)           # Vault Agent wrote a new token
        openbao_server.revoke_token(a)
        p.check()                      # follows the file: still authorised
        openbao_server.revoke_token(b)
        with pytest.raises(ProviderDenied):
            p.check()
    finally:
        p.close()


def test_approle_secret_id_from_file_and_env(openbao_server, keys, tmp_path, monkeypatch):
    path, policy = kv_secret(openbao_server, keys)
    role_id, secret_id = openbao_server.create_approle(uniq("role"), [policy])
    sid = write_secret(tmp_path / "sid", secret_id)
    p = VaultProvider(vault_addr=openbao_server.addr, vault_role_id=role_id,
                      vault_secret_id_file=sid, vault_kv_path=path)
    try:
        assert same_keys(p.load(), keys)
        assert secret_id not in repr(p)
        p.check()
    finally:
        p.close()

    monkeypatch.setenv("VAULT_SECRET_ID", secret_id)
    p = VaultProvider(vault_addr=openbao_server.addr, vault_role_id=role_id, vault_kv_path=path)
    try:
        assert "VAULT_SECRET_ID" not in os.environ
        assert same_keys(p.load(), keys)
    finally:
        p.close()

    p = VaultProvider(vault_addr=openbao_server.addr, vault_role_id=role_id,
                      vault_secret_id_file=write_secret(tmp_path / "bad", "not-the-secret-id"),
                      vault_kv_path=path)
    with pytest.raises(ProviderDenied, match="AppRole login") as ei:
        p.load()
    assert "not-the-secret-id" not in str(ei.value)


# --- vault: Transit --------------------------------------------------------------------
def test_transit_file_wrap_load_and_decrypt_refused(openbao_server, keys, tmp_path):
    key, policy = transit_setup(openbao_server)
    token = openbao_server.create_token([policy])
    jwk = write_secret(tmp_path / "keys.jwk", json.dumps(keys.to_jwks()))
    out = tmp_path / "model.keys.vault"
    wrapper = VaultProvider(vault_addr=openbao_server.addr, require_storage=False,
                            vault_token_file=write_secret(tmp_path / "tok", token))
    wrap_file(wrapper, jwk, str(out), key)
    wrapper.close()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    text = out.read_text()
    assert keys.to_jwks()["keys"][0]["k"] not in text
    ct, kname, mount = parse_wrapped(text, "x")
    assert ct.startswith("vault:v1:") and kname == key and mount == "transit"

    p = VaultProvider(vault_addr=openbao_server.addr, vault_token_file=str(tmp_path / "tok"),
                      vault_transit_file=str(out), vault_transit_key=key)
    try:
        got = p.load()
        assert same_keys(got, keys) and got.source == f"vault transit:{key}"
        p.check()
        # decrypt taken away (encrypt still allowed): a definite no
        openbao_server.create_policy(policy, f'path "transit/encrypt/{key}" {{ capabilities = ["update"] }}')
        with pytest.raises(ProviderDenied, match="transit decrypt"):
            p.check()
    finally:
        p.close()


def test_transit_ciphertext_at_kv_path(openbao_server, keys, tmp_path):
    key, policy = transit_setup(openbao_server)
    name = uniq("wrapped")
    openbao_server.create_policy(policy + "-kv", textwrap.dedent(f"""
        path "secret/data/ctfs/{name}" {{ capabilities = ["read", "create", "update"] }}
    """))
    token = openbao_server.create_token([policy, policy + "-kv"])
    tok = write_secret(tmp_path / "tok", token)
    w = VaultProvider(vault_addr=openbao_server.addr, vault_token_file=tok, require_storage=False)
    w.store_kv(w.wrap(json.dumps(keys.to_jwks()).encode(), key), f"secret/ctfs/{name}")
    w.close()
    stored = openbao_server.client().secrets.kv.v2.read_secret_version(
        path=f"ctfs/{name}", mount_point="secret", raise_on_deleted_version=True)["data"]["data"]
    assert keys.to_jwks()["keys"][0]["k"] not in json.dumps(stored)
    p = VaultProvider(vault_addr=openbao_server.addr, vault_token_file=tok,
                      vault_kv_path=f"secret/ctfs/{name}", vault_transit_key=key)
    try:
        assert same_keys(p.load(), keys)
        p.check()
        openbao_server.client().secrets.transit.update_key_configuration(
            name=key, deletion_allowed=True, mount_point="transit")
        openbao_server.client().secrets.transit.delete_key(name=key, mount_point="transit")
        with pytest.raises(ProviderDenied):
            p.check()
    finally:
        p.close()


def test_vault_wrap_cli(openbao_server, keys, tmp_path):
    key, policy = transit_setup(openbao_server)
    token = openbao_server.create_token([policy])
    jwk = write_secret(tmp_path / "keys.jwk", json.dumps(keys.to_jwks()))
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS}
    env.update(VAULT_ADDR=openbao_server.addr, VAULT_TOKEN=token)
    out = tmp_path / "w.vault"
    r = subprocess.run([sys.executable, "-m", "ctfs.cli", "vault-wrap", jwk, str(out),
                        "--transit-key", key], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert token not in r.stderr
    p = VaultProvider(vault_addr=openbao_server.addr, vault_token_file=write_secret(tmp_path / "t", token),
                      vault_transit_file=str(out))   # key name taken from the file
    try:
        assert same_keys(p.load(), keys)
    finally:
        p.close()
    r = subprocess.run([sys.executable, "-m", "ctfs.cli", "vault-wrap", jwk, str(out),
                        "--transit-key", key], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "exists" in r.stderr


# --- vault: availability, leases, renewal ---------------------------------------------------
def test_unreachable_is_unavailable_and_load_keys_gives_up(keys, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", "s.not-a-real-token")
    p = VaultProvider(vault_addr=dead_addr(), vault_kv_path="secret/x")
    with pytest.raises(ProviderUnavailable, match="unreachable") as ei:
        p.load()
    assert "not-a-real-token" not in str(ei.value)
    t0 = time.monotonic()
    with pytest.raises(CtfsError, match=r"unreachable for 1s"):
        load_keys(p, 1.0)
    assert 0.9 < time.monotonic() - t0 < 5


def test_server_gone_after_load_unavailable_then_lease_ended_denied(openbao_factory, keys):
    server = openbao_factory()
    path, policy = kv_secret(server, keys)
    token = server.create_token([policy], ttl="3s", renewable=False)
    p = VaultProvider(vault_addr=server.addr, vault_kv_path=path,
                      vault_token_file=write_secret(server.workdir / "tok", token))
    try:
        p.load()
        server.stop()
        with pytest.raises(ProviderUnavailable):
            p.check()                      # cannot tell: keep serving
        time.sleep(max(0.0, p.lease_remaining()) + 0.2)
        with pytest.raises(ProviderDenied, match="lease has ended"):
            p.check()
    finally:
        p.close()


def test_renewable_token_is_renewed_in_background(openbao_server, keys, tmp_path):
    path, policy = kv_secret(openbao_server, keys)
    token = openbao_server.create_token([policy], ttl="2s", explicit_max_ttl="1h")
    p = VaultProvider(vault_addr=openbao_server.addr, vault_kv_path=path,
                      vault_token_file=write_secret(tmp_path / "tok", token))
    try:
        p.load()
        assert any(t.name == "ctfs-vault-renew" for t in threading.enumerate())
        time.sleep(2.6)                    # past the original TTL
        p.check()                          # still valid: it was renewed at ~1.3 s
        assert p.lease_remaining() > 0
    finally:
        p.close()
    assert not any(t.name == "ctfs-vault-renew" and t.is_alive() for t in threading.enumerate())


def test_approle_logs_in_again_when_max_ttl_caps_renewal(openbao_server, keys, tmp_path):
    path, policy = kv_secret(openbao_server, keys)
    role_id, secret_id = openbao_server.create_approle(uniq("role"), [policy], token_ttl="2s",
                                                       token_max_ttl="3s")
    p = VaultProvider(vault_addr=openbao_server.addr, vault_role_id=role_id, vault_kv_path=path,
                      vault_secret_id_file=write_secret(tmp_path / "sid", secret_id))
    try:
        p.load()
        first = p._token
        deadline = time.monotonic() + 5    # the renewer logs in again around the max TTL
        while p._token == first:
            assert time.monotonic() < deadline, "no fresh AppRole login"
            time.sleep(0.1)
        assert p.lease_remaining() > 0
        p.check()
    finally:
        p.close()


def test_hvac_error_text_is_scrubbed(openbao_server, monkeypatch):
    import hvac.exceptions
    monkeypatch.setenv("VAULT_TOKEN", "hvs.SECRETVALUE123")
    p = VaultProvider(vault_addr=openbao_server.addr, vault_kv_path="secret/x")

    def boom():
        raise hvac.exceptions.Forbidden(errors=["token hvs.SECRETVALUE123 is bad"], method="get",
                                        url="http://x/v1/auth/token/lookup-self")
    with pytest.raises(ProviderDenied) as ei:
        p._call("lookup", boom)
    assert "SECRETVALUE" not in str(ei.value) and "***" in str(ei.value)
    assert ei.value.__cause__ is None and ei.value.__suppress_context__


def test_tls_and_config_errors(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("VAULT_TOKEN", "t")
    monkeypatch.setenv("VAULT_ADDR", "https://vault.example:8200")
    assert VaultProvider(vault_kv_path="secret/x").verify is True
    monkeypatch.setenv("VAULT_TOKEN", "t")
    monkeypatch.setenv("VAULT_CACERT", "/etc/ca.pem")
    monkeypatch.setenv("VAULT_SKIP_VERIFY", "1")
    assert VaultProvider(vault_kv_path="secret/x").verify == "/etc/ca.pem"  # env skip ignored
    monkeypatch.setenv("VAULT_TOKEN", "t")
    with caplog.at_level("WARNING"):
        assert VaultProvider(vault_kv_path="secret/x", vault_skip_verify=True).verify is False
    assert "NOT verifying" in caplog.text
    monkeypatch.delenv("VAULT_ADDR")
    with pytest.raises(ProviderError, match="VAULT_ADDR"):
        VaultProvider(vault_kv_path="secret/x")
    with pytest.raises(ProviderError, match="no Vault credentials"):
        VaultProvider(vault_addr="http://127.0.0.1:1", vault_kv_path="secret/x")
    with pytest.raises(ProviderError, match="secret id"):
        VaultProvider(vault_addr="http://127.0.0.1:1", vault_kv_path="secret/x", vault_role_id="r")
    monkeypatch.setenv("VAULT_TOKEN", "t")
    with pytest.raises(ProviderError, match="--vault-kv-path"):
        VaultProvider(vault_addr="http://127.0.0.1:1")
    assert "VAULT_TOKEN" not in os.environ  # removed even though construction failed


# --- systemd-creds, env ----------------------------------------------------------------------
def test_systemd_creds_provider(keys, tmp_path, monkeypatch):
    with pytest.raises(ProviderError, match=r"CREDENTIALS_DIRECTORY is not set"):
        get_provider("systemd-creds").load()
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with pytest.raises(ProviderError, match=r"credential 'ctfs-keys' not found .*available: none"):
        get_provider("systemd-creds").load()
    write_secret(creds / "ctfs-keys", json.dumps(keys.to_jwks()))
    write_secret(creds / "other", json.dumps(KeySet.generate().to_jwks()))
    assert same_keys(get_provider("systemd-creds").load(), keys)
    assert not same_keys(get_provider("systemd-creds", credential="other").load(), keys)
    with pytest.raises(ProviderError, match=r"'nope' not found .*available: ctfs-keys, other"):
        get_provider("systemd-creds", credential="nope").load()


def test_vault_token_and_secret_id_from_credentials(openbao_server, keys, tmp_path, monkeypatch):
    path, policy = kv_secret(openbao_server, keys)
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    write_secret(creds / "vault-token", openbao_server.create_token([policy]))
    p = get_provider("vault", vault_addr=openbao_server.addr, vault_kv_path=path,
                     vault_token_credential="vault-token")
    try:
        assert same_keys(p.load(), keys)
    finally:
        p.close()
    role_id, secret_id = openbao_server.create_approle(uniq("role"), [policy])
    write_secret(creds / "sid", secret_id)
    p = get_provider("vault", vault_addr=openbao_server.addr, vault_kv_path=path,
                     vault_role_id=role_id, vault_secret_id_credential="sid")
    try:
        assert same_keys(p.load(), keys)
    finally:
        p.close()
    with pytest.raises(ProviderError, match="'missing' not found"):
        get_provider("vault", vault_addr=openbao_server.addr, vault_kv_path=path,
                     vault_token_credential="missing")


def test_env_provider_scrubs_initial_environment(keys):
    code = textwrap.dedent("""
        import os, sys
        from ctfs.auth.providers import get_provider
        p = get_provider("env")
        ks = p.load()
        print(len(ks.master), "CRYPTOTENSOR_KEYS" in os.environ,
              sys.argv[1].encode() in open("/proc/self/environ", "rb").read())
    """)
    k = keys.to_jwks()["keys"][0]["k"]
    env = {**os.environ, "CRYPTOTENSOR_KEYS": json.dumps(keys.to_jwks())}
    r = subprocess.run([sys.executable, "-c", code, k], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.split() == ["1", "False", "False"], r.stderr


def test_forget_env(monkeypatch):
    monkeypatch.setenv("CTFS_TEST_SECRET", "v")
    assert forget_env("CTFS_TEST_SECRET", "CTFS_TEST_ABSENT") == {"CTFS_TEST_SECRET": "v"}
    assert "CTFS_TEST_SECRET" not in os.environ


# --- entry points ------------------------------------------------------------------------
def test_builtin_providers_registered_as_entry_points():
    from importlib import metadata
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="ctfs.key_providers")}
    assert {"file", "env", "vault", "systemd-creds"} <= set(eps)
    assert eps["vault"] == "ctfs.auth.providers.vault:VaultProvider"
    assert set(available()) >= {"file", "env", "vault", "systemd-creds"}


def test_stale_ctfs_metadata_never_replaces_a_builtin(tmp_path):
    """Installed metadata of another ctfs version (an editable install of an older tree)
    naming built-in providers elsewhere does not break them; the code's own table wins."""
    site = tmp_path / "site"
    (site / "ctfs-0.0.1.dist-info").mkdir(parents=True)
    (site / "ctfs-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ctfs\nVersion: 0.0.1\n")
    (site / "ctfs-0.0.1.dist-info" / "entry_points.txt").write_text(
        "[ctfs.key_providers]\nfile = ctfs.providers:FileProvider\nextra = ctfs_extra:Extra\n")
    code = ("from importlib import metadata\n"
            "from ctfs.auth.providers import available, provider_class\n"
            "eps = {ep.name: ep.value for ep in metadata.entry_points(group='ctfs.key_providers')}\n"
            "assert eps['file'] == 'ctfs.providers:FileProvider', eps\n"
            "print(available()['file'], available()['extra'], provider_class('file').__name__)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    # cwd: not the repository, whose ctfs.egg-info (an editable install) would come first
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ctfs.auth.providers:FileProvider", "ctfs_extra:Extra", "FileProvider"]


def test_site_provider_found_through_entry_point_metadata(tmp_path, keys):
    site = tmp_path / "site"
    (site / "ctfs_site_provider-1.0.dist-info").mkdir(parents=True)
    (site / "ctfs_site_provider-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: ctfs-site-provider\nVersion: 1.0\n")
    (site / "ctfs_site_provider-1.0.dist-info" / "entry_points.txt").write_text(
        "[ctfs.key_providers]\nsite-hsm = ctfs_site_provider:HsmProvider\n")
    (site / "ctfs_site_provider.py").write_text(textwrap.dedent(f"""
        from ctfs.format.keys import KeySet
        class HsmProvider:
            name = "site-hsm"
            def __init__(self, **options):
                self.options = options
            def load(self):
                return KeySet.from_json({json.dumps(json.dumps(keys.to_jwks()))}, source="hsm")
    """))
    code = textwrap.dedent("""
        from ctfs.auth.providers import available, get_provider
        assert available()["site-hsm"] == "ctfs_site_provider:HsmProvider"
        p = get_provider("site-hsm", slot=3)
        print(p.options["slot"], p.load().master[0].kid)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["3", keys.master[0].kid]
    r = subprocess.run([sys.executable, "-c", "from ctfs.auth.providers import get_provider; get_provider('nope')"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "unknown key provider 'nope'" in r.stderr and "site-hsm" not in r.stderr
