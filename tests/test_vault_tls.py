"""The vault key provider against a real OpenBao listening with TLS on 127.0.0.1.

One ``bao server -dev -dev-tls`` per module (:func:`openbao.openbao_tls_server`): it makes
its own CA and a server certificate for 127.0.0.1 signed by it.  Checked for real (not
only at configuration level): ``--vault-cacert`` and ``$VAULT_CACERT``/``$BAO_CACERT``
are what the certificate is verified against; with no CA, or a CA that did not sign it,
the mount is refused at once (no retrying as if unreachable) with an error that names
the TLS verification failure and suggests ``--vault-cacert``; ``$VAULT_SKIP_VERIFY`` is
ignored; ``--vault-skip-verify`` connects and logs a warning.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from urllib3.exceptions import InsecureRequestWarning

from openbao import OpenBao, openbao_tls_server  # noqa: F401  (module-scoped fixture)
from ctfs.format.keys import KeySet
from ctfs.service import load_keys
from ctfs.auth.providers import ProviderDenied, ProviderError, ProviderUnavailable
from ctfs.auth.providers.vault import VaultProvider
from mounting import ctfs, daemon_process, foreground_daemon, is_mounted, write_secret
from test_providers import SECRET_VARS, kv_secret, same_keys, transit_setup
from test_vault_mount import (transit_key, unmount_quietly, assert_serves_plaintext, base_env, kv_store,  # noqa: F401
                              model, mounted, uniq)

VERIFY_FAILED = "CERTIFICATE_VERIFY_FAILED"
SKIP_WARNING = "--vault-skip-verify: NOT verifying the Vault server's TLS certificate"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """In-process provider tests: no VAULT_*/BAO_* (and no requests CA bundle) from outside."""
    for v in (*SECRET_VARS, "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(v, raising=False)


@pytest.fixture(scope="module")
def tls(openbao_tls_server: OpenBao) -> OpenBao:
    s = openbao_tls_server
    assert s.addr == f"https://127.0.0.1:{s.port}"
    assert os.path.isfile(s.ca_cert), "the dev server wrote no CA"
    assert s.client().sys.is_initialized()   # the fixture's own client verifies with the CA
    return s


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> str:
    """A self-signed CA (CN 127.0.0.1, IP SAN 127.0.0.1) that did NOT sign the server's cert."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    path = tmp_path_factory.mktemp("other-ca") / "other-ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def tls_env(server: OpenBao, **extra) -> dict:
    """The daemon's environment: no VAULT_*/BAO_* and no CA bundle variables from outside."""
    env = base_env(VAULT_ADDR=server.addr, **extra)
    for v in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        env.pop(v, None)
    return env


def assert_tls_refusal(text: str, server: OpenBao) -> None:
    assert f"TLS verification of {server.addr} failed" in text, text
    assert VERIFY_FAILED in text, text
    assert "use --vault-cacert" in text, text


def refused_mount(model, mnt, env, *args):
    """``ctfs mount`` that must fail; returns its CompletedProcess and the seconds it took."""
    os.makedirs(mnt)
    t0 = time.monotonic()
    try:
        r = ctfs("mount", model["enc"], mnt, "--key-provider", "vault", "--timeout", "5s", *args,
                 env=env, check=False)
    finally:
        took = time.monotonic() - t0
        mounted_anyway = is_mounted(mnt)
        unmount_quietly(mnt)                # never leave a mount behind, even when the test fails
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert not mounted_anyway
    assert not is_mounted(mnt) and os.listdir(mnt) == []
    with pytest.raises(LookupError):
        daemon_process(mnt)          # no daemon left behind
    assert "unreachable" not in r.stderr, r.stderr   # refused, not retried as "unreachable"
    assert took < 5, f"a TLS refusal must not be retried ({took:.1f}s)"
    return r


# --- real mounts ------------------------------------------------------------------------------
def test_mount_with_cacert_flag(model, tls, tmp_path):
    path, policy = kv_store(tls, model["jwks"])
    token = tls.create_token([policy])
    with mounted(model["enc"], tmp_path / "mnt", "--key-provider", "vault", "--vault-kv-path", path,
                 "--vault-cacert", tls.ca_cert, env=tls_env(tls, VAULT_TOKEN=token)) as mnt:
        assert_serves_plaintext(model, mnt)   # sha256 of the served data == the plaintext's


