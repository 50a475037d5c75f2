#!/usr/bin/env python3
"""Fuzz the safetensors container parser and the crypto-metadata / policy / JWK parsers.

    python tests/fuzz/fuzz_header.py -runs=100000          # atheris (libFuzzer flags)
    python tests/fuzz/fuzz_header.py -runs=2000 CORPUS/    # or the plain random driver

Input: the bytes after an 8-byte length prefix, i.e. the header JSON. Oracle (tests/fuzz/
oracle.py): only ctfs.errors.CtfsError subclasses escape; an accepted header describes a
contiguous layout matching the file length and round-trips through the canonical form.
"""
from __future__ import annotations

import os
import random
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _driver  # noqa: E402

with _driver.instrumented():
    import oracle  # noqa: E402
    from ctfs.format.header import TensorInfo  # noqa: E402

TENSORS = {"a": TensorInfo("a", "F32", (50,), 0, 200), "b": TensorInfo("b", "U8", (37,), 200, 237)}


def test_one_input(data: bytes) -> None:
    if len(data) < 1:
        return
    mode, body = data[0] % 4, data[1:]
    if mode == 0:  # exact file length: as read_header would see a well-formed file
        oracle.check_header_bytes(body, 8 + len(body) + (data[0] >> 2) * 64)
    elif mode == 1:
        oracle.check_header_bytes(body)
    elif mode == 2:
        text = body.decode("utf-8", "replace")
        oracle.check_crypto_metadata(text, TENSORS)
    else:
        try:
            oracle.check_keyset_json(body)
        except oracle.OracleFailure as e:
            if "RecursionError" not in str(e):  # known bug, tracked in tests/test_fuzz.py
                raise


def seeds() -> list[bytes]:
    s = oracle.Seeds(workdir=_driver.WORKDIR)
    try:
        out = []
        for f in s.files:
            (n,) = struct.unpack("<Q", f[:8])
            out += [bytes([0]) + f[8:8 + n].rstrip(b" "), bytes([1]) + f[8:8 + n]]
            meta = oracle.header_doc(f)["__metadata__"]
            out += [bytes([2]) + meta[k].encode() for k in meta if k.startswith("__") and k != "__signature__"]
        out.append(bytes([3]) + b'{"keys":[{"kty":"oct","alg":"aes256gcm","kid":"k","k":"' + b"A" * 43 + b'="}]}')
        return out
    finally:
        s.close()


def mutate(data: bytes, rng: random.Random) -> bytes:
    m = oracle.mutate_bytes(b"\0" * 8 + data[1:], rng)[8:]
    return bytes([data[0] if data and rng.random() < 0.9 else rng.randrange(256)]) + m


if __name__ == "__main__":
    _driver.run(test_one_input, seeds(), mutate)
