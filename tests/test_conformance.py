"""Conformance vectors (format/vectors): ctfs and the reference wheel against the manifest.

* every positive vector decrypts with ctfs (CryptoFile and ctfs.api.safe_open) to the
  manifest's plaintext sha256, and loads in the reference wheel ``cryptotensors`` with the
  same bytes (or fails exactly as the manifest records);
* every negative case raises exactly the manifest's exception class, at open or at read;
* format/make_vectors.py, run into a temporary directory, gives the same manifest and files
  that pass the same checks.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

import ctfs.errors
from ctfs import api
from ctfs.errors import PolicyError
from ctfs.format.header import canonical_signed_message, read_header_path
from ctfs.format.keys import KeySet
from ctfs.auth.policy import build_input
from ctfs.format.reader import CryptoFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTORS = os.path.join(ROOT, "format", "vectors")
MAKE_VECTORS = os.path.join(ROOT, "format", "make_vectors.py")

with open(os.path.join(VECTORS, "manifest.json"), encoding="utf-8") as _f:
    MANIFEST = json.load(_f)
POSITIVE = sorted(MANIFEST["files"])
NEGATIVE = sorted(MANIFEST["negative"])


# --- helpers ---------------------------------------------------------------------------

def _sha(data) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


def keyset(vdir: str, keys_file: str) -> KeySet:
    with open(os.path.join(vdir, keys_file), encoding="utf-8") as f:
        return KeySet.from_json(f.read(), source=keys_file)


def ref_config(vdir: str, keys_file: str) -> dict:
    with open(os.path.join(vdir, keys_file), encoding="utf-8") as f:
        keys = json.load(f)["keys"]
    return {"enc_key": next(k for k in keys if k["kty"] == "oct"),
            "sign_key": next(k for k in keys if k["kty"] == "okp")}


def tensor_bytes(t) -> bytes:
    """Raw little-endian bytes of a numpy array or torch tensor."""
    if hasattr(t, "tobytes") and not hasattr(t, "storage"):  # numpy
        return t.tobytes()
    import torch
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def open_kwargs(vdir: str, name: str, info: dict) -> dict:
    kw = dict(info.get("open_options", {}))
    if "policy_input" in info:
        path = os.path.join(vdir, info["file"])
        kw["policy_input"] = build_input(file_name=path, mount_path=None, provider=None)
    return kw


def check_positive_ctfs(vdir: str, name: str) -> None:
    info = MANIFEST["files"][name]
    path = os.path.join(vdir, info["file"])
    keys = keyset(vdir, info["keys_file"])
    kw = open_kwargs(vdir, name, info)

    hdr = read_header_path(path)
    assert hdr.header_len == info["header_len"]
    assert hdr.file_size == info["file_size"]
    assert [t.name for t in hdr.layout()] == info["layout_order"]
    assert len(canonical_signed_message(hdr.metadata, hdr.tensors.values())) == \
        info["signed_message_len"]

    with CryptoFile(path, keys, **kw) as cf:
        assert cf.crypto.version == info["version"]
        assert cf.crypto.enc.alg == info["algorithm"]
        assert cf.crypto.chunk_size == info["chunk_size"]
        assert cf.user_metadata == info["user_metadata"]
        assert set(cf.tensors) == set(info["tensors"])
        for tname, t in info["tensors"].items():
            ti = cf.tensors[tname]
            assert ti.dtype == t["dtype"]
            assert list(ti.shape) == t["shape"]
            assert [ti.start, ti.end] == t["data_offsets"]
            assert cf.is_encrypted(tname) == t["encrypted"]
            assert _sha(cf.tensor_bytes(tname)) == t["sha256"], tname
        cf.verify_all()

    with api.safe_open(path, "pt", keys=keys, **kw) as f:
        assert f.offset_keys() == info["layout_order"]
        assert f.metadata() == info["user_metadata"]
        for tname, t in info["tensors"].items():
            if t["dtype"].startswith("F6_"):  # no torch dtype: ctfs.api refuses
                with pytest.raises(api.UnsupportedDtypeError):
                    f.get_tensor(tname)
                continue
            assert _sha(tensor_bytes(f.get_tensor(tname))) == t["sha256"], tname


def check_negative_ctfs(vdir: str, case: str) -> None:
    neg = MANIFEST["negative"][case]
    exp = neg["expect"]
    cls = getattr(ctfs.errors, exp["exception"])
    path = os.path.join(vdir, neg["file"])
    keys = keyset(vdir, neg["keys_file"])
    if exp["stage"] == "open":
        with pytest.raises(ctfs.errors.CtfsError) as ei:
            CryptoFile(path, keys).close()
        assert type(ei.value) is cls, f"{case}: {type(ei.value).__name__}: {ei.value}"
        if "kid" in exp:
            assert ei.value.kid == exp["kid"]
        with pytest.raises(cls):
            api.safe_open(path, "pt", keys=keys)
        return
    assert exp["stage"] == "read"
    orig = MANIFEST["files"][neg["derived_from"]]
    with CryptoFile(path, keys) as cf:
        with pytest.raises(ctfs.errors.CtfsError) as ei:
            cf.tensor_bytes(exp["tensor"])
        assert type(ei.value) is cls, f"{case}: {type(ei.value).__name__}: {ei.value}"
        assert ei.value.tensor == exp["tensor"]
        assert ei.value.chunk == exp["chunk"]
        with pytest.raises(cls):
            cf.verify_all()
        if neg.get("other_tensors_readable"):
            for tname, t in orig["tensors"].items():
                if tname != exp["tensor"]:
                    assert _sha(cf.tensor_bytes(tname)) == t["sha256"]
    with api.safe_open(path, "pt", keys=keys) as f:
        with pytest.raises(cls):
            f.get_tensor(exp["tensor"])


# --- ctfs ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", POSITIVE)
def test_positive_ctfs(name):
    check_positive_ctfs(VECTORS, name)


@pytest.mark.parametrize("case", NEGATIVE)
def test_negative_ctfs(case):
    check_negative_ctfs(VECTORS, case)


def test_policy_input_vector_needs_input():
    info = MANIFEST["files"]["v2_aes256gcm_policy_input"]
    path = os.path.join(VECTORS, info["file"])
    keys = keyset(VECTORS, info["keys_file"])
    with pytest.raises(PolicyError, match="Policy evaluation denied"):
        CryptoFile(path, keys)  # no input document: the reference's situation
    other = build_input(file_name="/models/model.bin", mount_path=None, provider=None)
    with pytest.raises(PolicyError, match="Policy evaluation denied"):
        CryptoFile(path, keys, policy_input=other)
    CryptoFile(path, keys, check_policy=False).close()


def test_no_digests_vector_is_readable_when_allowed():
    info = MANIFEST["files"]["v2_aes256gcm_no_digests"]
    path = os.path.join(VECTORS, info["file"])
    with CryptoFile(path, keyset(VECTORS, info["keys_file"]), allow_unverified_plain=True) as cf:
        assert cf.unverified_plain == ["plain"]


def test_empty_tensors_spread():
    for name, info in MANIFEST["files"].items():
        starts = [t["data_offsets"][0] for t in info["tensors"].values() if t["nbytes"] == 0]
        assert len(starts) == len(set(starts)), name
    empties = [t for t in MANIFEST["files"]["v2_aes256gcm_empties"]["tensors"].values()
               if t["nbytes"] == 0]
    assert len(empties) == 4


def test_vectors_small():
    total = sum(os.path.getsize(os.path.join(dp, f))
                for dp, _, fs in os.walk(VECTORS) for f in fs)
    assert total < 200_000


def test_key_files_marked_test_only():
    for kf in MANIFEST["key_files"]:
        with open(os.path.join(VECTORS, kf), encoding="utf-8") as f:
            doc = json.load(f)
        assert "TEST ONLY" in doc["_comment"]
        assert all(k["kid"].startswith("test-only-") for k in doc["keys"])


# --- the reference wheel -----------------------------------------------------------------

import cryptotensors  # noqa: E402  (the reference wheel is a test dependency)


@pytest.mark.parametrize("name", POSITIVE)
def test_positive_reference(name):
    info = MANIFEST["files"][name]
    path = os.path.join(VECTORS, info["file"])
    cfg = ref_config(VECTORS, info["keys_file"])
    ref = info["reference"]
    if ref["outcome"] == "error":
        for fw in ("np", "pt"):
            with pytest.raises(cryptotensors.SafetensorError, match=ref["match"]):
                cryptotensors.safe_open(path, fw, config=cfg)
        return
    assert ref["outcome"] == "loads"
    checked = 0
    for fw in ("np", "pt"):
        with cryptotensors.safe_open(path, fw, config=cfg) as f:
            assert sorted(f.keys()) == sorted(info["tensors"])
            meta = f.metadata() or {}
            for k, v in info["user_metadata"].items():
                assert meta[k] == v
            for tname, t in info["tensors"].items():
                if t["reference_framework"] == fw:
                    assert _sha(tensor_bytes(f.get_tensor(tname))) == t["sha256"], tname
                    checked += 1
    assert checked == sum(1 for t in info["tensors"].values() if t["reference_framework"])


@pytest.mark.parametrize("case", NEGATIVE)
def test_negative_reference(case):
    """What the reference does with our negative cases (documents where ctfs is stricter)."""
    neg = MANIFEST["negative"][case]
    ref = neg["reference"]
    path = os.path.join(VECTORS, neg["file"])
    cfg = ref_config(VECTORS, neg["keys_file"])
    orig = MANIFEST["files"][neg["derived_from"]]["tensors"]
    if ref["outcome"] == "error" and ref["stage"] == "open":
        with pytest.raises(cryptotensors.SafetensorError, match=ref["match"]):
            cryptotensors.safe_open(path, "np", config=cfg)
        return
    with cryptotensors.safe_open(path, "pt", config=cfg) as f:
        for tname, t in orig.items():
            if not t["reference_framework"]:
                continue
            if ref["outcome"] == "error" and tname == ref["tensor"]:
                with pytest.raises(cryptotensors.SafetensorError, match=ref["match"]):
                    f.get_tensor(tname)
                continue
            got = _sha(tensor_bytes(f.get_tensor(tname)))
            if ref["outcome"] == "loads_ciphertext" and t["nbytes"]:
                assert got != t["sha256"], tname
            elif ref["outcome"] == "loads_modified" and tname == ref["tensor"]:
                assert got != t["sha256"], tname
            else:
                assert got == t["sha256"], tname


# --- regeneration --------------------------------------------------------------------------

def test_regenerate(tmp_path):
    out = tmp_path / "vectors"
    subprocess.run([sys.executable, MAKE_VECTORS, "--out", str(out)], check=True,
                   capture_output=True, timeout=300)
    with open(out / "manifest.json", encoding="utf-8") as f:
        assert json.load(f) == MANIFEST
    for name in POSITIVE:
        check_positive_ctfs(str(out), name)
        # fresh DEKs/IVs: same plaintext, different ciphertext
        with open(os.path.join(VECTORS, MANIFEST["files"][name]["file"]), "rb") as a, \
                open(out / MANIFEST["files"][name]["file"], "rb") as b:
            assert a.read() != b.read()
    for case in NEGATIVE:
        check_negative_ctfs(str(out), case)
