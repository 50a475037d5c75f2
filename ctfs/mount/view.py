"""The plain safetensors view of one CryptoTensors file.

The view's header is the encrypted header without the crypto metadata (user metadata such
as ``"format":"pt"`` kept), padded with spaces to the original header length, so the file
size and every data offset are the encrypted file's and byte ``i`` of the view's data
section is the plaintext of byte ``i`` of the encrypted data section.
"""
from __future__ import annotations

from ..format.header import serialize_header
from ..format.reader import CryptoFile


class PlainView:
    def __init__(self, cf: CryptoFile):
        self.file = cf
        meta = cf.user_metadata if cf.header.metadata is not None else None
        self.header_bytes = serialize_header(meta or None, cf.tensors.values(),
                                             pad_to=cf.header.header_len)
        self.size = cf.header.file_size
        self.data_start = cf.data_start

    def read_into(self, offset: int, out: memoryview, cache=None, key=None) -> int:
        """Fill ``out`` with view bytes at ``offset``; returns the count (short at EOF).
        Data bytes come through ``cache`` (a ChunkCache) when given."""
        n = max(0, min(len(out), self.size - offset))
        pos = 0
        if offset < self.data_start and n:
            pos = min(n, self.data_start - offset)
            out[:pos] = self.header_bytes[offset:offset + pos]
        if pos < n:
            data_off = offset + pos - self.data_start
            if cache is not None:
                got = cache.read_into(self.file, key, data_off, out[pos:n])
            else:
                got = self.file.read_into(data_off, out[pos:n])
            pos += got
        return pos

    def read_pinned(self, offset: int, n: int, consume, cache, key, rest=None):
        """``cache.read_pinned`` for view bytes [offset, offset+n) of the data section
        (``consume`` gets the pinned plaintext); None for a range that starts in the header.
        ``rest(view_offset, plaintext)``: see ``ChunkCache.read_pinned`` (offsets here are
        the view's)."""
        if offset < self.data_start or offset >= self.size:
            return None
        fill = None
        if rest is not None:
            def fill(data_off, views):
                return rest(self.data_start + data_off, views)
        return cache.read_pinned(self.file, key, offset - self.data_start, n, consume, rest=fill)
