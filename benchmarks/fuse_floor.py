"""The CPU floor of ctfs's FUSE layer: ``python -m benchmarks.fuse_floor MNT SIZE``.

Serves one file, ``model.safetensors``, of SIZE bytes through exactly the FUSE layer a ctfs
mount uses (``ctfs.mount.mountd.serve``: mfusepy on libfuse3, the same options, kernel tuning and
read glue that writes into libfuse's reply buffer), but from a tree with no decryption, no
chunk cache and no source file: every read copies from one 2 MiB buffer held in memory. Its
daemon CPU per GB is what the FUSE read path costs in a Python libfuse3 daemon before any
cryptography, so ``python -m benchmarks`` reports it beside ctfs and gocryptfs: the part of
ctfs's CPU per GB that decryption and caching add is ``ctfs - floor``.

Runs in the foreground until unmounted (``fusermount3 -u MNT``) or SIGTERM.
"""
from __future__ import annotations

import errno
import os
import sys
import time

from ctfs.mount.tree import Node

NAME = "model.safetensors"
_BLOCK = 2 << 20


class FloorTree:
    """The ``Tree`` protocol of ``ctfs.fuse_ops`` over one in-memory file."""

    def __init__(self, size: int):
        self.size = size
        self.mtime = time.time()
        pattern = bytes(range(251)) * (_BLOCK // 251 + 1)  # not zeros: no special-cased pages
        self._block = memoryview(pattern[:_BLOCK])

    def lookup(self, path: str) -> Node | None:
        if path == "/":
            return Node("dir", mtime=self.mtime)
        if path == "/" + NAME:
            return Node("file", size=self.size, mtime=self.mtime, mode=0o444)
        return None

    def listdir(self, path: str) -> list[str]:
        if path != "/":
            raise OSError(errno.ENOTDIR, path)
        return [NAME]

    def open(self, path: str, uid: int, gid: int, pid: int) -> int:
        if path != "/" + NAME:
            raise OSError(errno.ENOENT, path)
        return 1

    def read_into(self, fh: int, offset: int, out: memoryview) -> int:
        n = max(0, min(len(out), self.size - offset))
        pos = 0
        while pos < n:
            o = (offset + pos) % _BLOCK
            k = min(n - pos, _BLOCK - o)
            out[pos:pos + k] = self._block[o:o + k]
            pos += k
        return n

    def release(self, fh: int) -> None:
        pass


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    from ctfs.mount.mountd import serve
    return serve(FloorTree(int(argv[1])), argv[0], foreground=True, fsname="ctfs-floor")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
