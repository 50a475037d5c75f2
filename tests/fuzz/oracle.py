"""The fuzzing oracle shared by tests/test_fuzz.py (hypothesis) and the atheris harnesses.

The rule: parsing, opening, viewing and reading attacker-supplied bytes may only fail with
a documented exception (a subclass of ``ctfs.errors.CtfsError``); reads of an opened file
fail only with ``IntegrityError``; a mutated file that still opens and reads serves exactly
the original plaintext; nothing allocates memory in proportion to a *declared* size.
"""
from __future__ import annotations

import base64
import json
import os
import random
import struct
import tempfile

from ctfs.format import header as hdr
from ctfs.format import cryptometa
from ctfs.errors import CtfsError, IntegrityError
from ctfs.format.header import DTYPE_BITS, TensorInfo, parse_header_bytes
from ctfs.format.keys import KeySet
from ctfs.format.reader import CryptoFile
from ctfs.mount.view import PlainView

DTYPES = list(DTYPE_BITS)


class OracleFailure(AssertionError):
    pass


def expect_documented(fn, *args, **kw):
    """Call fn; a CtfsError is an accepted outcome (returns None), anything else fails."""
    try:
        return fn(*args, **kw)
    except CtfsError:
        return None
    except RecursionError as e:  # deep nesting must become a documented error
        raise OracleFailure(f"{fn.__qualname__}: RecursionError escaped: {e}") from e


# --- seeds --------------------------------------------------------------------------------------

class Seeds:
    """A key set and a few small valid encrypted files (bytes) with their plaintext views."""

    def __init__(self, workdir: str | None = None):
        import numpy as np
        from safetensors.numpy import save_file

        from ctfs.format.writer import EncryptOptions, encrypt_file

        self.keys = KeySet.generate(name="fuzz")
        self.other_keys = KeySet.generate(name="fuzz")  # same kids, other key material
        self._tmp = tempfile.TemporaryDirectory(prefix="ctfs-fuzz-", dir=workdir or _fast_tmp())
        d = self._tmp.name
        rng = np.random.default_rng(5)
        tensors = {
            "a": rng.standard_normal(50).astype(np.float32),
            "b": rng.integers(0, 255, 37, dtype=np.uint8),
            "c": rng.standard_normal((3, 7)).astype(np.float16),
            "z": np.zeros((0, 2), dtype=np.float32),
            "y": np.zeros(0, dtype=np.int8),
        }
        plain = os.path.join(d, "plain.safetensors")
        save_file(tensors, plain, metadata={"format": "np", "note": "fuzz \u00e9"})
        self.files: list[bytes] = []
        self.views: list[bytes] = []
        variants = [
            EncryptOptions(version=2, chunk_size=64, include=["a", "c", "z"]),
            EncryptOptions(version=2, chunk_size=4096),
            EncryptOptions(version=1, include=["b", "z"]),
            EncryptOptions(version=2, chunk_size=16, include=["a"], plain_digests=True),
        ]
        for i, opts in enumerate(variants):
            out = os.path.join(d, f"seed{i}.safetensors")
            encrypt_file(plain, out, self.keys, opts)
            with open(out, "rb") as f:
                self.files.append(f.read())
            with CryptoFile(out, self.keys) as cf:
                view = PlainView(cf)
                buf = bytearray(view.size)
                view.read_into(0, memoryview(buf))
                self.views.append(bytes(buf))
        self.path = os.path.join(d, "case.safetensors")

    def close(self) -> None:
        self._tmp.cleanup()


def _fast_tmp() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


# --- checks ------------------------------------------------------------------------------------

