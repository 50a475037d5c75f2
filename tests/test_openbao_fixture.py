"""Smoke tests of the OpenBao dev-server fixture (tests/openbao.py)."""
from __future__ import annotations

import os
import sys

import pytest

import hvac  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from openbao import OpenBao  # noqa: E402  (fixtures come from conftest: one server per session)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); look at its state
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_server_is_up_with_mounts(openbao_server: OpenBao) -> None:
    c = openbao_server.client()
    assert c.sys.is_initialized()
    assert not c.sys.is_sealed()
    assert c.is_authenticated()
    assert openbao_server.addr.startswith("http://127.0.0.1:")
    mounts = c.sys.list_mounted_secrets_engines()["data"]
    assert mounts["secret/"]["type"] == "kv"
    assert mounts["secret/"]["options"]["version"] == "2"
    assert mounts["transit/"]["type"] == "transit"
    assert "approle/" in c.sys.list_auth_methods()["data"]
    assert openbao_server.startup_seconds is not None
    assert openbao_server.startup_seconds < 30
    # nothing written outside the work dir: no token helper file in $HOME
    assert not (openbao_server.workdir / ".vault-token").exists()


def test_kv_v2_write_read(openbao_server: OpenBao) -> None:
    c = openbao_server.client()
    c.secrets.kv.v2.create_or_update_secret(path="ctfs/test", secret={"k": "v1"},
                                            mount_point="secret")
    c.secrets.kv.v2.create_or_update_secret(path="ctfs/test", secret={"k": "v2"},
                                            mount_point="secret")
    got = c.secrets.kv.v2.read_secret_version(path="ctfs/test", mount_point="secret",
                                              raise_on_deleted_version=True)
    assert got["data"]["data"] == {"k": "v2"}
    assert got["data"]["metadata"]["version"] == 2
    old = c.secrets.kv.v2.read_secret_version(path="ctfs/test", version=1,
                                              mount_point="secret",
                                              raise_on_deleted_version=True)
    assert old["data"]["data"] == {"k": "v1"}


def test_transit_roundtrip(openbao_server: OpenBao) -> None:
    openbao_server.create_transit_key("ctfs-smoke")
    c = openbao_server.client()
    plain = os.urandom(32)
    enc = c.secrets.transit.encrypt_data(name="ctfs-smoke", plaintext=OpenBao.b64(plain),
                                         mount_point="transit")
    ciphertext = enc["data"]["ciphertext"]
    assert ciphertext.startswith("vault:v1:")
    dec = c.secrets.transit.decrypt_data(name="ctfs-smoke", ciphertext=ciphertext,
                                         mount_point="transit")
    import base64

    assert base64.b64decode(dec["data"]["plaintext"]) == plain


def test_approle_login_and_policy(openbao_server: OpenBao) -> None:
    openbao_server.create_policy(
        "ctfs-read", 'path "secret/data/ctfs/*" { capabilities = ["read"] }')
    root = openbao_server.client()
    root.secrets.kv.v2.create_or_update_secret(path="ctfs/app", secret={"x": "1"})
    role_id, secret_id = openbao_server.create_approle("ctfs-app", ["ctfs-read"],
                                                       token_ttl="10m")
    token = openbao_server.approle_login(role_id, secret_id)
    app = openbao_server.client(token)
    assert app.is_authenticated()
    looked = app.auth.token.lookup_self()["data"]
    assert "ctfs-read" in looked["policies"]
    assert 0 < looked["ttl"] <= 600
    assert app.secrets.kv.v2.read_secret_version(
        path="ctfs/app", raise_on_deleted_version=True)["data"]["data"] == {"x": "1"}
    with pytest.raises(hvac.exceptions.Forbidden):  # policy allows read only
        app.secrets.kv.v2.create_or_update_secret(path="ctfs/app", secret={"x": "2"})


def test_token_ttl_and_revoke(openbao_server: OpenBao) -> None:
    token = openbao_server.create_policy_token(
        "ctfs-kv-rw", 'path "secret/data/ctfs/*" { capabilities = ["create", "update", "read"] }',
        ttl="90s")
    c = openbao_server.client(token)
    info = c.auth.token.lookup_self()["data"]
    assert 0 < info["ttl"] <= 90
    c.secrets.kv.v2.create_or_update_secret(path="ctfs/rev", secret={"a": "b"})
    openbao_server.revoke_token(token)
    with pytest.raises(hvac.exceptions.Forbidden):
        c.secrets.kv.v2.read_secret_version(path="ctfs/rev", raise_on_deleted_version=True)
    with pytest.raises(hvac.exceptions.Forbidden):
        c.auth.token.lookup_self()


def test_restart_keeps_address_and_root_token_but_loses_state(openbao_factory) -> None:
    server: OpenBao = openbao_factory()
    first_pid = server.pid
    addr, root = server.addr, server.root_token
    c = server.client()
    c.secrets.kv.v2.create_or_update_secret(path="gone", secret={"a": "b"})
    token = server.create_token(ttl="1h")
    server.restart()
    assert (server.addr, server.root_token) == (addr, root)
    assert server.pid != first_pid and not _alive(first_pid)
    c = server.client()
    assert c.is_authenticated()
    with pytest.raises(hvac.exceptions.InvalidPath):  # in-memory: data is gone
        c.secrets.kv.v2.read_secret_version(path="gone", raise_on_deleted_version=True)
    with pytest.raises(hvac.exceptions.Forbidden):  # so are the tokens it issued
        server.client(token).auth.token.lookup_self()
    assert "transit/" in c.sys.list_mounted_secrets_engines()["data"]  # mounts re-made


def test_stop_leaves_no_process(openbao_factory) -> None:
    server: OpenBao = openbao_factory()
    pid = server.pid
    assert pid is not None and _alive(pid)
    server.stop()
    assert not server.running
    assert not _alive(pid)
    with pytest.raises(Exception):
        server.client(timeout=2).sys.is_initialized()
