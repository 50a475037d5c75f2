"""A local directory as a :class:`ctfs.storage.Store`; its files as blobs whose chunk reads
go through :class:`ctfs.storage.direct.Source` (``O_DIRECT`` unless the page cache holds
the ciphertext)."""
from __future__ import annotations

import os
import stat

from ..format.blob import FileBlob
from .base import Entry
from .direct import MODES, Source


class LocalBlob(FileBlob):
    """One local file: positioned reads through the page cache (as a FileBlob), chunk reads
    by a Source (``O_DIRECT`` unless the page cache holds them; MODE, see ``MODES``)."""

    def __init__(self, path: str | os.PathLike, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"source I/O mode must be one of {', '.join(MODES)}, not {mode!r}")
        super().__init__(path)
        self.mode = mode

    def chunk_reader(self, max_length: int, extra: int) -> Source:
        return Source(self._fd, self.name, self.mode, max_length=max_length, extra=extra)


def open_blob(path: str | os.PathLike, mode: str = "auto") -> LocalBlob:
    return LocalBlob(path, mode)


def _entry(rel: str, st: os.stat_result) -> Entry:
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
    return Entry(rel, kind, st.st_size, st.st_mtime,
                 f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")


class LocalStore:
    """The directory ROOT. Symbolic links are followed for files; linked directories are
    listed but not entered (``os.walk``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(root)
        self.url = self.root

    def locate(self, path: str) -> str:
        return os.path.join(self.root, *path.split("/")) if path else self.root

    def stat(self, path: str) -> Entry:
        return _entry(path, os.stat(self.locate(path)))

    def walk(self):
        yield self.stat("")
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, self.root)
            base = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for d in dirnames:
                yield _entry(base + d, os.stat(os.path.join(dirpath, d)))
            for f in sorted(filenames):
                yield _entry(base + f, os.stat(os.path.join(dirpath, f)))

    def open(self, path: str, mode: str = "auto") -> LocalBlob:
        return LocalBlob(self.locate(path), mode)
