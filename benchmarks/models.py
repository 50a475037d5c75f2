"""Synthetic models shaped like the Qwen3 family, written straight to safetensors.

Tensor names, shapes and dtypes come from a Qwen3 configuration (the real hyper-parameters
of the released checkpoints); the model is never instantiated and the values are random
bf16 numbers (finite, |x| in [2^-7, 2)), generated block by block so memory stays small
whatever the model size. Shards are cut like Hugging Face's ``save_pretrained`` (tensors in
state-dict order, a new shard when the next tensor would exceed ``max_shard_size``) and
indexed by ``model.safetensors.index.json``.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field

import numpy as np

GB = 10**9
MiB = 1 << 20

# The released Qwen3 checkpoints' hyper-parameters (config.json of Qwen/Qwen3-*).
QWEN3 = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=768, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=8192, tie_word_embeddings=True,
                 max_position_embeddings=2048),
    "0.6B": dict(hidden_size=1024, num_hidden_layers=28, intermediate_size=3072, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "1.7B": dict(hidden_size=2048, num_hidden_layers=28, intermediate_size=6144, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "4B": dict(hidden_size=2560, num_hidden_layers=36, intermediate_size=9728, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, num_hidden_layers=36, intermediate_size=12288, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    "14B": dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=17408, num_attention_heads=40,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    "32B": dict(hidden_size=5120, num_hidden_layers=64, intermediate_size=25600, num_attention_heads=64,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
}
COMMON = dict(rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
              hidden_act="silu", attention_bias=False, bos_token_id=151643, eos_token_id=151645)

DTYPE_SIZE = {"BF16": 2, "F16": 2, "F32": 4}


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str = "BF16"

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass
class Model:
    """A synthetic model directory on disk."""
    name: str
    path: str
    shards: list[str] = field(default_factory=list)   # file names, in order
    nbytes: int = 0                                    # tensor bytes
    n_params: int = 0

    def files(self) -> list[str]:
        return [os.path.join(self.path, s) for s in self.shards]

    def file_bytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.files())


def qwen3_config(size: str) -> dict:
    """config.json contents for SIZE, through transformers' Qwen3Config when available."""
    hp = {**COMMON, **QWEN3[size]}
    if size == "tiny":
        hp.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    try:
        from transformers import Qwen3Config
        cfg = Qwen3Config(**hp)
        d = cfg.to_dict()
    except Exception:  # transformers missing or too old: the same hyper-parameters by hand
        d = {"model_type": "qwen3", **hp}
    d["architectures"] = ["Qwen3ForCausalLM"]
    d["torch_dtype"] = d["dtype"] = "bfloat16"
    return d