def check_header_bytes(raw: bytes, file_size: int | None = None) -> None:
    """parse_header_bytes on arbitrary bytes."""
    if file_size is None:
        file_size = 8 + len(raw)
    h = expect_documented(parse_header_bytes, raw, file_size)
    if h is None:
        return
    # a header that parses describes a consistent layout
    if h.header_len != len(raw) or h.file_size != file_size:
        raise OracleFailure("header length / file size not as given")
    end = 0
    for t in h.layout():
        if t.start != end or t.end < t.start:
            raise OracleFailure(f"accepted non-contiguous layout at {t.name!r}")
        end = t.end
    if 8 + len(raw) + end != file_size:
        raise OracleFailure("accepted a file length that does not match")
    # the canonical form round-trips
    body = hdr.serialize_header(h.metadata, h.tensors.values())
    again = parse_header_bytes(body[8:], 8 + len(body) - 8 + end)
    if {n: t.entry() for n, t in again.tensors.items()} != {n: t.entry() for n, t in h.tensors.items()}:
        raise OracleFailure("canonical header does not round-trip")


def check_file(path: str, data: bytes, keys: KeySet | None, *, original_view: bytes | None = None,
               require_encrypted: bool = True, allow_unverified_plain: bool = False,
               rng: random.Random | None = None) -> str:
    """Write ``data`` to ``path``, open it, build its PlainView and read it entirely.

    Returns "refused", "eio" (opened, some read failed with IntegrityError) or "served".
    With ``original_view``, a served view must equal it byte for byte."""
    with open(path, "wb") as f:
        f.write(data)
    cf = expect_documented(CryptoFile, path, keys, require_encrypted=require_encrypted,
                           allow_unverified_plain=allow_unverified_plain)
    if cf is None:
        return "refused"
    try:
        if cf.data_start + cf.data_len != len(data):
            raise OracleFailure("opened a file whose layout does not match its length")
        view = PlainView(cf)  # any exception here is a bug
        if view.size != len(data) or len(view.header_bytes) != cf.data_start:
            raise OracleFailure("view size or header length differs from the file's")
        vh = parse_header_bytes(view.header_bytes[8:], view.size)
        if {n: t.entry() for n, t in vh.tensors.items()} != \
                {n: t.entry() for n, t in cf.tensors.items()}:
            raise OracleFailure("the view's header describes other tensors")
        if any(k in (vh.metadata or {}) for k in cryptometa.RESERVED_KEYS):
            raise OracleFailure("crypto metadata leaked into the view's header")
        if original_view is not None and len(original_view) != view.size:
            # A mutation may legitimately move the data section: the header's trailing
            # padding is not signed, so a file whose header lost or gained padding (and
            # whose length field says so) is still valid. Its view must then say the same
            # as the original's, header content and every data byte, at the new offsets.
            (olen,) = struct.unpack("<Q", original_view[:8])
            oh = parse_header_bytes(original_view[8:8 + olen], len(original_view))
            if (oh.metadata, {n: t.entry() for n, t in oh.tensors.items()}) != \
                    (vh.metadata, {n: t.entry() for n, t in vh.tensors.items()}):
                raise OracleFailure("a moved data section with a different header was served")
            original_view = bytes(view.header_bytes) + original_view[8 + olen:]
        out = bytearray(view.size)
        pos, eio = 0, False
        rng = rng or random.Random(len(data))
        while pos < view.size:
            n = rng.choice((1, 7, 64, 4096, 65536, view.size))
            try:
                got = view.read_into(pos, memoryview(out)[pos:pos + n])
            except IntegrityError:
                eio = True
                got = min(n, view.size - pos)
                out[pos:pos + got] = bytes(got)
                if original_view is not None:
                    original_view = original_view[:pos] + bytes(got) + original_view[pos + got:]
            if got <= 0:
                raise OracleFailure(f"read at {pos} returned {got}")
            pos += got
        if original_view is not None and bytes(out) != original_view:
            raise OracleFailure("served bytes that differ from the original plaintext")
        return "eio" if eio else "served"
    finally:
        cf.close()


def check_crypto_metadata(text: str, tensors: dict[str, TensorInfo]) -> None:
    """The metadata parsers on an arbitrary string."""
    ck = expect_documented(cryptometa.parse_crypto_keys, text)
    keys = ck or cryptometa.CryptoKeys("2", 16, cryptometa.KeyRef("oct", "aes256gcm", None, None),
                                       cryptometa.KeyRef("okp", "ed25519", None, None))
    for key_len in (16, 32):
        expect_documented(cryptometa.parse_encryption, text, tensors, keys, key_len)
    v1 = cryptometa.CryptoKeys("1", None, keys.enc, keys.sign)
    expect_documented(cryptometa.parse_encryption, text, tensors, v1, 32)
    expect_documented(cryptometa.parse_plain_digests, text, tensors, set(list(tensors)[:1]))
    from ctfs.auth.policy import parse_policy_field
    expect_documented(parse_policy_field, text)


