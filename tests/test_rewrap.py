"""Key rotation: data keys re-wrapped, header re-signed, tensor bytes untouched."""
from __future__ import annotations

import hashlib
import os
import time

import cryptotensors
import pytest
import torch
from safetensors.torch import save_file

from conftest import jwk_pair
from ctfs import errors
from ctfs.format.header import read_header_path
from ctfs.format.keys import KeySet
from ctfs.format.reader import CryptoFile
from ctfs.format.rewrap import journal_path, recover, rewrap_file
from ctfs.format.writer import EncryptOptions, encrypt_file
from mounting import ctfs, write_keys


def data_sha(path) -> str:
    h = read_header_path(path)
    with open(path, "rb") as f:
        f.seek(h.data_start)
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def enc(tmp_path):
    g = torch.Generator().manual_seed(0)
    ts = {"w": torch.randn(256, 256, generator=g), "b": torch.randn(256, generator=g).half(),
          "plain": torch.arange(100)}
    save_file(ts, str(tmp_path / "p.safetensors"), metadata={"format": "pt"})
    old = KeySet.generate(name="old")
    encrypt_file(str(tmp_path / "p.safetensors"), str(tmp_path / "e.safetensors"), old,
                 EncryptOptions(chunk_size=4096, exclude=["plain"]))
    return tmp_path, ts, old


def test_rewrap_in_place_keeps_data_and_reference_loads(enc):
    d, ts, old = enc
    f = str(d / "e.safetensors")
    before = data_sha(f)
    size = os.path.getsize(f)
    new = KeySet.generate(name="a-much-longer-new-key-name")
    assert rewrap_file(f, old, new) == {"file": f, "mode": "in-place"}
    assert data_sha(f) == before and os.path.getsize(f) == size
    with pytest.raises(errors.KeyNotFoundError, match="old-enc"):
        CryptoFile(f, old)  # the old keys no longer open it
    with CryptoFile(f, new) as cf:
        assert cf.crypto.enc.kid == "a-much-longer-new-key-name-enc"
        for k, t in ts.items():
            assert bytes(cf.tensor_bytes(k)) == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    enc_k, sig_k = jwk_pair(new)
    with cryptotensors.safe_open(f, "pt", config={"enc_key": enc_k, "sign_key": sig_k}) as r:
        for k, t in ts.items():
            assert torch.equal(r.get_tensor(k), t)
    # a rerun is harmless
    assert rewrap_file(f, old, new)["mode"] == "unchanged"


def test_interrupted_rewrap_is_completed(enc, monkeypatch):
    d, ts, old = enc
    f = str(d / "e.safetensors")
    new = KeySet.generate(name="new")
    import ctfs.format.rewrap as rw
    real = rw._overwrite_header
    monkeypatch.setattr(rw, "_overwrite_header", lambda p, h: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        rewrap_file(f, old, new)
    assert os.path.exists(journal_path(f))
    with CryptoFile(f, old):  # still the old header: nothing half-written
        pass
    monkeypatch.setattr(rw, "_overwrite_header", real)
    assert recover(f) and not os.path.exists(journal_path(f))
    with CryptoFile(f, new):
        pass


def test_rewrap_time_does_not_depend_on_model_size(tmp_path):
    keys = KeySet.generate(name="k")
    times = {}
    for mib in (1, 256):
        p = tmp_path / f"p{mib}.safetensors"
        save_file({"w": torch.zeros(mib << 18)}, str(p))
        e = str(tmp_path / f"e{mib}.safetensors")
        encrypt_file(str(p), e, keys)
        os.unlink(p)
        before = data_sha(e)
        t0 = time.perf_counter()
        assert rewrap_file(e, keys, KeySet.generate(name="n"))["mode"] == "in-place"
        times[mib] = time.perf_counter() - t0
        assert data_sha(e) == before
    print(f"rewrap 1 MiB: {times[1]:.3f}s, 256 MiB: {times[256]:.3f}s")
    # 256x the data; a copy would take >= 0.1 s here. Allow generous noise.
    assert times[256] < max(0.5, 20 * times[1])


def test_cli_rewrap_directory(enc, tmp_path):
    d, ts, old = enc
    model = tmp_path / "model"
    model.mkdir()
    os.replace(d / "e.safetensors", model / "model.safetensors")
    (model / "config.json").write_text("{}")
    old_f = write_keys(old, tmp_path / "old.jwk")
    new = KeySet.generate(name="rot")
    new_f = write_keys(new, tmp_path / "new.jwk")
    p = ctfs("rewrap", model, "--key-file", old_f, "--new-key-file", new_f)
    assert "1 in-place" in p.stderr
    ctfs("verify", model, "--key-file", new_f)
    bad = ctfs("verify", model, "--key-file", old_f, check=False)
    assert bad.returncode == 1 and "old-enc" in bad.stderr


def test_rewrap_refuses_other_algorithm(enc):
    d, ts, old = enc
    from ctfs.format.writer import EncryptError
    with pytest.raises(EncryptError, match="cannot change the algorithm"):
        rewrap_file(str(d / "e.safetensors"), old, KeySet.generate("chacha20poly1305"))


def test_cli_rewrap_with_keys_from_vault(enc, tmp_path, openbao_server, monkeypatch):
    """Provider variant: the new key set comes from OpenBao KV v2 through a mount config."""
    import json
    d, ts, old = enc
    new = KeySet.generate(name="from-vault")
    client = openbao_server.client()
    client.secrets.kv.v2.create_or_update_secret(path="ctfs/rot", mount_point="secret",
                                                 secret={"jwks": json.dumps(new.to_jwks())})
    conf = tmp_path / "new.toml"
    conf.write_text(f'[provider]\nname = "vault"\nvault_addr = "{openbao_server.addr}"\n'
                    f'vault_kv_path = "secret/ctfs/rot"\n')
    env = {**os.environ, "VAULT_TOKEN": openbao_server.root_token}
    old_f = write_keys(old, tmp_path / "old.jwk")
    p = ctfs("rewrap", d / "e.safetensors", "--key-file", old_f, "--new-key-config", conf, env=env)
    assert "1 in-place" in p.stderr
    with CryptoFile(d / "e.safetensors", new) as cf:
        assert cf.crypto.enc.kid == "from-vault-enc"
