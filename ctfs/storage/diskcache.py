"""A host's local cache of ciphertext chunks fetched from object storage (``--cache-dir``).

It holds exactly the bytes the object store holds, never plaintext: one file per chunk,
named by the chunk's object (bucket, key and ETag, hashed) and its byte range. A chunk of
an object that has changed since (a new ETag) is simply never asked for again and ages out.

* **Bounded** by ``limit`` bytes: least recently used chunks are deleted first (the order
  is the files' mtimes when the cache is opened, then every hit moves a chunk to the front).
* **Atomic**: a chunk is written to a temporary file in the cache and renamed into place,
  so a reader (this daemon, another one on the host, the next start) sees a whole chunk or
  none. A chunk damaged on disk anyway is caught by its AEAD tag: the reader calls
  :meth:`discard` and fetches it again; damaged bytes are never served.
* **Survives restarts**: nothing is kept only in memory.

Several daemons may share one directory: each keeps its own LRU index, so the bound is
enforced per daemon.
"""
from __future__ import annotations

import collections
import errno
import hashlib
import logging
import os
import threading

log = logging.getLogger("ctfs.cache_dir")

_TMP = "tmp"


def object_tag(bucket: str, key: str, etag: str) -> str:
    """The directory name of one version of one object."""
    return hashlib.sha256(f"{bucket}\0{key}\0{etag}".encode()).hexdigest()


class DiskCache:
    def __init__(self, root: str | os.PathLike, limit: int):
        if limit <= 0:
            raise ValueError("the cache dir size must be positive")
        self.root, self.limit = os.path.abspath(root), int(limit)
        os.makedirs(os.path.join(self.root, _TMP), mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._lock = threading.Lock()
        self._lru: collections.OrderedDict[str, int] = collections.OrderedDict()  # rel -> size
        self.size = 0
        self.hits = self.misses = self.evictions = self.discarded = 0
        self.bytes_read = self.bytes_written = 0
        self._scan()

    def _scan(self) -> None:
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = os.path.relpath(dirpath, self.root)
            if rel_dir == _TMP:  # partial writes of a daemon that died: never whole chunks
                for f in filenames:
                    _unlink(os.path.join(dirpath, f))
                continue
            for f in filenames:
                p = os.path.join(dirpath, f)
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    continue
                found.append((st.st_mtime_ns, os.path.relpath(p, self.root), st.st_size))
        for _, rel, size in sorted(found):
            self._lru[rel] = size
            self.size += size
        with self._lock:
            self._evict_locked()

    @staticmethod
    def _rel(tag: str, offset: int, length: int) -> str:
        return os.path.join(tag[:2], tag, f"{offset:x}-{length:x}")

    def __contains__(self, item: tuple[str, int, int]) -> bool:
        with self._lock:
            return self._rel(*item) in self._lru

    def get(self, tag: str, offset: int, length: int, into: memoryview) -> bool:
        """Fill INTO[:length] with the cached chunk; False if it is not cached."""
        rel = self._rel(tag, offset, length)
        with self._lock:
            known = rel in self._lru
        if not known:
            with self._lock:
                self.misses += 1
            return False
        try:
            fd = os.open(os.path.join(self.root, rel), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # another daemon evicted it
            with self._lock:
                self._forget_locked(rel)
                self.misses += 1
            return False
        try:
            got, want = 0, into[:length]
            while got < length:
                n = os.preadv(fd, [want[got:]], got)
                if n == 0:
                    break
                got += n
        finally:
            os.close(fd)
        with self._lock:
            if got != length:  # truncated on disk: not a whole chunk
                self._forget_locked(rel)
                self.misses += 1
                _unlink(os.path.join(self.root, rel))
                return False
            if rel in self._lru:
                self._lru.move_to_end(rel)
            self.hits += 1
            self.bytes_read += length
        try:
            os.utime(os.path.join(self.root, rel))  # keeps the order across restarts
        except OSError:
            pass
        return True

    def put(self, tag: str, offset: int, data) -> None:
        """Store one chunk's ciphertext (atomically); failures are logged, never raised."""
        length = len(data)
        if length > self.limit:
            return
        rel = self._rel(tag, offset, length)
        path = os.path.join(self.root, rel)
        tmp = os.path.join(self.root, _TMP, f"{os.getpid()}-{threading.get_ident()}-{tag[:16]}-{offset:x}")
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view, done = memoryview(data), 0
                while done < length:
                    done += os.write(fd, view[done:])
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as e:
            _unlink(tmp)
            log.warning("cache dir %s: could not store a chunk (%s); going on without it",
                        self.root, e.strerror or e)
            return
        with self._lock:
            if rel in self._lru:
                self.size -= self._lru.pop(rel)
            self._lru[rel] = length
            self.size += length
            self.bytes_written += length
            self._evict_locked()

    def discard(self, tag: str, offset: int, length: int) -> bool:
        """Delete a chunk that failed authentication; True if one was cached."""
        rel = self._rel(tag, offset, length)
        with self._lock:
            had = rel in self._lru
            self._forget_locked(rel)
            if had:
                self.discarded += 1
        if had:
            _unlink(os.path.join(self.root, rel))
        return had

    def _forget_locked(self, rel: str) -> None:
        size = self._lru.pop(rel, None)
        if size is not None:
            self.size -= size

    def _evict_locked(self) -> None:
        while self.size > self.limit and self._lru:
            rel, size = self._lru.popitem(last=False)
            self.size -= size
            self.evictions += 1
            _unlink(os.path.join(self.root, rel))

    def stats(self) -> dict:
        with self._lock:
            return {"dir": self.root, "limit": self.limit, "bytes": self.size,
                    "chunks": len(self._lru), "hits": self.hits, "misses": self.misses,
                    "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                    "evictions": self.evictions, "discarded": self.discarded}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.debug("could not remove %s: %s", path, e)
