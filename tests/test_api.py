"""The safe_open-shaped in-process API: lazy, sliceable, never aliasing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ctfs import api, errors
from ctfs.format.keys import KeySet
from ctfs.format.writer import EncryptOptions, encrypt_file


def _plain_and_encrypted(d, ts: dict, chunk_size: int):
    """TS saved as D/p.safetensors and encrypted as e1 / e2 (format v1 / v2), "i" left plain."""
    save_file(ts, str(d / "p.safetensors"), metadata={"format": "pt"})
    keys = KeySet.generate()
    for v in (1, 2):
        encrypt_file(str(d / "p.safetensors"), str(d / f"e{v}.safetensors"), keys,
                     EncryptOptions(version=v, chunk_size=chunk_size, exclude=["i"]))
    return d, keys, ts


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    g = torch.Generator().manual_seed(1)
    ts = {"w": torch.randn(300, 17, generator=g), "h": torch.randn(64, 8, generator=g).half(),
          "b": torch.randn(5, generator=g).to(torch.bfloat16), "i": torch.arange(12).reshape(3, 4)}
    return _plain_and_encrypted(d, ts, chunk_size=1000)


@pytest.mark.parametrize("v", [1, 2])
def test_get_tensor_and_metadata(enc, v):
    d, keys, ts = enc
    with api.safe_open(d / f"e{v}.safetensors", "pt", keys=keys) as f:
        assert f.keys() == sorted(ts)
        assert f.metadata() == {"format": "pt"}
        for k, t in ts.items():
            assert torch.equal(f.get_tensor(k), t)
    with api.safe_open(d / f"e{v}.safetensors", "np", keys=keys) as f:
        np.testing.assert_array_equal(f.get_tensor("w"), ts["w"].numpy())
        with pytest.raises(api.UnsupportedDtypeError):
            f.get_tensor("b")


@pytest.mark.parametrize("index", [
    slice(10, 20), slice(None), 7, -1, (slice(3, 250, 7), slice(2, 5)), (5, 3), slice(290, 400),
    slice(None, None, -1), (Ellipsis, 2),
])
@pytest.mark.parametrize("fw", ["pt", "np"])
def test_get_slice_equals_indexing(enc, index, fw):
    d, keys, ts = enc
    with api.safe_open(d / "e2.safetensors", fw, keys=keys) as f:
        sl = f.get_slice("w")
        assert sl.get_shape() == [300, 17] and sl.get_dtype() == "F32"
        ref = ts["w"].numpy()
        if fw == "pt" and isinstance(index, slice) and (index.step or 1) < 0:
            with pytest.raises(ValueError):  # torch itself has no negative steps
                ts["w"][index]
            return
        got = sl[index]
        got = got.numpy() if fw == "pt" else got
        np.testing.assert_array_equal(got, ref[index])


def test_tensors_do_not_alias(enc):
    d, keys, ts = enc
    with api.safe_open(d / "e2.safetensors", "pt", keys=keys) as f:
        a = f.get_tensor("w")
        a.zero_()
        assert torch.equal(f.get_tensor("w"), ts["w"])
        s = f.get_slice("w")[0:2]
        s.fill_(7)
        assert torch.equal(f.get_slice("w")[0:2], ts["w"][0:2])


def test_load_file_and_key_file(enc, tmp_path):
    d, keys, ts = enc
    kf = tmp_path / "k.jwk"
    import json
    kf.write_text(json.dumps(keys.to_jwks()))
    kf.chmod(0o600)
    out = api.load_file(d / "e1.safetensors", key_file=kf)
    assert set(out) == set(ts) and all(torch.equal(out[k], ts[k]) for k in ts)
    kf.chmod(0o644)
    with pytest.raises(errors.KeyFileError, match="group/others"):
        api.load_file(d / "e1.safetensors", key_file=kf)


def test_plain_file_needs_opt_in(enc):
    d, keys, ts = enc
    with pytest.raises(errors.NotEncryptedError):
        api.safe_open(d / "p.safetensors", keys=keys)
    with api.safe_open(d / "p.safetensors", "pt", require_encrypted=False) as f:
        assert torch.equal(f.get_tensor("w"), ts["w"])


def test_top_level_exports(enc):
    import ctfs
    d, keys, ts = enc
    assert ctfs.KeySet is KeySet and ctfs.safe_open is api.safe_open
    with ctfs.safe_open(d / "e2.safetensors", "pt", keys=keys) as f:
        assert torch.equal(f.get_tensor("w"), ts["w"])


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Many tensors of one to three 4 KiB chunks (each too small to be split over threads
    on its own), one of many chunks, an empty one and an excluded (plain) one."""
    d = tmp_path_factory.mktemp("many")
    g = torch.Generator().manual_seed(2)
    ts = {f"l{i:02d}.w": torch.randn(1 + i % 3, 1024, generator=g) for i in range(40)}
    ts["emb"] = torch.randn(64, 1024, generator=g).half()
    ts["empty"] = torch.empty(0, 4)
    ts["i"] = torch.arange(100)
    return _plain_and_encrypted(d, ts, chunk_size=4096)


