"""The safetensors container: parsing, validation, canonical form and serialisation.

Layout: ``u64 LE N`` + ``N`` bytes of UTF-8 JSON + data section. Validation follows the
reference (see format/SPEC.md §2) and is stricter in three places: duplicate JSON keys,
``NaN``/``Infinity`` literals and booleans used as integers are rejected.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping

from ..errors import (
    FileLengthError,
    FormatError,
    HeaderTooLargeError,
    HeaderTooSmallError,
    InvalidHeaderError,
    InvalidTensorInfoError,
)

MAX_HEADER_SIZE = 100_000_000
U64_MAX = 2**64 - 1

#: dtype -> size in bits, in the reference's enum order (the order is the "rank").
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
    "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32,
    "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
DTYPE_RANK: dict[str, int] = {name: i for i, name in enumerate(DTYPE_BITS)}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # offset in the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def entry(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape),
                "data_offsets": [self.start, self.end]}


@dataclass(frozen=True)
class Header:
    """A parsed and validated safetensors header."""

    header_len: int                 # N, padding included
    metadata: dict[str, str] | None  # __metadata__ exactly as stored (crypto keys included)
    tensors: dict[str, TensorInfo]   # in header order
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_len(self) -> int:
        return self.file_size - self.data_start

    def layout(self) -> list[TensorInfo]:
        """Tensors in data order, ties broken as the reference writer lays them out."""
        return sorted_tensors(self.tensors.values())


def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int:
    """Byte size of a tensor; raises InvalidTensorInfoError on overflow or a partial byte."""
    count = 1
    for dim in shape:
        count *= dim
        if count > U64_MAX:
            raise InvalidTensorInfoError(f"element count overflows for shape {list(shape)}")
    bits = count * DTYPE_BITS[dtype]
    if bits > U64_MAX:
        raise InvalidTensorInfoError("tensor size overflows")
    if bits % 8:
        raise InvalidTensorInfoError(
            f"{dtype} tensor of shape {list(shape)} does not fill whole bytes")
    return bits // 8


def sorted_tensors(tensors: Iterable[TensorInfo]) -> list[TensorInfo]:
    """Order by (start, end), ties by dtype rank descending then name: the reference
    writer's layout order, which makes signature verification deterministic even when
    zero-length tensors share an offset."""
    return sorted(tensors, key=lambda t: (t.start, t.end, -DTYPE_RANK[t.dtype], t.name))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads_strict(text: str):
    """json.loads that rejects duplicate keys and NaN/Infinity, and turns deep nesting
    into a ValueError."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _u64(value, what: str) -> int:
    if type(value) is not int or value < 0 or value > U64_MAX:
        raise InvalidHeaderError(f"{what} must be an unsigned 64-bit integer, got {value!r}")
    return value


def parse_header_bytes(raw: bytes, file_size: int, header_len: int | None = None) -> Header:
    """Parse and validate the N header bytes of a file of ``file_size`` bytes."""
    n = len(raw) if header_len is None else header_len
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidHeaderError(f"header is not valid UTF-8: {exc}") from None
    try:
        doc = loads_strict(text)
    except ValueError as exc:
        raise InvalidHeaderError(f"header is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidHeaderError("header is not a JSON object")
    try:  # lone surrogates ("\ud800") parse in Python but are not Unicode text
        dumps_compact(doc).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidHeaderError("header is not valid JSON: string with an unpaired surrogate") from None

    metadata = doc.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
                isinstance(v, str) for v in metadata.values()):
            raise InvalidHeaderError("__metadata__ must map strings to strings")

    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        if not isinstance(entry, dict):
            raise InvalidHeaderError(f"tensor {name!r}: entry is not an object")
        try:
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        except KeyError as exc:
            raise InvalidHeaderError(f"tensor {name!r}: missing field {exc.args[0]}") from None
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise InvalidTensorInfoError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list):
            raise InvalidHeaderError(f"tensor {name!r}: shape is not a list")
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise InvalidHeaderError(f"tensor {name!r}: data_offsets is not a pair")
        dims = tuple(_u64(d, f"tensor {name!r} shape") for d in shape)
        start, end = (_u64(o, f"tensor {name!r} data_offsets") for o in offsets)
        tensors[name] = TensorInfo(name, dtype, dims, start, end)

    expected = 0
    for t in sorted_tensors(tensors.values()):
        if t.start != expected or t.end < t.start:
            raise InvalidTensorInfoError(
                f"tensor {t.name!r}: data_offsets {[t.start, t.end]} are not contiguous "
                f"(expected start {expected})")
        if t.end - t.start != tensor_nbytes(t.dtype, t.shape):
            raise InvalidTensorInfoError(
                f"tensor {t.name!r}: {t.end - t.start} bytes do not match {t.dtype} {list(t.shape)}")
        expected = t.end
    if 8 + n + expected != file_size:
        raise FileLengthError(
            f"file is {file_size} bytes but the header describes {8 + n + expected} "
            f"(truncated or extended)")
    return Header(n, metadata, tensors, file_size)