def check_keyset_json(text) -> None:
    expect_documented(KeySet.from_json, text)


# --- mutations ---------------------------------------------------------------------------------

def mutate_bytes(data: bytes, rng: random.Random, n_ops: int | None = None) -> bytes:
    """Byte-level mutations of a file, biased towards its header."""
    b = bytearray(data)
    (n,) = struct.unpack("<Q", data[:8]) if len(data) >= 8 else (0,)
    for _ in range(n_ops or rng.randint(1, 4)):
        op = rng.randrange(9)
        r, hdr_end = rng.random(), min(len(b), 8 + n)
        if r < 0.45:                                        # the header
            p = rng.randrange(max(hdr_end, 1))
        elif r < 0.8 and hdr_end < len(b):                  # the data section
            p = rng.randrange(hdr_end, len(b))
        else:
            p = rng.randrange(max(len(b), 1))
        if op == 0 and b:                                   # flip a bit
            b[p % len(b)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:                                 # set a byte
            b[p % len(b)] = rng.choice(b'\x00 \t\n"{}[],:\\0123456789eE-+.\xff\x80')
        elif op == 2:                                       # insert bytes
            b[p:p] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3:                                       # delete a range
            del b[p:p + rng.randint(1, 16)]
        elif op == 4:                                       # truncate
            del b[rng.randrange(len(b) + 1):]
        elif op == 5:                                       # extend
            b += bytes(rng.randint(1, 64))
        elif op == 6:                                       # new length prefix
            b[0:8] = struct.pack("<Q", rng.choice(
                [0, 1, 2, n - 1, n + 1, len(b), len(b) - 8, 100_000_000, 100_000_001, 2**63, 2**64 - 1]) % 2**64)
        elif op == 7 and len(b) > 16:                       # duplicate a region
            q = rng.randrange(len(b))
            b[p:p] = b[q:q + rng.randint(1, 32)]
        else:                                               # swap two bytes
            if len(b) > 1:
                q = rng.randrange(len(b))
                b[p % len(b)], b[q] = b[q], b[p % len(b)]
    return bytes(b)


WEIRD_VALUES = [None, True, False, 0, -1, 1, 2**32, 2**32 + 1, 2**63, 2**64 - 1, 2**64, 10**30,
                1.5, 1e308, "", "x", "4096", "2", [], [1, 2], {}, {"a": "b"}, "A===",
                "AAAA", "!!!!", "\ud800", "é" * 10]


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def mutate_doc(doc: dict, rng: random.Random) -> dict:
    """A structural mutation of a parsed header (tensor entries and crypto metadata)."""
    doc = json.loads(json.dumps(doc))
    meta = doc.get("__metadata__")
    if not isinstance(meta, dict):
        meta = doc["__metadata__"] = {}
    names = [k for k in doc if k != "__metadata__"]
    op = rng.randrange(12)
    if op == 0 and names:                                   # tensor field
        t = doc[rng.choice(names)]
        field = rng.choice(["dtype", "shape", "data_offsets"])
        t[field] = rng.choice([rng.choice(DTYPES), [rng.choice([0, 1, 3, 2**33, 2**64 - 1]) for _ in range(rng.randint(0, 3))],
                               [0, rng.choice([0, 1, 64, 2**40])], rng.choice(WEIRD_VALUES)])
    elif op == 1 and names:                                 # drop / rename a tensor
        name = rng.choice(names)
        entry = doc.pop(name)
        if rng.random() < 0.5:
            doc[name + rng.choice(["_", "é", "\x00", "__metadata__"])] = entry
    elif op == 2:                                           # add a tensor
        doc[f"new{rng.randrange(9)}"] = {"dtype": rng.choice(DTYPES), "shape": [rng.randrange(4)],
                                          "data_offsets": [0, rng.randrange(8)]}
    elif op == 3 and meta:                                  # drop a metadata key
        meta.pop(rng.choice(list(meta)))
    elif op in (4, 5, 6, 7, 8):                             # mutate an inner JSON document
        key = [cryptometa.CRYPTO_KEYS, cryptometa.ENCRYPTION, cryptometa.PLAIN_DIGESTS,
               cryptometa.ENCRYPTION, cryptometa.CRYPTO_KEYS][op - 4]
        if key in meta:
            try:
                inner = json.loads(meta[key])
            except (ValueError, RecursionError):
                inner = None
            meta[key] = json.dumps(_mutate_inner(inner, rng), ensure_ascii=False)
    elif op == 9:                                           # replace a metadata value
        key = rng.choice(list(cryptometa.RESERVED_KEYS[:4]) + [cryptometa.PLAIN_DIGESTS, "format"])
        meta[key] = rng.choice(["", "{}", "[]", "null", "1", deep_json(rng.choice([10, 5000, 100000])),
                                '{"a":1,"a":2}', "NaN", '{"local":1,"remote":""}', '{"remote":""}'])
    elif op == 10:                                          # metadata not a string map
        doc["__metadata__"] = rng.choice([None, [], {"k": 1}, {"k": None}, "x"])
    else:                                                   # policy: malformed only (no engine runs)
        meta[cryptometa.POLICY] = rng.choice(['{"local":5,"remote":""}', '[]', 'x', '{"local":"package model\\nallow = true"}'])
    return doc


def _mutate_inner(inner, rng: random.Random):
    if isinstance(inner, dict) and inner and rng.random() < 0.85:
        k = rng.choice(list(inner))
        r = rng.random()
        if r < 0.2:
            inner.pop(k)
        elif r < 0.5 and isinstance(inner[k], (dict, list)):
            inner[k] = _mutate_inner(inner[k], rng)
        elif r < 0.7 and isinstance(inner[k], str):
            try:
                raw = base64.b64decode(inner[k], validate=True)
                raw = raw[:-1] if raw and rng.random() < 0.5 else raw + b"\0" * rng.randint(1, 16)
                inner[k] = base64.b64encode(raw).decode()
            except ValueError:
                inner[k] = rng.choice(WEIRD_VALUES)
        else:
            inner[k] = rng.choice(WEIRD_VALUES)
        if rng.random() < 0.2:
            inner[rng.choice(["x", "chunk_size", "v", "version", "sha256"])] = rng.choice(WEIRD_VALUES)
        return inner
    if isinstance(inner, list) and inner:
        inner[rng.randrange(len(inner))] = rng.choice(WEIRD_VALUES)
        return inner
    return rng.choice(WEIRD_VALUES)


def rebuild(data: bytes, doc: dict, keys: KeySet | None, rng: random.Random) -> bytes:
    """The file ``data`` with its header replaced by ``doc``, re-signed with ``keys`` when
    the document allows (so mutations reach the checks behind the signature)."""
    (n,) = struct.unpack("<Q", data[:8])
    body = data[8 + n:]
    meta = doc.get("__metadata__")
    if keys is not None and isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values()):
        try:
            tensors = [TensorInfo(k, v["dtype"], tuple(v["shape"]), *v["data_offsets"])
                       for k, v in doc.items() if k != "__metadata__"]
            msg = hdr.canonical_signed_message(meta, tensors)
        except Exception:  # noqa: BLE001 - not signable: leave the old signature
            msg = None
        if msg is not None:
            from ctfs.format.signing import sign
            meta[cryptometa.SIGNATURE] = sign(msg, keys.signer())
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.2, separators=(",", ":")).encode("utf-8", "surrogatepass")
    pad = n if len(text) <= n and rng.random() < 0.8 else len(text) + rng.randrange(8)
    text += b" " * (pad - len(text))
    return struct.pack("<Q", len(text)) + text + body