def test_mount_without_ca_is_refused(model, tls, tmp_path):
    path, policy = kv_store(tls, model["jwks"])
    token = tls.create_token([policy])
    env = tls_env(tls, VAULT_TOKEN=token)
    assert not any(k.endswith("_CACERT") for k in env)
    r = refused_mount(model, tmp_path / "mnt", env, "--vault-kv-path", path)
    assert_tls_refusal(r.stderr, tls)
    assert token not in r.stderr


def test_mount_with_unrelated_ca_is_refused(model, tls, other_ca, tmp_path):
    path, policy = kv_store(tls, model["jwks"])
    token = tls.create_token([policy])
    r = refused_mount(model, tmp_path / "mnt", tls_env(tls, VAULT_TOKEN=token),
                      "--vault-kv-path", path, "--vault-cacert", other_ca)
    assert_tls_refusal(r.stderr, tls)
    assert token not in r.stderr


def test_mount_with_vault_cacert_env_transit(model, tls, tmp_path):
    """$VAULT_CACERT instead of the flag, for vault-wrap and for a Transit-wrapped mount."""
    name = uniq("wrapped")
    key, token = transit_key(tls, f'path "secret/data/ctfs/{name}" '
                               f'{{ capabilities = ["read", "create", "update"] }}\n')
    env = tls_env(tls, VAULT_TOKEN=token, VAULT_CACERT=tls.ca_cert)
    ctfs("vault-wrap", model["key_file"], "--transit-key", key, "--kv-path", f"secret/ctfs/{name}",
         env=env)
    stored = tls.client().secrets.kv.v2.read_secret_version(
        path=f"ctfs/{name}", mount_point="secret", raise_on_deleted_version=True)
    assert stored["data"]["data"]["ciphertext"].startswith("{")   # the vault-wrap document
    with mounted(model["enc"], tmp_path / "mnt", "--key-provider", "vault", "--vault-kv-path",
                 f"secret/ctfs/{name}", "--vault-transit-key", key, env=env) as mnt:
        assert_serves_plaintext(model, mnt)


def test_mount_with_skip_verify_warns(model, tls, tmp_path):
    path, policy = kv_store(tls, model["jwks"])
    token = tls.create_token([policy])
    log = tmp_path / "daemon.log"
    mnt = tmp_path / "mnt"
    with foreground_daemon([model["enc"], mnt, "--key-provider", "vault", "--vault-kv-path", path,
                            "--vault-skip-verify"], log, env=tls_env(tls, VAULT_TOKEN=token)):
        assert_serves_plaintext(model, mnt)
    text = log.read_text()
    warning = [ln for ln in text.splitlines() if SKIP_WARNING in ln]
    assert len(warning) == 1 and " WARNING " in warning[0], text
    assert VERIFY_FAILED not in text and token not in text


def test_background_mount_prints_startup_warnings(model, tls, tmp_path):
    """Without --foreground (stderr not a TTY) the daemon's stderr goes to /dev/null once it
    serves; the warnings it logged while starting are printed by `ctfs mount` itself."""
    path, policy = kv_store(tls, model["jwks"])
    token = tls.create_token([policy])
    mnt = tmp_path / "mnt"
    os.makedirs(mnt)
    try:
        r = ctfs("mount", model["enc"], mnt, "--key-provider", "vault", "--vault-kv-path", path,
                 "--vault-skip-verify", env=tls_env(tls, VAULT_TOKEN=token))
        assert_serves_plaintext(model, mnt)
    finally:
        unmount_quietly(mnt)
    warning = [ln for ln in r.stderr.splitlines() if SKIP_WARNING in ln]
    assert len(warning) == 1 and " WARNING " in warning[0], r.stderr
    # only warnings are forwarded, not the daemon's INFO lines (e.g. "authorised N file(s)")
    assert token not in r.stderr and "authorised" not in r.stderr, r.stderr


# --- the provider in-process (cheap: no daemon) -----------------------------------------------
@pytest.fixture(scope="module")
def keys() -> KeySet:
    return KeySet.generate(name="tls")


