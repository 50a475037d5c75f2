"""Fuzzing with hypothesis: ``ctfs.format.header.parse_header_bytes``, ``ctfs.format.reader.CryptoFile``
(random files and mutated valid files), the ``ctfs.cryptometa`` parsers (and the policy
field and JWK set parsers beside them) and ``ctfs.mount.view.PlainView`` building. Only the
documented exceptions (``ctfs.errors.CtfsError`` subclasses) may escape; every example runs
under a deadline (no hang) and the process's peak RSS may not jump (no allocation in
proportion to a declared size or to nesting depth). The oracle is shared with the atheris
harnesses in tests/fuzz/, which a test here runs briefly so they keep working.

``CTFS_FUZZ_EXAMPLES`` is the total number of examples over the hypothesis tests here
(default 12000, about 20 s on 2 cores); raise it for a longer campaign.
"""
from __future__ import annotations

import json
import os
import random
import resource
import struct
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import oracle  # noqa: E402

from ctfs.errors import InvalidHeaderError  # noqa: E402
from ctfs.format.header import TensorInfo  # noqa: E402

TOTAL = int(os.environ.get("CTFS_FUZZ_EXAMPLES", "12000"))
SHARES = {"header_random": 0.22, "header_structured": 0.22, "cryptometa": 0.14, "keyset": 0.06,
          "file_random": 0.08, "file_mutated": 0.14, "file_resigned": 0.10, "view_plain": 0.04}
HERE = Path(__file__).parent


def fuzz_settings(share: str):
    return settings(max_examples=max(20, int(TOTAL * SHARES[share])),
                    deadline=timedelta(seconds=3), database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture])


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def seeds():
    s = oracle.Seeds()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def no_memory_blowup():
    """The process's peak RSS grows by less than 150 MiB over a whole fuzz test (declared
    sizes go up to 2^64 and nesting to 200,000 levels; a parser believing either would
    allocate far more). tracemalloc would be more precise but costs 10x the run time."""
    before = peak_rss_mib()
    yield
    grew = peak_rss_mib() - before
    assert grew < 150, f"peak RSS grew by {grew:.0f} MiB during the test"


# --- strategies: hypothesis draws a seed, the generators in oracle.py build the input -------------
# (hypothesis's own recursive strategies cost ~6 ms an example here; these cost ~0.1 ms)

SEEDS = st.integers(0, 2**64 - 1)


# --- header ------------------------------------------------------------------------------------

@fuzz_settings("header_random")
@given(st.binary(max_size=512), st.integers(0, 2**64 - 1))
@example(b"[" * 100_000 + b"]" * 100_000, 200_008)
@example(b'{"a":' * 50_000 + b"1" + b"}" * 50_000, 150_009)
@example(b'{"t":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,0]}}', 5060)
@example(b'{"t":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}', 100)
@example(b'{"t":{"dtype":"F32","shape":[1e400],"data_offsets":[0,4]}}', 70)
@example(b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]}}', 2**64 - 1)
@example(b'{"a":"\\ud800"}', 20)
@example(b'{"__metadata__":{"a":"b","a":"c"}}', 40)
def test_parse_header_random_bytes(raw, size):
    oracle.check_header_bytes(raw, size)


@fuzz_settings("header_structured")
@given(SEEDS)
def test_parse_header_structured(seed):
    raw, size = oracle.random_header_bytes(random.Random(seed))
    oracle.check_header_bytes(raw, size)


def test_deep_nesting_and_huge_numbers_are_documented_errors():
    from ctfs.format.header import parse_header_bytes
    for raw in (b"[" * 200_000, b'{"a":' * 200_000, b'{"t":[' + b"1" * 100_000 + b"]}"):
        with pytest.raises(InvalidHeaderError):
            parse_header_bytes(raw, 8 + len(raw))


# --- crypto metadata, policy field, JWK sets ----------------------------------------------------

TENSORS = {"a": TensorInfo("a", "F32", (50,), 0, 200), "b": TensorInfo("b", "U8", (37,), 200, 237),
           "z": TensorInfo("z", "F32", (0, 2), 237, 237)}


