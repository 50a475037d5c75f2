"""Greedy generation from token ids with unmodified vLLM (CPU build).

Run with the vLLM venv's python (see .ci/setup_vllm_venv.sh), not the main
environment's::

    $VENV/bin/python tests/e2e/vllm_generate.py --model DIR \
        --prompt-ids 1,2,3 --prompt-ids 4,5 --max-tokens 8 --out result.json

Writes ``{"tokens": [[...], ...]}``: one list of generated token ids per
--prompt-ids, in order.  No tokenizer files are needed (skip_tokenizer_init),
no network is used (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are forced on).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Defaults that make vLLM's CPU backend start quickly on a small (2-core,
# shared) machine.  Anything already set in the environment wins.
ENV_DEFAULTS = {
    # KV cache size in GiB (default would be a fraction of RAM).
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # "auto" reserves one core for the scheduler and pins the worker's OpenMP
    # threads to the other; on a shared 2-core box don't pin at all.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    # Skip the warm-up forward pass (saves time; outputs are unaffected).
    "VLLM_CPU_CI_ENV": "1",
    # Run the engine core in this process (no EngineCore subprocess): faster
    # start-up and shutdown.  The model worker is still a spawned process.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # Keep vLLM's internal sockets (ZMQ / gloo) on loopback.
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_LOOPBACK_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _parse_ids(s: str) -> list[int]:
    ids = [int(x) for x in s.replace(" ", "").split(",") if x != ""]
    if not ids:
        raise argparse.ArgumentTypeError("empty --prompt-ids")
    return ids


def _config_dtype(model_dir: str) -> str:
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
    except OSError:
        return "bfloat16"
    dt = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    return str(dt).removeprefix("torch.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory")
    ap.add_argument(
        "--prompt-ids",
        action="append",
        type=_parse_ids,
        required=True,
        help="comma-separated token ids; repeat for several prompts",
    )
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--out", required=True, help="output JSON path")
    ap.add_argument("--dtype", default=None, help="default: config.json's dtype")
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)

    t0 = time.monotonic()
    from vllm import LLM, SamplingParams

    dtype = args.dtype or _config_dtype(args.model)
    llm = LLM(
        model=args.model,
        dtype=dtype,
        enforce_eager=True,
        skip_tokenizer_init=True,
        max_model_len=args.max_model_len,
        max_num_seqs=max(1, len(args.prompt_ids)),
        seed=args.seed,
        load_format="safetensors",
    )
    t1 = time.monotonic()
    params = SamplingParams(
        temperature=0.0,
        max_tokens=args.max_tokens,
        min_tokens=args.max_tokens,
        ignore_eos=True,
        detokenize=False,
    )
    prompts = [{"prompt_token_ids": ids} for ids in args.prompt_ids]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    t2 = time.monotonic()
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    with open(args.out, "w") as f:
        json.dump({"tokens": tokens}, f)
    print(
        f"vllm_generate: load {t1 - t0:.1f}s, generate {t2 - t1:.1f}s, "
        f"{len(tokens)} prompt(s) -> {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