def test_provider_kv_verify_matrix(tls, keys, other_ca, tmp_path, monkeypatch, caplog):
    path, policy = kv_secret(tls, keys)
    tok = write_secret(tmp_path / "tok", tls.create_token([policy]))

    def provider(**kw) -> VaultProvider:
        return VaultProvider(vault_addr=tls.addr, vault_token_file=tok, vault_kv_path=path, **kw)

    def loads(p: VaultProvider) -> None:
        try:
            got = p.load()
            assert same_keys(got, keys) and got.source == f"vault kv:{path}"
            p.check()
        finally:
            p.close()

    def refused(p: VaultProvider, timeout: float = 30.0) -> str:
        t0 = time.monotonic()
        with pytest.raises(ProviderError) as ei:
            load_keys(p, timeout)      # what the mount does: retries only ProviderUnavailable
        p.close()
        assert time.monotonic() - t0 < 5, "a TLS refusal must not be retried"
        assert not isinstance(ei.value, (ProviderUnavailable, ProviderDenied)), ei.value
        assert ei.value.__cause__ is None and ei.value.__suppress_context__
        msg = str(ei.value)
        assert msg.startswith("Vault token lookup: "), msg
        assert_tls_refusal(msg, tls)
        return msg

    loads(provider(vault_cacert=tls.ca_cert))
    refused(provider())                                   # system/certifi roots only
    refused(provider(vault_cacert=other_ca))
    monkeypatch.setenv("VAULT_SKIP_VERIFY", "1")          # ignored: verification stays on
    with caplog.at_level("WARNING", logger="ctfs.providers.vault"):
        refused(provider())
    assert "$VAULT_SKIP_VERIFY is ignored" in caplog.text
    monkeypatch.delenv("VAULT_SKIP_VERIFY")
    monkeypatch.setenv("BAO_CACERT", tls.ca_cert)         # env CA, Bao spelling
    loads(provider())
    monkeypatch.setenv("VAULT_CACERT", other_ca)          # VAULT_ wins over BAO_
    refused(provider())
    loads(provider(vault_cacert=tls.ca_cert))             # the flag wins over the env
    monkeypatch.delenv("VAULT_CACERT")
    monkeypatch.delenv("BAO_CACERT")
    caplog.clear()
    with caplog.at_level("WARNING", logger="ctfs.providers.vault"), \
            pytest.warns(InsecureRequestWarning):    # requests really went out unverified
        loads(provider(vault_skip_verify=True))
        loads(provider(vault_skip_verify=True, vault_cacert=other_ca))  # skip beats a wrong CA
    assert caplog.text.count(SKIP_WARNING) == 2, caplog.text


def test_provider_approle_and_transit_over_tls(tls, keys, tmp_path):
    """AppRole login and Transit wrap/decrypt go through the same verified client."""
    key, policy = transit_setup(tls)
    role_id, secret_id = tls.create_approle(uniq("role"), [policy])
    sid = write_secret(tmp_path / "sid", secret_id)
    w = VaultProvider(vault_addr=tls.addr, vault_cacert=tls.ca_cert, vault_role_id=role_id,
                      vault_secret_id_file=sid, require_storage=False)
    try:
        doc = w.wrap(json.dumps(keys.to_jwks()).encode(), key)
    finally:
        w.close()
    wrapped = tmp_path / "keys.vault"
    wrapped.write_text(doc)
    p = VaultProvider(vault_addr=tls.addr, vault_cacert=tls.ca_cert, vault_role_id=role_id,
                      vault_secret_id_file=sid, vault_transit_file=str(wrapped))
    try:
        got = p.load()
        assert same_keys(got, keys) and got.source == f"vault transit:{key}"
    finally:
        p.close()
    p = VaultProvider(vault_addr=tls.addr, vault_role_id=role_id, vault_secret_id_file=sid,
                      vault_transit_file=str(wrapped))
    with pytest.raises(ProviderError) as ei:
        p.load()
    p.close()
    assert not isinstance(ei.value, ProviderUnavailable)
    assert str(ei.value).startswith("Vault AppRole login: "), ei.value
    assert_tls_refusal(str(ei.value), tls)
    assert secret_id not in str(ei.value)