@fuzz_settings("cryptometa")
@given(SEEDS.map(lambda seed: oracle.random_crypto_metadata(random.Random(seed))))
@example('{"v":1,"chunk_size":1099511627776,"sha256":{"b":"' + "A" * 44 + '"}}')
@example('{"version":"2","chunk_size":4294967296,"enc":{"kty":"oct","alg":"aes256gcm"},"sign":{"kty":"okp","alg":"ed25519"}}')
@example("[" * 100_000)
def test_crypto_metadata_parsers(text):
    oracle.check_crypto_metadata(text, TENSORS)


@fuzz_settings("keyset")
@given(SEEDS)
def test_jwk_set_parser(seed):
    oracle.check_keyset_json(oracle.random_jwks(random.Random(seed)))


def test_jwk_set_deep_nesting_is_a_key_file_error():
    oracle.check_keyset_json("[" * 100_000)


# --- files: random, mutated, re-signed ------------------------------------------------------------

@fuzz_settings("file_random")
@given(SEEDS, st.integers(0, 2), st.binary(max_size=300), st.integers(0, 3), st.booleans())
def test_cryptofile_random_files(seeds, seed, kind, body, prefix_kind, require_encrypted):
    rng = random.Random(seed)
    raw = [rng.randbytes(rng.randrange(300)), oracle.random_header_bytes(rng)[0], b"{}"][kind]
    n = [len(raw), len(raw) + 1, max(len(raw) - 1, 0), 2**64 - 1][prefix_kind]
    data = struct.pack("<Q", n) + raw + body
    oracle.check_file(seeds.path, data, seeds.keys, require_encrypted=require_encrypted,
                      allow_unverified_plain=not require_encrypted)


@fuzz_settings("file_mutated")
@given(st.integers(0, 3), st.integers(0, 2**32), st.booleans())
def test_cryptofile_mutated_valid_files(seeds, which, seed, other_keys):
    """Byte-level mutations of valid files: refused, or EIO, or exactly the original bytes."""
    rng = random.Random(seed)
    data = oracle.mutate_bytes(seeds.files[which], rng)
    assume(data != seeds.files[which])
    keys = seeds.other_keys if other_keys and rng.random() < 0.3 else seeds.keys
    outcome = oracle.check_file(seeds.path, data, keys, original_view=seeds.views[which], rng=rng)
    if keys is seeds.other_keys:
        assert outcome == "refused"


@fuzz_settings("file_resigned")
@given(st.integers(0, 3), st.integers(0, 2**32), st.integers(1, 3))
def test_cryptofile_and_view_resigned_mutations(seeds, which, seed, rounds):
    """Structural header mutations, re-signed with the owner's key so they get past the
    signature into the crypto metadata, data-key and layout checks and PlainView."""
    rng = random.Random(seed)
    doc = oracle.header_doc(seeds.files[which])
    for _ in range(rounds):
        doc = oracle.mutate_doc(doc, rng)
    data = oracle.rebuild(seeds.files[which], doc, seeds.keys, rng)
    oracle.check_file(seeds.path, data, seeds.keys, rng=rng)


@fuzz_settings("view_plain")
@given(SEEDS)
def test_plain_view_of_unencrypted_files(seeds, seed):
    """PlainView over files with no crypto metadata (require_encrypted=False)."""
    rng = random.Random(seed)
    doc, data_len = oracle.random_header_doc(rng)
    raw = json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass") + b" " * rng.randrange(9)
    data = struct.pack("<Q", len(raw)) + raw + bytes(rng.randrange(256) for _ in range(min(data_len, 4096)))
    oracle.check_file(seeds.path, data, None, require_encrypted=False, allow_unverified_plain=True, rng=rng)


def test_header_padding_is_not_signed_but_cannot_change_what_is_served(seeds):
    """Found by the mutation fuzzer: dropping a trailing padding space from the header and
    decrementing the length field moves the data section by one byte but leaves a valid
    file (the signature covers the header's content, not its padding). Its view must then
    serve the same header content and exactly the original tensor bytes, one byte earlier;
    padding that is not whitespace is refused."""
    orig = seeds.files[0]
    (n,) = struct.unpack("<Q", orig[:8])
    assert orig[8 + n - 1:8 + n] == b" "
    moved = struct.pack("<Q", n - 1) + orig[8:8 + n - 1] + orig[8 + n:]
    assert oracle.check_file(seeds.path, moved, seeds.keys, original_view=seeds.views[0]) == "served"
    from ctfs.format.reader import CryptoFile
    from ctfs.mount.view import PlainView
    with open(seeds.path, "wb") as f:
        f.write(moved)
    cf = CryptoFile(seeds.path, seeds.keys)
    try:
        view = PlainView(cf)
        out = bytearray(view.size)
        assert view.read_into(0, memoryview(out)) == view.size == len(orig) - 1
        (vn,) = struct.unpack("<Q", seeds.views[0][:8])
        assert bytes(out[8 + n - 1:]) == seeds.views[0][8 + vn:]
    finally:
        cf.close()
    garbage = orig[:8 + n - 1] + b"x" + orig[8 + n:]
    assert oracle.check_file(seeds.path, garbage, seeds.keys, original_view=seeds.views[0]) == "refused"