def header_doc(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n])


# --- random generators (plain ``random.Random``: fast, shared by hypothesis tests and harnesses) ---

ODD_INTS = [0, 1, 2, 3, 7, 64, 2**31, 2**32, 2**53 + 1, 2**63, 2**64 - 1, 2**64, 2**70, -1, -(2**63)]
ODD_TEXT = ["", "a", "t0", "é", "\x00", "\ud800", "__metadata__", "F32", "1", " ", "\u2028", "🙂"]


def random_int(rng: random.Random):
    r = rng.random()
    if r < 0.5:
        return rng.randrange(65)
    if r < 0.8:
        return rng.choice(ODD_INTS)
    return rng.randrange(-(2**65), 2**65)


def random_json(rng: random.Random, depth: int = 3):
    r = rng.random()
    if depth <= 0 or r < 0.55:
        return rng.choice([None, True, False, random_int(rng), rng.random() * 1e3, float("inf"),
                           rng.choice(ODD_TEXT), rng.randbytes(rng.randrange(6)).decode("latin-1")])
    if r < 0.8:
        return [random_json(rng, depth - 1) for _ in range(rng.randrange(4))]
    return {rng.choice(ODD_TEXT + ["dtype", "shape", "data_offsets", "k"]): random_json(rng, depth - 1)
            for _ in range(rng.randrange(4))}


