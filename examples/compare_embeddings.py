"""Load a sentence-embedding model from two directories with unmodified transformers and
check that both give bit-identical embeddings. Usage: compare_embeddings.py PLAIN MOUNT"""
import sys

import torch
from transformers import AutoModel, AutoTokenizer

SENTENCES = ["Encrypted at rest, plain at inference.", "ctfs mounts CryptoTensors files."]


def embed(path):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    return (out * mask).sum(1) / mask.sum(1)


if __name__ == "__main__":
    plain, mounted = embed(sys.argv[1]), embed(sys.argv[2])
    assert torch.equal(plain, mounted), "embeddings differ"
    print(f"embeddings identical: {tuple(mounted.shape)}, first values {mounted[0, :4].tolist()}")
