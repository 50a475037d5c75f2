#!/usr/bin/env python3
"""Generate ctfs's conformance vectors (format/vectors/) and their manifest.

    python format/make_vectors.py                 # rewrite format/vectors/ with the committed keys
    python format/make_vectors.py --out DIR       # write a fresh set into DIR (keys copied along)
    python format/make_vectors.py --new-keys      # ONLY if keys/ is missing: make new TEST keys

Every positive vector is written by ``ctfs.format.writer.encrypt_file`` from a plain safetensors
file (``safetensors.torch.save_file``; sub-byte dtypes that safetensors cannot write go
through a hand-built plain container, see ``_write_plain_raw``). Negative vectors are byte
edits of positive ones; a few "stricter than the reference" cases are edited and then
re-signed with the test signing key so that they get past the signature check.

Tensor contents are fixed by formulas. DEKs, IVs and signatures are random, so file bytes
change on every run, but manifest.json does not: it holds only what is deterministic
(layout, header length, plaintext sha256, edit offsets). The keys in keys/ are TEST ONLY.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ctfs.format import aead  # noqa: E402
from ctfs.format.cryptometa import (  # noqa: E402
    CRYPTO_KEYS, ENCRYPTION, PLAIN_DIGESTS, POLICY, SIGNATURE, parse_crypto_keys,
)
from ctfs.format.header import (  # noqa: E402
    TensorInfo, canonical_signed_message, dumps_compact, read_header_path, serialize_header,
)
from ctfs.format.keys import KeySet, MasterKey  # noqa: E402
from ctfs.format.signing import sign  # noqa: E402
from ctfs.format.writer import EncryptOptions, encrypt_file  # noqa: E402

EXT = ".safetensors"
TEST_ONLY = ("TEST ONLY: public test key of ctfs's conformance vectors (format/vectors). "
             "Never use it for real data.")

INPUT_POLICY = (
    "package model\n"
    "\n"
    "# ctfs passes an input document (ctfs.auth.policy.build_input); the reference passes none,\n"
    "# so there input.file_name is undefined and the default applies.\n"
    "default allow := false\n"
    "\n"
    "allow if {\n"
    "\tendswith(input.file_name, \".safetensors\")\n"
    "}\n"
)

NON_ASCII_META = {
    "description": "Modèle de test — 模型 🚀 «ctfs»",
    "escapes": "quote\" backslash\\ tab\t newline\n slash/ del\x7f",
    "licence": "TEST ONLY",
}


# --- keys ------------------------------------------------------------------------------

KEY_FILES = {
    # name -> how it is made from the generated ones
    "aes256gcm": "generated",
    "aes128gcm": "generated",
    "chacha20poly1305": "generated",
    "wrong-master-aes256gcm": "aes256gcm kids and signing key, another master key",
    "alg-mismatch-aes256gcm": "aes256gcm kids and signing key, an aes128gcm master key",
    "wrong-sign-aes256gcm": "aes256gcm master key, another signing key under the same kid",
}


def _jwks_text(ks: KeySet) -> str:
    doc = ks.to_jwks()
    doc["_comment"] = TEST_ONLY
    return json.dumps(doc, indent=1) + "\n"


def generate_keys(keys_dir: str) -> None:
    os.makedirs(keys_dir, exist_ok=True)
    made = {}
    for alg in ("aes256gcm", "aes128gcm", "chacha20poly1305"):
        made[alg] = KeySet.generate(alg, name=f"test-only-{alg}")
    base = made["aes256gcm"]
    other = KeySet.generate("aes256gcm", name="x")
    other128 = KeySet.generate("aes128gcm", name="y")
    enc_kid, sign_kid = base.master[0].kid, base.signing[0].kid
    made["wrong-master-aes256gcm"] = KeySet(
        master=[MasterKey(enc_kid, "aes256gcm", other.master[0].k)], signing=base.signing)
    made["alg-mismatch-aes256gcm"] = KeySet(
        master=[MasterKey(enc_kid, "aes128gcm", other128.master[0].k)], signing=base.signing)
    sk = other.signing[0]
    sk.kid = sign_kid
    made["wrong-sign-aes256gcm"] = KeySet(master=base.master, signing=[sk])
    for name, ks in made.items():
        with open(os.path.join(keys_dir, f"{name}.jwk"), "w", encoding="utf-8") as f:
            f.write(_jwks_text(ks))


def load_keys(keys_dir: str, name: str) -> KeySet:
    with open(os.path.join(keys_dir, f"{name}.jwk"), encoding="utf-8") as f:
        return KeySet.from_json(f.read(), source=name)


# --- deterministic tensor contents -----------------------------------------------------

def ramp(shape, dtype, scale=0.37, offset=-1.5):
    n = 1
    for d in shape:
        n *= d
    base = torch.arange(n, dtype=torch.float64) * scale + offset
    if dtype == torch.bool:
        return (torch.arange(n) % 3 == 0).reshape(shape)
    if dtype == torch.complex64:
        return torch.complex(base.float(), -base.float()).reshape(shape)
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        vals = (torch.arange(n, dtype=torch.int64) * 7919 + 13) % min(info.max, 2**31 - 1)
        if info.min < 0:
            vals = vals - (min(info.max, 2**31 - 1) // 2)
        return vals.to(dtype).reshape(shape)
    return base.to(dtype).reshape(shape)


def _bytes_of(seed: str, n: int) -> bytes:
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}/{i}".encode()).digest()
        i += 1
    return out[:n]


def _write_plain_raw(path: str, tensors: list[tuple[str, str, tuple[int, ...], bytes]]) -> None:
    """A plain safetensors file for dtypes safetensors.torch cannot write (F4, F6_*, F8_E8M0):
    the same container (``u64 N`` + space-padded JSON + data), tensors in the given order."""
    infos, off, data = [], 0, b""
    for name, dtype, shape, raw in tensors:
        infos.append(TensorInfo(name, dtype, shape, off, off + len(raw)))
        off += len(raw)
        data += raw
    with open(path, "wb") as f:
        f.write(serialize_header(None, infos) + data)


# --- vector definitions ----------------------------------------------------------------

def positive_specs():
    f32, f16, bf16, i64, u8 = torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8
    return [
        dict(name="v2_aes256gcm_full", keys="aes256gcm", version=2, chunk_size=16,
             what="v2, every tensor encrypted, 16-byte chunks: 40 B = 16+16+8, 32 B = 2 chunks, "
                  "24 B = 16+8, 10 B < one chunk, 4-byte scalar",
             tensors={"f32_10": ramp((10,), f32), "i64_2x2": ramp((2, 2), i64),
                      "f16_3x4": ramp((3, 4), f16), "u8_10": ramp((10,), u8),
                      "scalar": ramp((), f32)},
             metadata={"purpose": "conformance"}),
        dict(name="v2_chacha20poly1305_chunk7_partial", keys="chacha20poly1305", version=2,
             chunk_size=7,
             what="v2, chunk size 7 splits elements; 2 of 4 tensors encrypted; the plain ones "
                  "carry __ctfs_plain_sha256__ digests per 7-byte chunk",
             tensors={"enc_f32": ramp((3, 5), f32), "enc_bf16": ramp((9,), bf16),
                      "plain_i64": ramp((5,), i64), "plain_u8": ramp((7,), u8)},
             include=["enc_*"]),
        dict(name="v1_aes128gcm_partial", keys="aes128gcm", version=1,
             what="v1 (one AEAD call per tensor); an encrypted empty tensor (iv = tag = \"\"); "
                  "an unencrypted empty tensor; plain digests per 2 MiB chunk",
             tensors={"w": ramp((4, 6), f32), "bias": ramp((6,), f16),
                      "empty_enc": ramp((0, 3), f32), "plain_idx": ramp((12,), i64),
                      "empty_plain": ramp((0,), u8)},
             include=["w", "bias", "empty_enc"]),
        dict(name="v2_aes256gcm_empties", keys="aes256gcm", version=2, chunk_size=16,
             what="v2 with four zero-length tensors (3 encrypted, 1 plain): the source file has "
                  "them all at one offset, the writer spreads them to distinct offsets; an "
                  "encrypted empty v2 tensor has one tag over empty input (nonce = base_iv)",
             tensors={"a_f32": ramp((6,), f32), "b_i64": ramp((3,), i64), "c_u8": ramp((5,), u8),
                      "e_f32_0x4": ramp((0, 4), f32), "e_f16_0": ramp((0,), f16),
                      "e_i64_2x0": ramp((2, 0), i64), "e_plain_u8": ramp((0,), u8)},
             exclude=["e_plain_u8", "c_u8"]),
        dict(name="v2_aes256gcm_dtypes", keys="aes256gcm", version=2, chunk_size=None,
             what="every dtype safetensors.torch writes and ctfs reads, default chunk size "
                  "(2 MiB, so chunk_size is in the header), all encrypted",
             tensors={"bool": ramp((5,), torch.bool), "u8": ramp((3,), torch.uint8),
                      "i8": ramp((3,), torch.int8), "i16": ramp((3,), torch.int16),
                      "u16": ramp((3,), torch.uint16), "i32": ramp((3,), torch.int32),
                      "u32": ramp((3,), torch.uint32), "i64": ramp((3,), torch.int64),
                      "u64": ramp((3,), torch.uint64), "f16": ramp((3,), f16),
                      "bf16": ramp((3,), bf16), "f32": ramp((3,), f32),
                      "f64": ramp((3,), torch.float64), "c64": ramp((2,), torch.complex64),
                      "f8_e4m3": ramp((4,), torch.float8_e4m3fn),
                      "f8_e5m2": ramp((4,), torch.float8_e5m2)}),
        dict(name="v2_aes256gcm_subbyte_dtypes", keys="aes256gcm", version=2, chunk_size=2,
             what="dtypes safetensors.torch cannot write (plain source built by hand): F4 "
                  "(4 bits), F6_E2M3/F6_E3M2 (6 bits, shape [4] = 3 bytes), F8_E8M0; "
                  "chunk size 2 so chunks split the packed values",
             raw=[("f4", "F4", (2, 4), _bytes_of("f4", 4)),
                  ("f6_e2m3", "F6_E2M3", (4,), _bytes_of("f6a", 3)),
                  ("f6_e3m2", "F6_E3M2", (8,), _bytes_of("f6b", 6)),
                  ("f8_e8m0", "F8_E8M0", (5,), _bytes_of("e8m0", 5))]),
        dict(name="v2_aes256gcm_policy_input", keys="aes256gcm", version=2, chunk_size=32,
             what="custom Rego policy that reads input.file_name, user metadata with non-ASCII "
                  "and escape-worthy characters, partial encryption",
             tensors={"emb": ramp((4, 4), f32), "ids": ramp((6,), i64)},
             include=["emb"], policy=INPUT_POLICY, metadata=NON_ASCII_META),
        dict(name="v2_aes256gcm_no_digests", keys="aes256gcm", version=2, chunk_size=16,
             what="partial encryption written with plain_digests=False: the plain tensor is "
                  "covered by no signed digest (what a reference-written partial file looks "
                  "like to ctfs)",
             tensors={"enc": ramp((4,), f32), "plain": ramp((6,), f32)},
             include=["enc"], plain_digests=False),
    ]


def _sha(b) -> str:
    return hashlib.sha256(bytes(b)).hexdigest()


_NP_DTYPES = {"BOOL", "U8", "I8", "I16", "U16", "F16", "I32", "U32", "F32", "F64", "I64", "U64",
              "C64"}


def _reference_framework(t: TensorInfo, encrypted: bool) -> str | None:
    """How the reference wheel can hand this tensor back: "np", "pt" or None (it cannot).
    numpy lacks BF16/F8/F4; the reference has no type for F6; and framework="pt" fails on an
    encrypted zero-length tensor (reference-format.md 7.7)."""
    if t.dtype.startswith("F6_"):
        return None
    if t.dtype in _NP_DTYPES:
        return "np"
    if encrypted and t.nbytes == 0:
        return None
    return "pt"


def write_positive(spec: dict, out_dir: str, keys_dir: str, tmp: str) -> dict:
    src = os.path.join(tmp, spec["name"] + ".plain" + EXT)
    if "raw" in spec:
        _write_plain_raw(src, spec["raw"])
        plain = {n: raw for n, _, _, raw in spec["raw"]}
    else:
        save_file(spec["tensors"], src, metadata=spec.get("metadata"))
        plain = None
    opts = EncryptOptions(version=spec["version"],
                          chunk_size=spec.get("chunk_size") or aead.DEFAULT_CHUNK_SIZE,
                          include=spec.get("include", ("*",)), exclude=spec.get("exclude", ()),
                          policy=spec.get("policy"),
                          plain_digests=spec.get("plain_digests", True))
    dst = os.path.join(out_dir, spec["name"] + EXT)
    encrypt_file(src, dst, load_keys(keys_dir, spec["keys"]), opts, force=True)

    src_hdr = read_header_path(src)
    with open(src, "rb") as f:
        src_bytes = f.read()
    hdr = read_header_path(dst)
    meta = hdr.metadata
    ck = parse_crypto_keys(meta[CRYPTO_KEYS])
    enc = json.loads(meta[ENCRYPTION])
    digests = json.loads(meta[PLAIN_DIGESTS]) if PLAIN_DIGESTS in meta else None
    tensors = {}
    for t in hdr.layout():
        s = src_hdr.tensors[t.name]
        data = src_bytes[src_hdr.data_start + s.start:src_hdr.data_start + s.end]
        if plain is not None:
            assert data == plain[t.name]
        entry = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.start, t.end],
                 "nbytes": t.nbytes, "encrypted": t.name in enc, "sha256": _sha(data)}
        if t.name in enc and ck.chunk_size is not None:
            entry["num_chunks"] = aead.num_chunks(t.nbytes, ck.chunk_size)
        if t.name not in enc:
            entry["plain_digest_chunks"] = (
                aead.num_chunks(t.nbytes, digests["chunk_size"])
                if digests and t.name in digests["sha256"] else None)
        entry["reference_framework"] = _reference_framework(t, entry["encrypted"])
        tensors[t.name] = entry
    user_meta = {k: v for k, v in meta.items()
                 if k not in (CRYPTO_KEYS, ENCRYPTION, POLICY, SIGNATURE, PLAIN_DIGESTS)}
    return {
        "what": spec["what"],
        "keys_file": f"keys/{spec['keys']}.jwk",
        "version": ck.version,
        "algorithm": ck.enc.alg,
        "chunk_size": ck.chunk_size,
        "enc_kid": ck.enc.kid,
        "sign_kid": ck.sign.kid,
        "header_len": hdr.header_len,
        "file_size": hdr.file_size,
        "layout_order": [t.name for t in hdr.layout()],
        "plain_digests_chunk_size": digests["chunk_size"] if digests else None,
        "policy_local": json.loads(meta[POLICY])["local"],
        "user_metadata": user_meta,
        "signed_message_len": len(canonical_signed_message(meta, hdr.tensors.values())),
        "tensors": tensors,
    }


# --- negative vectors ------------------------------------------------------------------

def _read(path):
    with open(path, "rb") as f:
        return bytearray(f.read())


def _write(path, data):
    with open(path, "wb") as f:
        f.write(bytes(data))


def _header_text(data: bytes) -> tuple[int, str]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, data[8:8 + n].decode("utf-8")


def _rewrite(data: bytes, metadata: dict, tensors, *, resign_with: KeySet | None) -> bytes:
    """A new header (re-signed if asked) in front of the unchanged data section."""
    n = struct.unpack("<Q", data[:8])[0]
    meta = dict(metadata)
    if resign_with is not None:
        meta.pop(SIGNATURE, None)
        meta[SIGNATURE] = sign(canonical_signed_message(meta, tensors), resign_with.signing[0])
    return serialize_header(meta, tensors) + bytes(data[8 + n:])


def make_negatives(out_dir: str, keys_dir: str, files: dict) -> dict:
    p = lambda name: os.path.join(out_dir, name + EXT)  # noqa: E731
    neg = {}

    # 1. tampered ciphertext: one bit of chunk 1 of f32_10
    base = "v2_aes256gcm_full"
    data = _read(p(base))
    hdr = read_header_path(p(base))
    t = hdr.tensors["f32_10"]
    off = hdr.data_start + t.start + 16 + 3
    data[off] ^= 0x01
    _write(p("neg_tampered_ciphertext"), data)
    neg["neg_tampered_ciphertext"] = dict(
        file="neg_tampered_ciphertext" + EXT, derived_from=base, keys_file=files[base]["keys_file"],
        modification=f"file offset {off} (tensor f32_10, chunk 1, byte 3): ciphertext bit 0 "
                     f"flipped (xor 0x01)",
        expect=dict(exception="IntegrityError", stage="read", tensor="f32_10", chunk=1),
        other_tensors_readable=True,
        reference=dict(outcome="error", stage="read", tensor="f32_10",
                       match="Decryption failed"))

    # 2. tampered signed header: dtype I64 -> U64 (same size, still a valid header)
    data = _read(p(base))
    n, text = _header_text(data)
    idx = text.index('"dtype":"I64"') + len('"dtype":"')
    off = 8 + idx
    assert data[off:off + 1] == b"I"
    data[off] = ord("U")
    _write(p("neg_tampered_header"), data)
    neg["neg_tampered_header"] = dict(
        file="neg_tampered_header" + EXT, derived_from=base, keys_file=files[base]["keys_file"],
        modification=f"file offset {off}: 'I' -> 'U' (tensor i64_2x2 dtype I64 -> U64, "
                     f"inside the signed region)",
        expect=dict(exception="SignatureError", stage="open"),
        reference=dict(outcome="error", stage="open", match="Signature verification failed"))

    # 3. tampered unencrypted tensor, detected by __ctfs_plain_sha256__
    b2 = "v2_chacha20poly1305_chunk7_partial"
    data = _read(p(b2))
    hdr = read_header_path(p(b2))
    t = hdr.tensors["plain_i64"]
    off = hdr.data_start + t.start + 9  # chunk 1 of 7-byte digest chunks
    old = data[off]
    data[off] ^= 0x80
    _write(p("neg_tampered_plain_tensor"), data)
    neg["neg_tampered_plain_tensor"] = dict(
        file="neg_tampered_plain_tensor" + EXT, derived_from=b2, keys_file=files[b2]["keys_file"],
        modification=f"file offset {off} (unencrypted tensor plain_i64, byte 9 = digest chunk 1): "
                     f"0x{old:02x} ^ 0x80",
        expect=dict(exception="IntegrityError", stage="read", tensor="plain_i64", chunk=1),
        other_tensors_readable=True,
        reference=dict(outcome="loads_modified", stage="read", tensor="plain_i64",
                       note="the reference has no integrity for unencrypted tensors and "
                            "returns the modified bytes"))

    # 4. stripped __encryption__ (downgrade to a plain file)
    data = _read(p(base))
    hdr = read_header_path(p(base))
    meta = dict(hdr.metadata)
    del meta[ENCRYPTION]
    _write(p("neg_stripped_encryption"), _rewrite(data, meta, hdr.layout(), resign_with=None))
    neg["neg_stripped_encryption"] = dict(
        file="neg_stripped_encryption" + EXT, derived_from=base, keys_file=files[base]["keys_file"],
        modification="__metadata__.__encryption__ removed, header re-serialised (not re-signed); "
                     "data section unchanged",
        expect=dict(exception="NotEncryptedError", stage="open"),
        reference=dict(outcome="loads_ciphertext", stage="read",
                       note="the reference treats the file as plain safetensors and returns "
                            "the ciphertext as tensor data, without any check"))

    # 5. truncated file
    data = _read(p(base))
    _write(p("neg_truncated"), data[:-1])
    neg["neg_truncated"] = dict(
        file="neg_truncated" + EXT, derived_from=base, keys_file=files[base]["keys_file"],
        modification=f"last byte removed ({len(data)} -> {len(data) - 1} bytes)",
        expect=dict(exception="FileLengthError", stage="open"),
        reference=dict(outcome="error", stage="open", match="Error while deserializing header"))

    # 6. header length over the limit
    data = _read(p(base))
    data[:8] = struct.pack("<Q", 100_000_001)
    _write(p("neg_header_too_large"), data)
    neg["neg_header_too_large"] = dict(
        file="neg_header_too_large" + EXT, derived_from=base, keys_file=files[base]["keys_file"],
        modification="header length u64 set to 100000001 (limit 100000000)",
        expect=dict(exception="HeaderTooLargeError", stage="open"),
        reference=dict(outcome="error", stage="open", match="Error while deserializing header"))

    # 7. duplicate JSON key in the header (ctfs stricter than the reference)
    data = _read(p(base))
    n, text = _header_text(data)
    hdr = read_header_path(p(base))
    t = hdr.tensors["u8_10"]
    entry = '"u8_10":' + dumps_compact(t.entry())
    assert text.count(entry) == 1
    new_text = text.rstrip(" ").replace(entry, entry + "," + entry)
    new_body = new_text.encode("utf-8")
    new_body += b" " * (-len(new_body) % 8)
    _write(p("neg_duplicate_key"), struct.pack("<Q", len(new_body)) + new_body + data[8 + n:])
    neg["neg_duplicate_key"] = dict(
        file="neg_duplicate_key" + EXT, derived_from=base, keys_file=files[base]["keys_file"],
        modification="tensor entry u8_10 repeated verbatim in the header JSON (a duplicate key)",
        expect=dict(exception="InvalidHeaderError", stage="open"),
        reference=dict(outcome="loads", stage="read",
                       note="serde keeps one of the identical entries; the file loads"))

    # 8. __encryption__ names a tensor the file does not have (edited and re-signed)
    keys = load_keys(keys_dir, "aes256gcm")
    data = _read(p(base))
    hdr = read_header_path(p(base))
    meta = dict(hdr.metadata)
    enc = json.loads(meta[ENCRYPTION])
    enc["ghost"] = enc["u8_10"]
    meta[ENCRYPTION] = dumps_compact(dict(sorted(enc.items())))
    _write(p("neg_encryption_unknown_tensor"), _rewrite(data, meta, hdr.layout(), resign_with=keys))
    neg["neg_encryption_unknown_tensor"] = dict(
        file="neg_encryption_unknown_tensor" + EXT, derived_from=base,
        keys_file=files[base]["keys_file"],
        modification="__encryption__ gains an entry 'ghost' (a copy of u8_10's) that names no "
                     "tensor; re-signed with the test signing key",
        expect=dict(exception="CryptoMetadataError", stage="open"),
        reference=dict(outcome="loads", stage="read",
                       note="the reference unwraps the extra entry and ignores it"))

    # 9. surplus bytes in a v2 tags blob (edited and re-signed)
    data = _read(p(base))
    hdr = read_header_path(p(base))
    meta = dict(hdr.metadata)
    enc = json.loads(meta[ENCRYPTION])
    tags = base64.b64decode(enc["u8_10"]["tags"])
    enc["u8_10"]["tags"] = base64.b64encode(tags + bytes(16)).decode()
    meta[ENCRYPTION] = dumps_compact(enc)
    _write(p("neg_surplus_tag_bytes"), _rewrite(data, meta, hdr.layout(), resign_with=keys))
    neg["neg_surplus_tag_bytes"] = dict(
        file="neg_surplus_tag_bytes" + EXT, derived_from=base, keys_file=files[base]["keys_file"],
        modification="__encryption__.u8_10.tags gets 16 extra zero bytes (2 tags for 1 chunk); "
                     "re-signed with the test signing key",
        expect=dict(exception="CryptoMetadataError", stage="open"),
        reference=dict(outcome="loads", stage="read",
                       note="the reference ignores surplus tag bytes"))

    # 10-13. key problems on unmodified files
    neg["neg_wrong_master_key"] = dict(
        file=base + EXT, derived_from=base, keys_file="keys/wrong-master-aes256gcm.jwk",
        modification="none; the key file has the right kids and signing key but another "
                     "master key",
        expect=dict(exception="WrongKeyError", stage="open"),
        reference=dict(outcome="error", stage="open", match="Decryption"))
    neg["neg_alg_mismatch"] = dict(
        file=base + EXT, derived_from=base, keys_file="keys/alg-mismatch-aes256gcm.jwk",
        modification="none; the master key with the file's kid is an aes128gcm key while the "
                     "header says aes256gcm",
        expect=dict(exception="WrongKeyError", stage="open"),
        reference=dict(outcome="error", stage="open", match="Decryption",
                       note="the reference uses the JWK's alg and fails to unwrap"))
    neg["neg_unknown_kid"] = dict(
        file=base + EXT, derived_from=base, keys_file="keys/aes128gcm.jwk",
        modification="none; the key file holds no key with the file's kids",
        expect=dict(exception="KeyNotFoundError", stage="open", kid=files[base]["enc_kid"]),
        reference=dict(outcome="error", stage="open", match="Signature verification failed",
                       note="keys passed directly in the reference's config replace the "
                            "header's key entirely (the kid is not compared), so the wrong "
                            "Ed25519 key is used and verification fails"))
    neg["neg_wrong_signing_key"] = dict(
        file=base + EXT, derived_from=base, keys_file="keys/wrong-sign-aes256gcm.jwk",
        modification="none; the key file's signing key (same kid) is another Ed25519 key",
        expect=dict(exception="SignatureError", stage="open"),
        reference=dict(outcome="error", stage="open", match="Signature verification failed"))

    # 14. no digests: refused by default, readable with allow_unverified_plain=True
    b3 = "v2_aes256gcm_no_digests"
    neg["neg_unverified_plain"] = dict(
        file=b3 + EXT, derived_from=b3, keys_file=files[b3]["keys_file"],
        modification="none; the positive vector v2_aes256gcm_no_digests opened with default "
                     "options (allow_unverified_plain=False)",
        expect=dict(exception="UnverifiedPlaintextError", stage="open"),
        reference=dict(outcome="loads", stage="read",
                       note="the reference never authenticates unencrypted tensors"))
    return neg


# --- main ------------------------------------------------------------------------------

def build(out_dir: str, keys_src: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    keys_dir = os.path.join(out_dir, "keys")
    if os.path.abspath(keys_src) != os.path.abspath(keys_dir):
        os.makedirs(keys_dir, exist_ok=True)
        for name in sorted(os.listdir(keys_src)):
            shutil.copyfile(os.path.join(keys_src, name), os.path.join(keys_dir, name))
    for name in os.listdir(out_dir):
        if name.endswith(EXT):
            os.unlink(os.path.join(out_dir, name))
    files = {}
    with tempfile.TemporaryDirectory(prefix="ctfs-vectors-") as tmp:
        for spec in positive_specs():
            files[spec["name"]] = write_positive(spec, out_dir, keys_dir, tmp)
    for name, info in files.items():
        info["file"] = name + EXT
    files["v2_aes256gcm_policy_input"]["policy_input"] = {
        "ctfs": "open with policy_input=ctfs.auth.policy.build_input(file_name=<a name ending in "
                "'.safetensors'>, ...) -> allowed; policy_input=None or another file_name -> "
                "PolicyError ('Policy evaluation denied')",
        "reference": "the reference evaluates with no input document, so the default applies: "
                     "SafetensorError 'Policy(\"Policy evaluation denied\")' at open",
    }
    files["v2_aes256gcm_no_digests"]["open_options"] = {"allow_unverified_plain": True}
    for name, info in files.items():
        info["reference"] = {"outcome": "loads"}
    files["v2_aes256gcm_policy_input"]["reference"] = {
        "outcome": "error", "stage": "open", "match": "Policy evaluation denied"}
    manifest = {
        "description": "ctfs conformance vectors; see format/README.md and format/SPEC.md",
        "generator": "format/make_vectors.py",
        "keys_note": TEST_ONLY,
        "key_files": {f"keys/{k}.jwk": v for k, v in KEY_FILES.items()},
        "sha256_is_of": "plaintext tensor bytes (little-endian, C order, BOOL 1 byte)",
        "files": files,
        "negative": make_negatives(out_dir, keys_dir, files),
    }
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "vectors"))
    ap.add_argument("--keys", default=os.path.join(HERE, "vectors", "keys"),
                    help="directory of the fixed TEST keys (*.jwk)")
    ap.add_argument("--new-keys", action="store_true",
                    help="generate the TEST keys into --keys (refused if any exist)")
    args = ap.parse_args(argv)
    if args.new_keys:
        if os.path.isdir(args.keys) and any(n.endswith(".jwk") for n in os.listdir(args.keys)):
            ap.error(f"{args.keys} already holds keys; the vectors use fixed keys")
        generate_keys(args.keys)
    missing = [k for k in KEY_FILES if not os.path.exists(os.path.join(args.keys, f"{k}.jwk"))]
    if missing:
        ap.error(f"missing key files in {args.keys}: {missing} (run once with --new-keys)")
    manifest = build(args.out, args.keys)
    print(f"wrote {len(manifest['files'])} positive and {len(manifest['negative'])} negative "
          f"cases to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
