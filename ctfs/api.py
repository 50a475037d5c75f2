"""In-process reading without a mount, shaped like ``safetensors.safe_open``.

    with ctfs.safe_open("model.safetensors", "pt", keys=ctfs.KeySet.load("k.jwk")) as f:
        w = f.get_tensor("lm_head.weight")
        rows = f.get_slice("embed.weight")[10:20]

Tensors are decrypted lazily, each call returns fresh memory (nothing aliases a shared
cache), and a tensor whose bytes fail authentication raises IntegrityError.
"""
from __future__ import annotations

import os
from typing import Any

from .errors import CtfsError
from .format.keys import KeySet
from .format.reader import CryptoFile
from .storage.local import open_blob

_NP = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
       "F16": "float16", "I32": "int32", "U32": "uint32", "F32": "float32", "F64": "float64",
       "I64": "int64", "U64": "uint64", "C64": "complex64"}
_PT = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
       "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
       "F64": "float64", "I64": "int64", "U64": "uint64", "C64": "complex64",
       "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu",
       "F4": "float4_e2m1fn_x2"}


class UnsupportedDtypeError(CtfsError):
    """The framework has no type for this safetensors dtype."""


def _framework(name: str) -> str:
    if name in ("pt", "torch", "pytorch"):
        return "pt"
    if name in ("np", "numpy"):
        return "np"
    raise ValueError(f"framework must be 'pt' or 'np', not {name!r}")


THREADS = max(1, min(4, os.cpu_count() or 1))
_DEVICE_BATCH = 256 << 20  # load_file to a non-CPU device: host bytes per batch


