"""The storage protocol: what a store lists and opens (see :mod:`ctfs.storage`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

from ..format.blob import Blob


@dataclass(frozen=True)
class Entry:
    path: str      # relative to the store's root, "/"-separated; "" is the root
    kind: str      # "dir", "file", or "other" (sockets, fifos, devices: never served)
    size: int
    mtime: float
    version: str   # changes whenever the entry's bytes may have


class Store(Protocol):
    url: str  # the root, for messages

    def walk(self) -> Iterator[Entry]:
        """Every entry under the root, the root first, each directory before what it holds,
        and within a directory its subdirectories (sorted) before its files (sorted)."""

    def stat(self, path: str) -> Entry: ...

    def open(self, path: str, mode: str = "auto") -> Blob:
        """Entry PATH for reading; MODE says how chunk ciphertext is read (``ctfs.storage.direct.MODES``)."""

    def locate(self, path: str) -> str:
        """The full name of entry PATH for messages (a path, a URL)."""