def random_header_doc(rng: random.Random) -> tuple[dict, int]:
    """A header-like document (mostly well-formed tensor tables with odd values) and the data
    length its layout implies when it is consistent."""
    doc: dict = {}
    if rng.random() < 0.6:
        doc["__metadata__"] = rng.choice([
            {rng.choice(ODD_TEXT): rng.choice(ODD_TEXT) for _ in range(rng.randrange(4))},
            None, random_json(rng, 2)])
    offset = 0
    for i in range(rng.randrange(7)):
        dtype = rng.choice(DTYPES) if rng.random() < 0.8 else rng.choice(
            ["F8_E4M3FNUZ", "f32", "", "U128", 1, None, ["F32"]])
        r = rng.random()
        if r < 0.6:
            shape = [rng.randrange(10) for _ in range(rng.randrange(4))]
        elif r < 0.9:
            shape = [random_int(rng) for _ in range(rng.randrange(5))]
        else:
            shape = random_json(rng, 2)
        consistent = rng.random() < 0.75 and isinstance(dtype, str) and dtype in DTYPE_BITS and isinstance(shape, list) and \
            all(type(d) is int and 0 <= d < 2**20 for d in shape)
        if consistent:
            count = 1
            for d in shape:
                count *= d
            size = count * DTYPE_BITS[dtype] // 8
            offsets = [offset, offset + size]
            offset += size
        else:
            offsets = rng.choice([[random_int(rng), random_int(rng)], [offset], [offset, offset, 1],
                                  random_json(rng, 1), [float(offset), offset], [True, False]])
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if rng.random() < 0.1:
            entry.pop(rng.choice(list(entry)))
        if rng.random() < 0.1:
            entry["extra"] = random_json(rng, 1)
        doc[f"t{i}" if rng.random() < 0.8 else rng.choice(ODD_TEXT) + str(i)] = entry
    if doc and rng.random() < 0.3:  # shuffle member order
        items = list(doc.items())
        rng.shuffle(items)
        doc = dict(items)
    return doc, offset


def random_header_bytes(rng: random.Random) -> tuple[bytes, int]:
    """(header bytes, file size) from random_header_doc, serialised in various ways."""
    doc, data_len = random_header_doc(rng)
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.3,
                      separators=rng.choice([(",", ":"), (", ", ": ")]),
                      indent=rng.choice([None, None, None, 1]))
    raw = text.encode("utf-8", "surrogatepass")
    raw = rng.choice([b"", b"\n", b"\t\r\n ", b"\0", b" x", b" " * rng.randrange(64)]) * (rng.random() < 0.1) + raw
    raw += rng.choice([b"", b" " * 7, b"\t\n\r ", b"\0", b" x", b"}"])
    if rng.random() < 0.2:
        raw = mutate_bytes(b"\0" * 8 + raw, rng, rng.randint(1, 3))[8:]
    size = 8 + len(raw) + data_len if rng.random() < 0.7 else rng.choice(
        [0, 8 + len(raw), 8 + len(raw) + data_len + 1, random_int(rng) % 2**64])
    return raw, size


