"""Where a reader's bytes come from: all the file format needs of storage.

A :class:`Blob` is one stored file (a local file, an object in a bucket): its name for
messages, its size, positioned reads into a caller's buffer, and a :class:`ChunkReader` for
the reads that feed decryption (whole chunks, in buffers with room for the AEAD tag, maybe
read ahead). ``ctfs.storage`` implements them for real storage (``O_DIRECT`` for local
files); :class:`FileBlob` here is the plain one the format uses for a path it is given.
"""
from __future__ import annotations

import os
from typing import Callable, Protocol, Sequence

#: ranges (offset, length) a sequential reader will want next; called with how many
Ahead = Callable[[int], Sequence[tuple[int, int]]]


class ChunkReader(Protocol):
    def read(self, offset: int, length: int, ahead: Ahead | None = None) -> tuple[memoryview, int, int]:
        """LENGTH bytes at OFFSET: ``(buf, at, got)``, the bytes are ``buf[at:at+got]`` with the
        reader's ``extra`` bytes of room after them; ``got < length`` only at the end.
        ``ahead`` names ranges likely read next (the reader may fetch them early)."""

    def release(self, buf: memoryview) -> None:
        """Give back a buffer that :meth:`read` returned."""

    def reserve(self, count: int) -> None:
        """Have ``count`` buffers ready before the first reads."""

    def close(self) -> None: ...

    # optional: ``discard(offset, length) -> bool``: the bytes read at OFFSET failed
    # authentication; drop any local copy of them and say whether one was dropped (then
    # the reader reads them once more)


class Blob(Protocol):
    name: str   # path or URL, for messages
    size: int

    def pread_into(self, buf, offset: int) -> int:
        """Fill BUF from OFFSET; the count is short only at the end of the blob."""

    def chunk_reader(self, max_length: int, extra: int) -> ChunkReader:
        """A reader of ranges up to MAX_LENGTH bytes with EXTRA bytes of room after them."""

    def close(self) -> None: ...


class FileBlob:
    """A local file, read with ``pread`` through the page cache."""

    def __init__(self, path: str | os.PathLike):
        self.name = os.fspath(path)
        self._fd = os.open(self.name, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size

    def pread_into(self, buf, offset: int) -> int:
        return os.preadv(self._fd, [buf], offset)

    def chunk_reader(self, max_length: int, extra: int) -> "_Chunks":
        return _Chunks(self, max_length, extra)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Chunks:
    """Chunk reads of a :class:`FileBlob` into one reused buffer per concurrent reader."""

    def __init__(self, blob: FileBlob, max_length: int, extra: int):
        self._blob, self._size = blob, max_length + extra
        self._free: list[memoryview] = []

    def read(self, offset: int, length: int, ahead: Ahead | None = None) -> tuple[memoryview, int, int]:
        try:
            buf = self._free.pop()
        except IndexError:
            buf = memoryview(bytearray(self._size))
        try:
            return buf, 0, self._blob.pread_into(buf[:length], offset)
        except BaseException:
            self._free.append(buf)
            raise

    def release(self, buf: memoryview) -> None:
        self._free.append(buf)

    def reserve(self, count: int) -> None:
        pass

    def close(self) -> None:
        self._free.clear()