def _alloc_tensor(framework: str, dtype: str, shape: tuple[int, ...], nbytes: int, device: str):
    """A fresh byte array for a tensor, and a function making the tensor of it once filled."""
    if framework == "np":
        import numpy as np
        if dtype not in _NP:
            raise UnsupportedDtypeError(f"numpy has no dtype for {dtype}; use framework='pt'")
        raw = np.empty(nbytes, dtype=np.uint8)
        return raw, lambda: raw.view(np.dtype(_NP[dtype]).newbyteorder("<")).reshape(shape)
    import torch
    if dtype not in _PT or not hasattr(torch, _PT[dtype]):
        raise UnsupportedDtypeError(f"this torch has no dtype for {dtype}")
    tdt = getattr(torch, _PT[dtype])
    if dtype == "F4":  # two 4-bit values per element, as safetensors does
        shape = shape[:-1] + (shape[-1] // 2,)
    raw = torch.empty(nbytes, dtype=torch.uint8)

    def finish():
        t = raw.view(tdt).reshape(shape)
        return t if device == "cpu" else t.to(device)
    return raw.numpy(), finish


def _read_tensor(file: CryptoFile, framework: str, dtype: str, shape: tuple[int, ...], start: int,
                 nbytes: int, device: str):
    """Decrypt bytes [start, start+nbytes) straight into a fresh array of the framework."""
    raw, finish = _alloc_tensor(framework, dtype, shape, nbytes, device)
    if nbytes:
        file.read_into(start, raw, threads=THREADS)
    return finish()


class _Slice:
    def __init__(self, owner: "safe_open", name: str):
        self._owner, self._name = owner, name
        self._info = owner._file.tensors[name]

    def get_shape(self) -> list[int]:
        return list(self._info.shape)

    def get_dtype(self) -> str:
        return self._info.dtype

    def __getitem__(self, index):
        info, shape = self._info, self._info.shape
        idx = index if isinstance(index, tuple) else (index,)
        first = idx[0] if idx else slice(None)
        if shape and shape[0] and isinstance(first, (int, slice)) and info.nbytes % shape[0] == 0 \
                and not any(i is Ellipsis or i is None for i in idx):
            row = info.nbytes // shape[0]
            if isinstance(first, int):
                r = range(shape[0])[first]  # raises IndexError like numpy
                lo, hi, rest = r, r + 1, (0,) + idx[1:]
            else:
                r = range(shape[0])[first]
                if r.step == 1 or len(r) <= 1:
                    lo = r.start if len(r) else 0
                    hi = lo + len(r)
                    rest = (slice(None),) + idx[1:]
                else:
                    lo, hi = min(r), max(r) + 1
                    rest = (slice(r.start - lo, (r.stop - lo) if r.stop >= 0 else None, r.step),) + idx[1:]
            part = _read_tensor(self._owner._file, self._owner._framework, info.dtype,
                                (hi - lo,) + shape[1:], info.start + lo * row, (hi - lo) * row, "cpu")
            out = part[rest]
        else:
            out = self._owner.get_tensor(self._name)[index]
        if self._owner._framework == "pt" and self._owner._device != "cpu":
            out = out.to(self._owner._device)
        return out


class safe_open:  # noqa: N801 - mirrors safetensors.safe_open
    """Open a CryptoTensors (or, with ``require_encrypted=False``, plain) safetensors file.

    ``keys``: a KeySet, or ``key_file``: a JWK set path. ``source_io``: how ciphertext is
    read (``auto``: ``O_DIRECT`` unless the page cache holds it; :mod:`ctfs.storage.direct`).
    Other keyword arguments go to :class:`ctfs.format.reader.CryptoFile`.
    """

    def __init__(self, filename: str | os.PathLike, framework: str = "pt", device: str = "cpu", *,
                 keys: KeySet | None = None, key_file: str | os.PathLike | None = None,
                 **options: Any):
        self._framework = _framework(framework)
        self._device = device
        if keys is None and key_file is not None:
            keys = KeySet.load(key_file, insecure_perms=options.pop("insecure_perms", False))
        blob = open_blob(filename, options.pop("source_io", "auto"))
        self._file = CryptoFile(blob, keys, **options)

    def keys(self) -> list[str]:
        return sorted(self._file.tensors)

    def offset_keys(self) -> list[str]:
        return [t.name for t in self._file.header.layout()]

    def metadata(self) -> dict[str, str] | None:
        return dict(self._file.user_metadata) if self._file.header.metadata is not None else None

    def get_tensor(self, name: str):
        info = self._file.tensors[name]
        return _read_tensor(self._file, self._framework, info.dtype, info.shape, info.start,
                            info.nbytes, self._device)

    def _get_all(self) -> dict:
        """Every tensor, in file order. Tensors are allocated first and their segments
        decrypted by one pool, so both threads stay busy on models made of many small
        tensors (one ``get_tensor`` at a time parallelises only within a tensor). For
        another device, batches of about ``_DEVICE_BATCH`` bytes are moved as they are
        done, so host memory holds one batch, not the model."""
        result, batch, parts, size = {}, [], [], 0
        limit = None if self._device == "cpu" else _DEVICE_BATCH

        def flush():
            self._file.read_many(parts, threads=THREADS)
            for name, finish in batch:
                result[name] = finish()
            batch.clear()
            parts.clear()
        for info in self._file.header.layout():
            raw, finish = _alloc_tensor(self._framework, info.dtype, info.shape, info.nbytes,
                                        self._device)
            batch.append((info.name, finish))
            if info.nbytes:
                parts.append((info.start, raw))
            size += info.nbytes
            if limit is not None and size >= limit:
                flush()
                size = 0
        flush()
        return result

    def get_slice(self, name: str) -> _Slice:
        if name not in self._file.tensors:
            raise KeyError(name)
        return _Slice(self, name)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_file(filename: str | os.PathLike, framework: str = "pt", device: str = "cpu", *,
              keys: KeySet | None = None, key_file: str | os.PathLike | None = None,
              **options: Any) -> dict:
    """Load every tensor of a file into a dict, like ``safetensors.torch.load_file``."""
    with safe_open(filename, framework, device, keys=keys, key_file=key_file, **options) as f:
        return f._get_all()
