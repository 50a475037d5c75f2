"""Container parsing and validation: each malformed header gets its documented exception."""
from __future__ import annotations

import json
import struct

import pytest

from ctfs import errors
from ctfs.format.header import (
    MAX_HEADER_SIZE, TensorInfo, canonical_signed_message, parse_header_bytes, read_header_path,
    serialize_header, sorted_tensors, tensor_nbytes,
)


def write(tmp_path, header: bytes | str, data: bytes = b"", n: int | None = None):
    if isinstance(header, str):
        header = header.encode()
    p = tmp_path / "f.safetensors"
    p.write_bytes(struct.pack("<Q", len(header) if n is None else n) + header + data)
    return p


def hdr(**tensors) -> str:
    return json.dumps({k: {"dtype": d, "shape": s, "data_offsets": o} for k, (d, s, o) in tensors.items()})


def test_valid_header_padding_and_whitespace(tmp_path):
    h = hdr(a=("F32", [2], [0, 8]), b=("U8", [3], [8, 11]))
    for text in (h, h + "   ", "\n\t " + h + " \r\n"):
        got = read_header_path(write(tmp_path, text, bytes(11)))
        assert [t.name for t in got.layout()] == ["a", "b"]
        assert got.data_start == 8 + len(text.encode()) and got.data_len == 11


@pytest.mark.parametrize("raw,exc", [
    (b"\x01\x02\x03", errors.HeaderTooSmallError),
    (struct.pack("<Q", MAX_HEADER_SIZE + 1), errors.HeaderTooLargeError),
    (struct.pack("<Q", 100) + b"{}", errors.FileLengthError),
])
def test_bad_prefix(tmp_path, raw, exc):
    p = tmp_path / "x"
    p.write_bytes(raw)
    with pytest.raises(exc):
        read_header_path(p)


@pytest.mark.parametrize("header,exc,match", [
    (b"\xff\xfe", errors.InvalidHeaderError, "UTF-8"),
    (b"not json", errors.InvalidHeaderError, "JSON"),
    (b"[1,2]", errors.InvalidHeaderError, "not a JSON object"),
    (b"{}\x00\x00", errors.InvalidHeaderError, "JSON"),                # NUL padding
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
     errors.InvalidHeaderError, "duplicate"),
    (b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', errors.InvalidHeaderError, "NaN"),
    (b'{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', errors.InvalidHeaderError, "unsigned"),
    (b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', errors.InvalidHeaderError, "unsigned"),
    (b'{"a":{"dtype":"X9","shape":[1],"data_offsets":[0,4]}}', errors.InvalidTensorInfoError, "dtype"),
    (b'{"a":{"dtype":"F32","shape":[1]}}', errors.InvalidHeaderError, "data_offsets"),
    (b'{"__metadata__":{"k":1}}', errors.InvalidHeaderError, "strings"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', errors.InvalidTensorInfoError, "contiguous"),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', errors.InvalidTensorInfoError, "do not match"),
    (b'{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', errors.InvalidTensorInfoError, "whole bytes"),
    (b'{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}',
     errors.InvalidTensorInfoError, "overflow"),
    (b"[" * 100000 + b"]" * 100000, errors.InvalidHeaderError, "deeply|JSON"),
])
def test_malformed_headers(header, exc, match):
    with pytest.raises(exc, match=match):
        parse_header_bytes(header, 8 + len(header) + 4)


def test_file_length_must_match_exactly(tmp_path):
    h = hdr(a=("F32", [2], [0, 8]))
    with pytest.raises(errors.FileLengthError, match="truncated or extended"):
        read_header_path(write(tmp_path, h, bytes(7)))
    with pytest.raises(errors.FileLengthError):
        read_header_path(write(tmp_path, h, bytes(9)))


def test_sub_byte_and_exotic_dtypes():
    assert tensor_nbytes("F4", [4]) == 2
    assert tensor_nbytes("F6_E2M3", [4]) == 3
    assert tensor_nbytes("BF16", [3, 5]) == 30
    assert tensor_nbytes("C64", [2]) == 16
    assert tensor_nbytes("F32", [0, 7]) == 0


def test_tie_order_is_reference_writer_order():
    ts = [TensorInfo("b", "F32", (0,), 0, 0), TensorInfo("a", "F32", (0,), 0, 0),
          TensorInfo("z", "I64", (0,), 0, 0), TensorInfo("w", "U8", (1,), 0, 1)]
    assert [t.name for t in sorted_tensors(ts)] == ["z", "a", "b", "w"]


def test_canonical_message_escaping_and_order():
    meta = {"z": "é\t\"\\/\x01\u2028", "__signature__": "x", "a": ""}
    ts = [TensorInfo("n\nm", "U8", (1,), 1, 2), TensorInfo("b", "U8", (1,), 0, 1)]
    msg = canonical_signed_message(meta, ts)
    assert msg == ('{"__metadata__":{"a":"","z":"é\\t\\"\\\\/\\u0001\u2028"},'
                   '"b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                   '"n\\nm":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}').encode()


def test_serialize_header_pads_to_eight_or_exact():
    ts = [TensorInfo("a", "U8", (3,), 0, 3)]
    raw = serialize_header({"format": "pt"}, ts)
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0 and raw[8:].rstrip(b" ") == b'{"__metadata__":{"format":"pt"},"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}'
    assert len(serialize_header(None, ts, pad_to=200)) == 208
    with pytest.raises(ValueError):
        serialize_header(None, ts, pad_to=10)
