#!/usr/bin/env python3
"""Fuzz opening, viewing and reading whole CryptoTensors files: CryptoFile + PlainView.

    python tests/fuzz/fuzz_view.py -runs=100000

Input: a whole file. The first seeds are small valid encrypted files (v1, v2, partial
encryption with digests, zero-length tensors). Oracle (tests/fuzz/oracle.py): only
ctfs.errors.CtfsError subclasses escape at open, only IntegrityError at read, the view
header matches the file; a file that still opens and reads serves exactly a seed's
plaintext when it is a byte-level mutation of that seed. Inputs whose first byte is 0xA5
are instead taken as a structural mutation recipe (seed, rng seed) whose result is
re-signed with the owner's key, to reach the checks behind the signature.
"""
from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _driver  # noqa: E402

with _driver.instrumented():
    import oracle  # noqa: E402

SEEDS = oracle.Seeds(workdir=_driver.WORKDIR)
RESIGN = 0xA5


def test_one_input(data: bytes) -> None:
    if len(data) >= 6 and data[0] == RESIGN:
        which = data[1] % len(SEEDS.files)
        rng = random.Random(int.from_bytes(data[2:6], "little"))
        doc = oracle.header_doc(SEEDS.files[which])
        for _ in range(1 + data[1] % 3):
            doc = oracle.mutate_doc(doc, rng)
        oracle.check_file(SEEDS.path, oracle.rebuild(SEEDS.files[which], doc, SEEDS.keys, rng),
                          SEEDS.keys, rng=rng)
        return
    original = None
    for f, v in zip(SEEDS.files, SEEDS.views):  # same length and prefix: a mutation of f
        if len(f) == len(data) and f[:8] == data[:8]:
            original = v
            break
    oracle.check_file(SEEDS.path, data, SEEDS.keys, original_view=original,
                      rng=random.Random(len(data)))


def mutate(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.25:
        return bytes([RESIGN, rng.randrange(256)]) + rng.randbytes(4)
    return oracle.mutate_bytes(data, rng)


if __name__ == "__main__":
    try:
        _driver.run(test_one_input, list(SEEDS.files), mutate)
    finally:
        SEEDS.close()
