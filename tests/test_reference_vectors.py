"""The reference library's own files: every one decrypts to the manifest's hashes, every
tampered copy is refused with a specific exception, and the reference's weaknesses are
closed (stripped metadata, header-chosen keys, unverified plain tensors)."""
from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest

from conftest import ref_keys
from ctfs import api, errors
from ctfs.format.header import read_header_path
from ctfs.format.keys import KeySet
from ctfs.format.reader import CryptoFile


def _files(manifest):
    return sorted(manifest["files"])


def test_every_vector_decrypts_to_manifest_hashes(ref_vectors, ref_manifest):
    assert len(ref_manifest["files"]) == 7
    for name, entry in ref_manifest["files"].items():
        keys = ref_keys(ref_vectors, entry["keys_file"])
        partial = bool(entry["plain_tensors"])
        with CryptoFile(ref_vectors / name, keys, allow_unverified_plain=partial) as cf:
            assert cf.crypto.version == entry["format_version"]
            assert cf.crypto.chunk_size == entry["chunk_size"]
            assert cf.alg.name == entry["algorithm"]
            assert sorted(cf.tensors) == sorted(entry["tensors"])
            for tname, t in entry["tensors"].items():
                assert [cf.tensors[tname].start, cf.tensors[tname].end] == t["data_offsets"]
                assert cf.is_encrypted(tname) == t["encrypted"]
                got = hashlib.sha256(cf.tensor_bytes(tname)).hexdigest()
                assert got == t["sha256"], (name, tname)
                if t["encrypted"]:  # the unwrapped data key is the reference's
                    assert bytes(cf._tensors[tname].dek).hex() == t["dek_hex"]


@pytest.mark.parametrize("framework", ["np", "pt"])
def test_safe_open_matches_manifest(ref_vectors, ref_manifest, framework):
    for name, entry in ref_manifest["files"].items():
        keys = ref_keys(ref_vectors, entry["keys_file"])
        with api.safe_open(ref_vectors / name, framework, keys=keys,
                           allow_unverified_plain=bool(entry["plain_tensors"])) as f:
            assert sorted(f.keys()) == sorted(entry["tensors"])
            for tname, t in entry["tensors"].items():
                if framework == "np" and t["dtype"] == "BF16":
                    with pytest.raises(api.UnsupportedDtypeError):
                        f.get_tensor(tname)
                    continue
                x = f.get_tensor(tname)
                raw = x.tobytes() if framework == "np" else x.contiguous().view(-1).view(
                    __import__("torch").uint8).numpy().tobytes() if x.numel() else b""
                assert list(x.shape) == t["shape"]
                assert hashlib.sha256(raw).hexdigest() == t["sha256"], (name, tname)


def test_signed_message_matches_manifest(ref_vectors, ref_manifest):
    from ctfs.format.header import canonical_signed_message
    for name, entry in ref_manifest["files"].items():
        hdr = read_header_path(ref_vectors / name)
        msg = canonical_signed_message(hdr.metadata, hdr.tensors.values())
        assert len(msg) == entry["signed_message_len"]
        assert hashlib.sha256(msg).hexdigest() == entry["signed_message_sha256"]


def test_two_empty_tensors_same_offset_verify_every_time(ref_vectors, ref_manifest):
    name = "bug_v2_two_empty_same_offset.cryptotensors"
    keys = ref_keys(ref_vectors, ref_manifest["files"][name]["keys_file"])
    for _ in range(1000):
        CryptoFile(ref_vectors / name, keys).close()


def test_tampered_ciphertext_raises_integrity_error_never_bytes(ref_vectors, ref_manifest):
    entry = ref_manifest["tampered"]["tampered_ciphertext.cryptotensors"]
    keys = ref_keys(ref_vectors, entry["keys_file"])
    with CryptoFile(ref_vectors / "tampered_ciphertext.cryptotensors", keys) as cf:
        with pytest.raises(errors.IntegrityError) as ei:
            cf.tensor_bytes("f32_10")
        assert (ei.value.tensor, ei.value.chunk) == ("f32_10", 1)
        with pytest.raises(errors.IntegrityError):
            cf.verify_all()
        # the untouched chunk 0 and other tensors still read
        assert hashlib.sha256(cf.tensor_bytes("i64_3")).hexdigest() == \
            ref_manifest["files"]["v2_aes256gcm_chunk16.cryptotensors"]["tensors"]["i64_3"]["sha256"]
    with api.safe_open(ref_vectors / "tampered_ciphertext.cryptotensors", "np", keys=keys) as f:
        with pytest.raises(errors.IntegrityError):
            f.get_tensor("f32_10")
        with pytest.raises(errors.IntegrityError):
            f.get_slice("f32_10")[5:]


def test_tampered_header_raises_signature_error(ref_vectors, ref_manifest):
    entry = ref_manifest["tampered"]["tampered_header.cryptotensors"]
    with pytest.raises(errors.SignatureError, match="signature verification failed"):
        CryptoFile(ref_vectors / "tampered_header.cryptotensors", ref_keys(ref_vectors, entry["keys_file"]))