def _spy_read_many(monkeypatch) -> list:
    from ctfs.format.reader import CryptoFile
    calls, real = [], CryptoFile.read_many

    def spy(self, parts, *, threads=1):
        calls.append(([len(memoryview(o).cast("B")) for _, o in parts], threads))
        return real(self, parts, threads=threads)
    monkeypatch.setattr(CryptoFile, "read_many", spy)
    return calls


@pytest.mark.parametrize("v", [1, 2])
def test_load_file_decrypts_all_tensors_in_one_pool(many, monkeypatch, v):
    d, keys, ts = many
    monkeypatch.setattr(api, "THREADS", 2)
    calls = _spy_read_many(monkeypatch)
    out = api.load_file(d / f"e{v}.safetensors", keys=keys)
    with api.safe_open(d / f"e{v}.safetensors", keys=keys) as f:
        assert list(out) == f.offset_keys()  # file order, like safetensors
    assert set(out) == set(ts)
    for k, t in ts.items():
        assert out[k].dtype == t.dtype and out[k].shape == t.shape and torch.equal(out[k], t), k
    # one batch: every non-empty tensor's bytes handed to the pool together
    assert len(calls) == 1 and calls[0][1] == 2
    assert sorted(calls[0][0]) == sorted(t.numel() * t.element_size() for t in ts.values() if t.numel())
    out_np = api.load_file(d / f"e{v}.safetensors", "np", keys=keys)
    for k, t in ts.items():
        np.testing.assert_array_equal(out_np[k], t.numpy())
        assert out_np[k].dtype == t.numpy().dtype, k


def test_load_file_integrity_failure_names_the_tensor(many, tmp_path, monkeypatch):
    from ctfs.format.header import read_header_path
    d, keys, ts = many
    monkeypatch.setattr(api, "THREADS", 2)
    bad = tmp_path / "bad.safetensors"
    data = bytearray((d / "e2.safetensors").read_bytes())
    h = read_header_path(d / "e2.safetensors")
    data[h.data_start + h.tensors["l20.w"].start + 5000] ^= 0x01  # l20.w: 3 chunks; the 2nd
    bad.write_bytes(data)
    with pytest.raises(errors.IntegrityError) as ei:
        api.load_file(bad, keys=keys)
    assert (ei.value.tensor, ei.value.chunk) == ("l20.w", 1)


def test_load_file_to_another_device_moves_batches(many, monkeypatch):
    d, keys, ts = many
    monkeypatch.setattr(api, "THREADS", 2)
    monkeypatch.setattr(api, "_DEVICE_BATCH", 32 << 10)
    calls = _spy_read_many(monkeypatch)
    out = api.load_file(d / "e2.safetensors", device="meta", keys=keys)
    assert set(out) == set(ts)
    for k, t in ts.items():
        assert out[k].device.type == "meta" and out[k].dtype == t.dtype and out[k].shape == t.shape
    biggest = max(t.numel() * t.element_size() for t in ts.values())
    assert len(calls) > 3 and all(sum(sizes) < (32 << 10) + biggest for sizes, _ in calls)
    total = sum(t.numel() * t.element_size() for t in ts.values())
    assert sum(sum(sizes) for sizes, _ in calls) == total
