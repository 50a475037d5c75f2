"""Plaintext buffers and the byte bound of the chunk cache.

Every buffer is an anonymous private mapping, advised ``MADV_DONTDUMP`` and ``mlock``ed
where the limits allow (a failure of either is warned about once and shown in the stats);
the first ``huge_buffers`` pooled ones are backed by huge pages (:mod:`ctfs.storage.hugemem`).
:class:`BufferPool` counts every live buffer (cached, being filled, or free) against the
capacity and keeps zeroed pooled buffers of each size for reuse. It shares the cache's lock:
methods named ``*_locked`` expect it held, the others take it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import threading
from typing import Any

from ...storage.hugemem import address, huge_mapping

log = logging.getLogger("ctfs.cache")

PAGE = mmap.PAGESIZE


def round_page(n: int) -> int:
    return max(PAGE, (n + PAGE - 1) // PAGE * PAGE)


_libc: Any = None
_libc_loaded = False
_libc_lock = threading.Lock()


def _get_libc() -> Any:
    global _libc, _libc_loaded
    with _libc_lock:  # concurrent first calls must all see the loaded library
        if not _libc_loaded:
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
                lib.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
                lib.mlock.restype = ctypes.c_int
                _libc = lib
            except Exception:  # pragma: no cover - exotic platforms
                _libc = None
            _libc_loaded = True
    return _libc


def mlock(addr: int, length: int) -> tuple[bool, str]:
    """Try to mlock [addr, addr+length). Returns (ok, reason)."""
    lib = _get_libc()
    if lib is None:
        return False, "libc not available"
    if lib.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(length)) == 0:
        return True, ""
    err = ctypes.get_errno()
    return False, f"mlock failed: {errno.errorcode.get(err, err)}"


def dontdump(mm: mmap.mmap) -> str:
    """``MADV_DONTDUMP`` on all of MM: "" when done, else why not."""
    advice = getattr(mmap, "MADV_DONTDUMP", None)
    if advice is None:
        return "MADV_DONTDUMP is not available on this platform"
    try:
        mm.madvise(advice)
    except OSError as e:
        return f"madvise(MADV_DONTDUMP): {e.strerror or e}"
    return ""


class Buffer:
    """An anonymous private mmap used to hold plaintext."""

    __slots__ = ("mm", "mv", "cap", "addr", "pooled", "huge", "locked", "lock_error", "closed",
                 "used", "dontdump_error")

    def __init__(self, cap: int, pooled: bool, want_lock: bool, huge: bool = False) -> None:
        self.cap = cap
        self.pooled = pooled
        self.huge = huge
        self.closed = False
        self.used = 0  # high-water mark of bytes that may hold plaintext
        # Huge pages (ctfs.storage.hugemem): the kernel copies read replies straight out of
        # this buffer (ctfs.mount.fuse_reply) and pins its pages one at a time to do so.
        self.mm, self.mv = huge_mapping(cap, huge)
        self.dontdump_error = dontdump(self.mm)  # keep plaintext out of core dumps
        self.addr = address(self.mv)
        self.locked = False
        self.lock_error = ""
        if want_lock:
            self.locked, self.lock_error = mlock(self.addr, cap)

    def zero(self, start: int = 0) -> None:
        """Zero [start, used) -- everything that may hold plaintext past ``start``."""
        if self.closed:
            return
        if self.used > start:
            ctypes.memset(self.addr + start, 0, self.used - start)  # releases the GIL
            self.used = start

    def close(self) -> None:
        if self.closed:
            return
        self.zero()
        self.closed = True
        try:
            self.mv.release()
            self.mm.close()  # munmap (implicitly munlocks)
        except BufferError:
            # Some derived view is still alive; the mapping is already zeroed
            # and will be unmapped when the last reference goes away.
            pass


class BufferPool:
    """The cache's buffers and its byte bound (``held`` never exceeds ``capacity`` but for a
    segment larger than the whole cache, see :meth:`claim_locked`)."""

    def __init__(self, capacity: int, lock: threading.Lock, *, mlock: bool, huge_buffers: int):
        self.capacity = capacity
        self.lock = lock
        self.want_mlock = mlock
        self.huge_buffers = huge_buffers
        self.free: dict[int, list[Buffer]] = {}   # zeroed pooled buffers by capacity
        self.live: set[Buffer] = set()            # every live buffer (tests/inspection)
        self.huge_live = 0                        # of them in huge pages
        self.held = 0
        self.peak = 0
        self.mlock_ok = self.want_mlock
        self.dontdump_ok = True
        self._warned: set[str] = set()  # the one-time warnings given

    # -- the bound (lock held) ---------------------------------------------------------
    def claim_locked(self, cap: int, *, beyond: bool = False) -> bool:
        """Count ``cap`` more bytes as held if they fit (or regardless, with ``beyond``:
        a segment larger than the cache is served through a transient buffer)."""
        if not beyond and self.held + cap > self.capacity:
            return False
        self.held += cap
        if self.held > self.peak:
            self.peak = self.held
        return True

    def unclaim(self, cap: int) -> None:
        with self.lock:
            self.held -= cap

    def take_free_locked(self, cap: int) -> Buffer | None:
        fl = self.free.get(cap)
        return fl.pop() if fl else None

    def drop_idle_other_locked(self, cap: int) -> bool:
        """Unmap one idle pooled buffer of another size than ``cap``; False if none."""
        other = next((c for c, lst in self.free.items() if lst and c != cap), None)
        if other is None:
            return False
        self.destroy_locked(self.free[other].pop())
        return True

    def destroy_locked(self, buf: Buffer) -> None:
        buf.close()
        self.huge_live -= buf.huge
        self.live.discard(buf)
        self.held -= buf.cap

    def recycle_locked(self, buf: Buffer, closed: bool) -> None:
        """Zero a buffer that is no longer used and pool it (if pooled and within the bound)
        or unmap it."""
        buf.zero()
        if buf.pooled and self.held <= self.capacity and not closed:
            self.free.setdefault(buf.cap, []).append(buf)
        else:
            self.destroy_locked(buf)

    def zero_free_locked(self) -> None:
        for lst in self.free.values():
            for b in lst:
                b.zero()

    def release_free_locked(self) -> None:
        for lst in self.free.values():
            for b in lst:
                self.destroy_locked(b)
        self.free.clear()

    # -- mapping (lock not held) ---------------------------------------------------------
    def map(self, cap: int, pooled: bool) -> Buffer:
        """A new buffer of ``cap`` bytes (already claimed)."""
        with self.lock:
            huge = pooled and self.huge_live < self.huge_buffers
            self.huge_live += huge
        try:
            b = Buffer(cap, pooled, self.want_mlock, huge)
        except BaseException:
            with self.lock:
                self.huge_live -= huge
            raise
        if self.want_mlock and not b.locked:
            with self.lock:
                self.mlock_ok = False
            self._warn_once("mlock", "could not mlock plaintext cache buffers (%s); decrypted weights "
                            "may be swapped to disk (raise RLIMIT_MEMLOCK / grant CAP_IPC_LOCK)", b.lock_error)
        if b.dontdump_error:
            with self.lock:
                self.dontdump_ok = False
            self._warn_once("dontdump", "could not exclude plaintext cache buffers from core dumps (%s); "
                            "the daemon itself stays non-dumpable", b.dontdump_error)
        with self.lock:
            self.live.add(b)
        return b

    def reserve(self, cap: int, count: int, closed) -> int:
        """Have ``count`` free pooled buffers of ``cap`` bytes: map (and mlock: that faults
        them in) as many as are missing, within the bound. ``closed()`` stops it. Returns
        how many were added."""
        made = 0
        while True:
            with self.lock:
                if closed() or len(self.free.get(cap, ())) >= count or not self.claim_locked(cap):
                    break
            try:
                b = self.map(cap, pooled=True)
            except BaseException:
                self.unclaim(cap)
                raise
            with self.lock:
                self.free.setdefault(cap, []).append(b)
            made += 1
        return made

    def _warn_once(self, what: str, fmt: str, *args) -> None:
        with self.lock:
            if what in self._warned:
                return
            self._warned.add(what)
        log.warning(fmt, *args)