def random_crypto_metadata(rng: random.Random) -> str:
    """A string for the crypto-metadata parsers: shaped like one of them, or anything."""
    b64 = lambda: base64.b64encode(rng.randbytes(rng.choice([0, 11, 12, 13, 16, 32, 48, 64]))).decode() \
        if rng.random() < 0.8 else random_json(rng, 1)  # noqa: E731
    choice = rng.randrange(7)
    if choice == 0:
        return rng.randbytes(rng.randrange(48)).decode("utf-8", "replace")
    if choice == 1:
        return json.dumps(random_json(rng, 4))
    if choice == 2:
        doc = {"version": rng.choice(["1", "2", "3", 2, None]),
               "chunk_size": random_int(rng) if rng.random() < 0.8 else random_json(rng, 1),
               "enc": {"kty": rng.choice(["oct", "OCT", "okp"]),
                       "alg": rng.choice(["aes256gcm", "AES-128-GCM", "ChaCha20-Poly1305", "x", 5]),
                       "kid": rng.choice(["k", 5, None]), "jku": rng.choice(["file:///x", 1, None])},
               "sign": {"kty": rng.choice(["okp", "OKP", "oct"]), "alg": rng.choice(["ed25519", "EdDSA", None])}}
        for _ in range(rng.randrange(3)):
            k = rng.choice(list(doc))
            doc[k] = random_json(rng, 2) if rng.random() < 0.5 else doc.pop(k, None)
        return json.dumps({k: v for k, v in doc.items() if v is not None or rng.random() < 0.5})
    if choice == 3:
        fields = ("wrapped_key", "key_iv", "key_tag", "iv", "tag", "base_iv", "tags")
        return json.dumps({rng.choice(["a", "b", "z", "nope"]):
                           {f: b64() for f in fields if rng.random() < 0.85} if rng.random() < 0.9
                           else random_json(rng, 1) for _ in range(rng.randrange(4))})
    if choice == 4:
        return json.dumps({"v": rng.choice([1, 1, 2, "1", True]),
                           "chunk_size": rng.choice([16, 64, 0, -1, 2**40, 2**64, 1.5, "16"]),
                           "sha256": {rng.choice(["a", "b", "z", "q"]): b64() for _ in range(rng.randrange(3))}
                           if rng.random() < 0.9 else random_json(rng, 1)})
    if choice == 5:
        return json.dumps({"local": rng.choice([1, None, "x", DEFAULT_POLICY]), "remote": rng.choice(["", 1])})
    return deep_json(rng.choice([1, 10, 999, 1000, 5000, 200_000]))


DEFAULT_POLICY = "package model\nallow = true"


def random_jwks(rng: random.Random) -> str:
    def key():
        k = {"kty": rng.choice(["oct", "okp", "OKP", None]),
             "alg": rng.choice(["aes256gcm", "aes128gcm", "chacha20poly1305", "ed25519", "x", 1]),
             "kid": rng.choice(["k", "k", "j", 1, None]),
             "k": base64.b64encode(rng.randbytes(rng.choice([16, 32, 31]))).decode(),
             "x": base64.b64encode(rng.randbytes(rng.choice([32, 31]))).decode(),
             "d": base64.b64encode(rng.randbytes(rng.choice([32, 33]))).decode()}
        for f in list(k):
            if rng.random() < 0.2:
                k.pop(f)
            elif rng.random() < 0.05:
                k[f] = random_json(rng, 1)
        return k
    r = rng.random()
    if r < 0.5:
        return json.dumps({"keys": [key() for _ in range(rng.randrange(4))]})
    if r < 0.7:
        return json.dumps([key() for _ in range(rng.randrange(3))])
    if r < 0.8:
        return json.dumps(key())
    if r < 0.95:
        return json.dumps(random_json(rng, 3))
    return rng.randbytes(rng.randrange(40)).decode("latin-1")
