"""vLLM engine start-up time (run with the vLLM venv's python, not the main one).

    VENV_PY benchmarks/vllm_start.py --model DIR

Prints one JSON line on stdout: ``import_s`` (import vllm), ``engine_s`` (``LLM(...)``
construction: config, worker start, weight loading, KV cache), ``generate_s`` (one token)
and ``total_s``. vLLM's own "Loading weights took" / "Model loading took" log lines go to
stderr; the caller parses them for the weight-loading time alone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# The same environment defaults as the end-to-end test's runner (one place to tune them).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))
from vllm_generate import ENV_DEFAULTS as _ENV  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--max-model-len", type=int, default=256)
    args = ap.parse_args()
    for k, v in _ENV.items():
        os.environ.setdefault(k, v)
    t0 = time.monotonic()
    from vllm import LLM, SamplingParams
    t1 = time.monotonic()
    llm = LLM(model=args.model, dtype="bfloat16", enforce_eager=True, skip_tokenizer_init=True,
              max_model_len=args.max_model_len, max_num_seqs=1, seed=0, load_format="safetensors")
    t2 = time.monotonic()
    out = llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}],
                       SamplingParams(temperature=0.0, max_tokens=1, detokenize=False), use_tqdm=False)
    t3 = time.monotonic()
    assert len(out[0].outputs[0].token_ids) == 1
    print(json.dumps({"import_s": t1 - t0, "engine_s": t2 - t1, "generate_s": t3 - t2,
                      "total_s": t3 - t0}), flush=True)
    sys.stderr.flush()
    os._exit(0)  # vLLM's shutdown can linger on CPU; the figures are out


if __name__ == "__main__":
    sys.exit(main())