def read_header(fd: int) -> Header:
    """Read and validate the header of an open file descriptor."""
    return read_header_from(lambda n, off: os.pread(fd, n, off), os.fstat(fd).st_size)


def read_header_blob(blob, named: bool = True) -> Header:
    """read_header of a :class:`ctfs.format.blob.Blob`; its errors name it unless not NAMED."""
    def pread(n: int, off: int) -> bytes:
        buf = bytearray(n)
        return bytes(buf[:blob.pread_into(buf, off)])
    try:
        return read_header_from(pread, blob.size)
    except FormatError as e:
        if not named:
            raise
        raise type(e)(f"{blob.name}: {e}") from None


def read_header_from(pread, file_size: int) -> Header:
    """Read and validate a header with ``pread(n, offset) -> bytes`` from a FILE_SIZE file."""
    prefix = pread(8, 0)
    if len(prefix) < 8:
        raise HeaderTooSmallError(f"file is {file_size} bytes, too small for a safetensors header")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_SIZE:
        raise HeaderTooLargeError(f"header length {n} exceeds the limit of {MAX_HEADER_SIZE} bytes")
    if 8 + n > file_size:
        raise FileLengthError(f"header length {n} runs past the end of the {file_size}-byte file")
    raw = pread(n, 8)
    if len(raw) != n:
        raise FileLengthError("file shrank while reading its header")
    return parse_header_bytes(raw, file_size)


def read_header_path(path: str | os.PathLike) -> Header:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_header_named(fd, os.fspath(path))
    finally:
        os.close(fd)


def read_header_named(fd: int, path: str) -> Header:
    """read_header whose errors name the file."""
    try:
        return read_header(fd)
    except FormatError as e:
        raise type(e)(f"{path}: {e}") from None


def dumps_compact(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def canonical_object(metadata: Mapping[str, str] | None, tensors: Iterable[TensorInfo],
                     *, sort_tensors: bool = True) -> dict:
    meta = dict(metadata or {})
    obj: dict = {"__metadata__": {k: meta[k] for k in sorted(meta)}}
    for t in (sorted_tensors(tensors) if sort_tensors else tensors):
        obj[t.name] = t.entry()
    return obj


def canonical_signed_message(metadata: Mapping[str, str] | None,
                             tensors: Iterable[TensorInfo]) -> bytes:
    """The exact bytes the Ed25519 signature covers (format/SPEC.md §5)."""
    meta = {k: v for k, v in (metadata or {}).items() if k != "__signature__"}
    return dumps_compact(canonical_object(meta, tensors)).encode("utf-8")


def serialize_header(metadata: Mapping[str, str] | None, tensors: Iterable[TensorInfo],
                     *, pad_to: int | None = None) -> bytes:
    """``u64 N`` + header JSON (metadata first, keys sorted; tensors in layout order),
    padded with spaces to a multiple of 8, or to exactly ``pad_to`` bytes."""
    obj = canonical_object(metadata, tensors) if metadata else {
        t.name: t.entry() for t in sorted_tensors(tensors)}
    body = dumps_compact(obj).encode("utf-8")
    if pad_to is None:
        pad_to = -(-len(body) // 8) * 8
    if len(body) > pad_to:
        raise ValueError(f"header of {len(body)} bytes does not fit in {pad_to}")
    body += b" " * (pad_to - len(body))
    return struct.pack("<Q", len(body)) + body