def qwen3_tensors(cfg: dict) -> list[Tensor]:
    """Qwen3ForCausalLM's state dict (names, shapes) in state-dict order, from the config."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = [Tensor("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [Tensor(p + "self_attn.q_proj.weight", (q, h)), Tensor(p + "self_attn.k_proj.weight", (kv, h)),
                Tensor(p + "self_attn.v_proj.weight", (kv, h)), Tensor(p + "self_attn.o_proj.weight", (h, q)),
                Tensor(p + "self_attn.q_norm.weight", (hd,)), Tensor(p + "self_attn.k_norm.weight", (hd,)),
                Tensor(p + "mlp.gate_proj.weight", (inter, h)), Tensor(p + "mlp.up_proj.weight", (inter, h)),
                Tensor(p + "mlp.down_proj.weight", (h, inter)),
                Tensor(p + "input_layernorm.weight", (h,)), Tensor(p + "post_attention_layernorm.weight", (h,))]
    out.append(Tensor("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings", False):
        out.append(Tensor("lm_head.weight", (v, h)))
    return out


def shard(tensors: list[Tensor], max_shard_size: int) -> list[list[Tensor]]:
    """Hugging Face's split: a new shard when the next tensor would overflow the current one."""
    shards: list[list[Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _random_bf16(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random finite bf16 values (as uint16 bits): random sign/mantissa, exponent 120..127."""
    r = rng.bit_generator.random_raw(-(-n // 4)).view(np.uint16)[:n]
    exp = (r >> 7) & 7
    exp += 120
    exp <<= 7
    r &= 0x807F
    r |= exp
    return r


def _header(tensors: list[Tensor], metadata: dict | None) -> bytes:
    """A safetensors header laid out like safetensors does (same dtype: sorted by name)."""
    hdr: dict = {}
    if metadata:
        hdr["__metadata__"] = metadata
    off = 0
    for t in sorted(tensors, key=lambda t: t.name):
        hdr[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    raw = json.dumps(hdr, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: str, tensors: list[Tensor], seed: int, block: int = 32 * MiB) -> int:
    """Write random values for TENSORS into a safetensors file; returns the tensor bytes."""
    rng = np.random.default_rng(seed)
    total = 0
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(_header(tensors, {"format": "pt"}))
        for t in sorted(tensors, key=lambda t: t.name):
            left = t.nbytes // 2
            while left:
                n = min(left, block // 2)
                f.write(_random_bf16(rng, n).tobytes())
                left -= n
            total += t.nbytes
    os.replace(tmp, path)
    return total


def relabel(src: str, dst: str, dtype: str) -> None:
    """Copy a 2-byte-dtype safetensors file, relabelling every tensor as DTYPE (same bytes).

    numpy has no bfloat16: the numpy variants of the benchmark load an F16-labelled copy."""
    with open(src, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
        for k, v in hdr.items():
            if k != "__metadata__":
                assert DTYPE_SIZE[v["dtype"]] == DTYPE_SIZE[dtype], (k, v["dtype"])
                v["dtype"] = dtype
        raw = json.dumps(hdr, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(dst + ".tmp", "wb") as g:
            g.write(struct.pack("<Q", len(raw)) + raw)
            while True:
                b = f.read(16 * MiB)
                if not b:
                    break
                g.write(b)
    os.replace(dst + ".tmp", dst)


def make_qwen3(size: str, out_dir: str, *, max_shard_size: int = 2 * GB, seed: int = 0) -> Model:
    """A synthetic Qwen3-SIZE model directory: config.json, shards, index."""
    cfg = qwen3_config(size)
    tensors = qwen3_tensors(cfg)
    os.makedirs(out_dir, exist_ok=True)
    groups = shard(tensors, max_shard_size)
    n = len(groups)
    model = Model(name=f"Qwen3-{size}", path=out_dir)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        model.nbytes += write_safetensors(os.path.join(out_dir, fname), group, seed=seed * 1000 + i)
        model.shards.append(fname)
        weight_map.update({t.name: fname for t in group})
    model.n_params = sum(t.nbytes // DTYPE_SIZE[t.dtype] for t in tensors)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": model.nbytes, "total_parameters": model.n_params},
                   "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, default=str)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"),
                   "do_sample": False}, f, indent=2)
    return model


def make_blob(path: str, nbytes: int, seed: int = 1) -> int:
    """One safetensors file of about NBYTES (rounded up to 8 MiB) of bf16 [rows, 4096] tensors,
    for the filesystem throughput runs."""
    row = 4096 * 2
    per = 128 * MiB
    tensors, left, i = [], nbytes, 0
    while left > 0:
        n = min(per, -(-left // (8 * MiB)) * 8 * MiB)
        tensors.append(Tensor(f"blob.{i:04d}", (n // row, 4096)))
        left -= n
        i += 1
    return write_safetensors(path, tensors, seed)


def model_stats(size: str) -> tuple[int, int]:
    """(parameters, bytes) of the synthetic Qwen3-SIZE without writing it."""
    ts = qwen3_tensors({**COMMON, **QWEN3[size]})
    return sum(t.nbytes // 2 for t in ts), sum(t.nbytes for t in ts)