def test_tampered_plain_tensor_refused_by_default(ref_vectors, ref_manifest):
    entry = ref_manifest["tampered"]["tampered_plaintext_tensor.cryptotensors"]
    keys = ref_keys(ref_vectors, entry["keys_file"])
    with pytest.raises(errors.UnverifiedPlaintextError, match="plain_i64"):
        CryptoFile(ref_vectors / "tampered_plaintext_tensor.cryptotensors", keys)
    # Opting in reproduces the format's limitation: the change is not detectable.
    with CryptoFile(ref_vectors / "tampered_plaintext_tensor.cryptotensors", keys,
                    allow_unverified_plain=True) as cf:
        orig = ref_manifest["files"]["v2_chacha20poly1305_chunk7_partial.cryptotensors"]
        assert hashlib.sha256(cf.tensor_bytes("plain_i64")).hexdigest() != \
            orig["tensors"]["plain_i64"]["sha256"]


def _rewrite_header(src, dst, mutate):
    hdr = read_header_path(src)
    raw = open(src, "rb").read()
    doc = json.loads(raw[8:8 + hdr.header_len])
    mutate(doc)
    body = json.dumps(doc, separators=(",", ":")).encode()
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body + raw[8 + hdr.header_len:])


def test_stripped_encryption_is_not_silently_accepted(ref_vectors, ref_manifest, tmp_path):
    src = ref_vectors / "v2_aes256gcm_chunk16.cryptotensors"
    keys = ref_keys(ref_vectors, "keys/aes256gcm.jwk")
    for how, mutate in [("key", lambda d: d["__metadata__"].pop("__encryption__")),
                        ("all metadata", lambda d: d.pop("__metadata__"))]:
        dst = tmp_path / "stripped.safetensors"
        _rewrite_header(src, dst, mutate)
        with pytest.raises(errors.NotEncryptedError, match="no __encryption__"):
            CryptoFile(dst, keys)
        with pytest.raises(errors.NotEncryptedError):
            api.load_file(dst, "np", keys=keys)


def test_header_jku_is_never_opened(ref_vectors, tmp_path):
    """A header naming a key location (here a FIFO nobody writes: opening it would hang)
    is ignored; keys come only from the caller."""
    fifo = tmp_path / "attacker.jwk"
    os.mkfifo(fifo)
    src = ref_vectors / "v2_aes256gcm_chunk16.cryptotensors"

    def add_jku(d):
        ck = json.loads(d["__metadata__"]["__crypto_keys__"])
        ck["enc"]["jku"] = ck["sign"]["jku"] = f"file://{fifo}"
        ck["enc"]["kid"] = ck["sign"]["kid"] = "attacker"
        d["__metadata__"]["__crypto_keys__"] = json.dumps(ck)
    dst = tmp_path / "jku.safetensors"
    _rewrite_header(src, dst, add_jku)
    keys = ref_keys(ref_vectors, "keys/aes256gcm.jwk")
    with pytest.raises(errors.KeyNotFoundError) as ei:
        CryptoFile(dst, keys)
    assert ei.value.kid == "attacker" and "'attacker'" in str(ei.value)


def test_wrong_master_key_and_missing_kid(ref_vectors, tmp_path):
    path = ref_vectors / "v2_aes256gcm_chunk16.cryptotensors"
    good = ref_keys(ref_vectors, "keys/aes256gcm.jwk").to_jwks()
    bad = json.loads(json.dumps(good))
    for k in bad["keys"]:
        if k["kty"] == "oct":
            k["k"] = KeySet.generate("aes256gcm").to_jwks()["keys"][0]["k"]
    with pytest.raises(errors.WrongKeyError, match="does not unwrap"):
        CryptoFile(path, KeySet.from_jwks(bad))
    other = KeySet.generate("aes256gcm", name="other")
    with pytest.raises(errors.KeyNotFoundError, match="vec-enc-aes256gcm"):
        CryptoFile(path, other)
    with pytest.raises(errors.KeyNotFoundError, match="needs keys"):
        CryptoFile(path, None)


def test_nokid_vector_uses_the_only_key(ref_vectors, ref_manifest):
    entry = ref_manifest["files"]["v2_aes256gcm_nokid.cryptotensors"]
    keys = ref_keys(ref_vectors, entry["keys_file"])
    with CryptoFile(ref_vectors / "v2_aes256gcm_nokid.cryptotensors", keys) as cf:
        assert cf.crypto.enc.kid is None
    two = KeySet.from_jwks({"keys": keys.to_jwks()["keys"] + KeySet.generate().to_jwks()["keys"]})
    with pytest.raises(errors.KeyNotFoundError, match="names no kid"):
        CryptoFile(ref_vectors / "v2_aes256gcm_nokid.cryptotensors", two)


def test_reformatted_header_still_verifies(ref_vectors, tmp_path):
    """The signature covers the canonical form, so an indented, reordered header verifies."""
    src = ref_vectors / "v1_chacha20poly1305_partial.cryptotensors"
    hdr = read_header_path(src)
    raw = open(src, "rb").read()
    doc = json.loads(raw[8:8 + hdr.header_len])
    body = json.dumps(dict(reversed(list(doc.items()))), indent=3, ensure_ascii=True).encode()
    dst = tmp_path / "re.safetensors"
    dst.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + hdr.header_len:])
    keys = ref_keys(ref_vectors, "keys/chacha20poly1305.jwk")
    with CryptoFile(dst, keys, allow_unverified_plain=True) as a, \
            CryptoFile(src, keys, allow_unverified_plain=True) as b:
        for t in a.tensors:
            assert a.tensor_bytes(t) == b.tensor_bytes(t)
