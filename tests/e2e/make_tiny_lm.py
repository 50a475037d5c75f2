"""Build a tiny random-weight causal LM (Qwen3) as sharded safetensors.

Usable as a library::

    from tests.e2e.make_tiny_lm import make_tiny_causal_lm
    make_tiny_causal_lm("/tmp/tiny")

or as a CLI::

    python tests/e2e/make_tiny_lm.py OUT_DIR [--seed N]

The output directory gets config.json, generation_config.json,
model.safetensors.index.json and several model-0000X-of-0000N.safetensors
shards (bf16).  No tokenizer files are written: vLLM is run with
skip_tokenizer_init=True and fed token ids directly.
"""

from __future__ import annotations

import argparse
import os

VOCAB_SIZE = 1024


def make_tiny_causal_lm(out_dir: str, seed: int = 0) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="bfloat16",
    )
    # Some transformers versions use `dtype` instead of `torch_dtype`.
    config.dtype = torch.bfloat16

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    # Larger-than-default init so that greedy outputs depend on the prompt
    # (a near-zero init makes every logit ~equal).
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model = model.to(torch.bfloat16)
    # Never end generation early on eos: tests compare fixed-length outputs.
    model.generation_config.eos_token_id = None
    os.makedirs(out_dir, exist_ok=True)
    # embed_tokens / lm_head are 1024*128*2 B = 256 KiB each: a 300 KB cap
    # gives several shards plus model.safetensors.index.json.
    model.save_pretrained(out_dir, max_shard_size="300KB", safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    make_tiny_causal_lm(args.out_dir, seed=args.seed)
    print(args.out_dir)


if __name__ == "__main__":
    main()