def test_signed_huge_segment_sizes_do_not_allocate(seeds, tmp_path):
    """Signed headers declaring a 4 GiB chunk size (the read limit) and a 1 TiB digest chunk
    for small tensors open and read without allocating anything near those sizes."""
    import base64
    import hashlib
    doc = oracle.header_doc(seeds.files[0])  # v2, chunk 64, a/c/z encrypted, b plain
    meta = doc["__metadata__"]
    ck = json.loads(meta["__crypto_keys__"])
    dig = json.loads(meta["__ctfs_plain_sha256__"])
    (n,) = struct.unpack("<Q", seeds.files[0][:8])
    b = doc["b"]["data_offsets"]
    plain_b = seeds.files[0][8 + n + b[0]:8 + n + b[1]]
    dig["chunk_size"] = 2**40
    dig["sha256"]["b"] = base64.b64encode(hashlib.sha256(plain_b).digest()).decode()
    meta["__ctfs_plain_sha256__"] = json.dumps(dig, separators=(",", ":"))
    data = oracle.rebuild(seeds.files[0], doc, seeds.keys, random.Random(1))
    before = peak_rss_mib()
    assert oracle.check_file(seeds.path, data, seeds.keys) == "served"
    ck["chunk_size"] = 2**32  # every tensor is now one chunk: tags no longer match -> EIO
    enc = json.loads(meta["__encryption__"])
    for name, e in enc.items():
        e["tags"] = base64.b64encode(base64.b64decode(e["tags"])[:16]).decode()
    meta["__crypto_keys__"] = json.dumps(ck, separators=(",", ":"))
    meta["__encryption__"] = json.dumps(enc, separators=(",", ":"))
    data = oracle.rebuild(seeds.files[0], doc, seeds.keys, random.Random(1))
    assert oracle.check_file(seeds.path, data, seeds.keys) == "eio"
    assert peak_rss_mib() - before < 100


def _v1_tiny_plain_read_seconds(tmp_path) -> float:
    import time

    import numpy as np
    from safetensors.numpy import save_file

    from ctfs.format.keys import KeySet
    from ctfs.format.reader import CryptoFile
    from ctfs.format.writer import EncryptOptions, encrypt_file
    save_file({"a": np.arange(1 << 16, dtype=np.float32), "b": np.ones(1, dtype=np.uint8)},
              str(tmp_path / "p.safetensors"))
    keys = KeySet.generate()
    encrypt_file(str(tmp_path / "p.safetensors"), str(tmp_path / "e.safetensors"), keys,
                 EncryptOptions(version=1, exclude=["b"]))
    with CryptoFile(tmp_path / "e.safetensors", keys) as cf:
        t0 = time.monotonic()
        assert cf.tensor_bytes("a") == np.arange(1 << 16, dtype=np.float32).tobytes()
        return time.monotonic() - t0


def test_v1_tensor_read_time_does_not_depend_on_other_tensors(tmp_path):
    """A 256 KiB v1 tensor next to a 1-byte plain tensor decrypts in milliseconds, not 1 byte
    per Python-level step (~1 s here; 12 s for 4 MiB)."""
    assert _v1_tiny_plain_read_seconds(tmp_path) < 0.25


# --- the atheris harnesses keep working ------------------------------------------------------------

@pytest.mark.parametrize("harness", ["fuzz_header.py", "fuzz_view.py"])
def test_atheris_harness_runs(harness, tmp_path):
    r = subprocess.run([sys.executable, str(HERE / "fuzz" / harness), "-runs=2000", "-seed=1",
                        "-rss_limit_mb=1024", "-timeout=20"],
                       capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
