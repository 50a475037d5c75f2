"""Plaintext chunk cache for the ctfs FUSE read path.

The cache holds decrypted *segments* (chunks) of the data section of encrypted
safetensors files.  Plaintext is produced by a :class:`SegmentSource` one
segment at a time; :meth:`ChunkCache.read_into` copies arbitrary byte ranges
out of the cached segments, decrypting missing ones on demand.

Design summary
--------------
* One global ``threading.Lock`` guards all bookkeeping (map, LRU order, pins,
  pool, counters).  Decryption (``read_segment``), buffer zeroing of reused
  buffers and the copy-out to the caller happen *outside* the lock; a chunk is
  pinned (``pins > 0``) while anybody copies out of it or waits for it, and a
  pinned or loading chunk is never evicted or reused.
* Single flight: a missing segment is inserted in the map in the LOADING state
  before it is decrypted; concurrent readers of the same segment pin it and
  wait on its ``threading.Event``.  A failed decryption is removed from the map
  (never cached), its buffer is zeroed and recycled, and every waiter re-raises
  the loader's exception (waiters of a failed *readahead* load retry the
  decryption themselves, so the error surfaces in a foreground read).
* Memory: buffers are anonymous ``mmap`` regions (``MADV_DONTDUMP``, ``mlock``
  attempted; the first ``huge_buffers`` pooled ones in huge pages, see ``ctfs.hugemem``).  Segments of up to ``source.max_segment_size`` bytes use pooled
  buffers of exactly that size, which are reused on eviction (zeroed before
  reuse) and kept zeroed on a free list.  Larger segments get a dedicated
  buffer sized to fit, counted against the same byte bound and unmapped when
  evicted.  ``bytes_held`` (sum of capacities of every live buffer: cached,
  in flight, or free) never exceeds ``capacity_bytes``; the single exception is
  a segment larger than the whole capacity, which is served through a transient
  buffer (after evicting everything evictable) and dropped right after use.
  When the bound is reached and nothing is evictable (everything pinned or in
  flight), foreground readers wait; readahead never waits and never evicts a
  pinned chunk or a not-yet-consumed readahead chunk.
* Readahead: per ``source_key`` the end of the previous read is remembered; a
  read starting within ``near`` bytes of it, or in the segment right after the
  one it ended in, is sequential and schedules the next ``readahead`` segments
  (bounded by what fits in the cache) on ``workers`` background threads
  (default one: best on 2 cores).  ``wipe()`` cancels queued readahead.
* No ``threading.local`` is used (libfuse callback threads are not persistent
  Python threads).
"""

from __future__ import annotations

import bisect
import collections
import ctypes
import ctypes.util
import errno
import logging
import mmap
import threading
import time
from typing import Any, Hashable, Protocol, Sequence

from .hugemem import address, huge_mapping

__all__ = ["ChunkCache", "SegmentSource"]

log = logging.getLogger("ctfs.cache")

_PAGE = mmap.PAGESIZE


class SegmentSource(Protocol):
    """What the cache needs from an encrypted file (see module docstring)."""

    data_len: int
    segment_starts: Sequence[int]
    max_segment_size: int

    def segment_end(self, i: int) -> int: ...

    def read_segment(self, i: int, out: memoryview) -> int: ...


# --------------------------------------------------------------------------
# Locked anonymous-mmap buffers
# --------------------------------------------------------------------------

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


def _mlock(addr: int, length: int) -> tuple[bool, str]:
    """Try to mlock [addr, addr+length). Returns (ok, reason)."""
    lib = _get_libc()
    if lib is None:
        return False, "libc not available"
    if lib.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(length)) == 0:
        return True, ""
    err = ctypes.get_errno()
    return False, f"mlock failed: {errno.errorcode.get(err, err)}"


def _round_page(n: int) -> int:
    return max(_PAGE, (n + _PAGE - 1) // _PAGE * _PAGE)


def _dontdump(mm: mmap.mmap) -> str:
    """``MADV_DONTDUMP`` on all of MM: "" when done, else why not."""
    advice = getattr(mmap, "MADV_DONTDUMP", None)
    if advice is None:
        return "MADV_DONTDUMP is not available on this platform"
    try:
        mm.madvise(advice)
    except OSError as e:
        return f"madvise(MADV_DONTDUMP): {e.strerror or e}"
    return ""


class _Buffer:
    """An anonymous private mmap used to hold plaintext."""

    __slots__ = ("mm", "mv", "cap", "addr", "pooled", "huge", "locked", "lock_error", "closed",
                 "used", "dontdump_error")

    def __init__(self, cap: int, pooled: bool, want_lock: bool, huge: bool = False) -> None:
        self.cap = cap
        self.pooled = pooled
        self.huge = huge
        self.closed = False
        self.used = 0  # high-water mark of bytes that may hold plaintext
        # Huge pages (ctfs.hugemem): the kernel copies read replies straight out of this
        # buffer (ctfs.fuse_reply) and pins its pages one at a time to do so.
        self.mm, self.mv = huge_mapping(cap, huge)
        self.dontdump_error = _dontdump(self.mm)  # keep plaintext out of core dumps
        self.addr = address(self.mv)
        self.locked = False
        self.lock_error = ""
        if want_lock:
            self.locked, self.lock_error = _mlock(self.addr, cap)

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


# --------------------------------------------------------------------------
# Chunks
# --------------------------------------------------------------------------

_LOADING = 0
_READY = 1
_FAILED = 2
_DROPPED = 3


class _Chunk:
    __slots__ = (
        "key", "index", "buf", "size", "state", "pins", "event", "error",
        "from_ra", "ra_pending", "doomed", "transient", "consumed", "served",
    )

    def __init__(self, key: tuple, index: int, size: int) -> None:
        self.key = key
        self.index = index
        self.size = size
        self.buf: _Buffer | None = None
        self.state = _LOADING
        self.pins = 1  # the loader's pin
        self.event = threading.Event()
        self.error: BaseException | None = None
        self.from_ra = False
        self.consumed = False
        self.served = 0  # bytes copied out so far (consumed once it covers the chunk)
        self.ra_pending = False
        self.doomed = False
        self.transient = False


class _NoRoom(Exception):
    pass


class _Task:
    __slots__ = ("source", "skey", "index", "gen")

    def __init__(self, source: Any, skey: Hashable, index: int, gen: int) -> None:
        self.source = source
        self.skey = skey
        self.index = index
        self.gen = gen


# --------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------


class ChunkCache:
    """Byte-bounded LRU cache of decrypted segments shared by many sources.

    ``capacity_bytes``: bound on the sum of the capacities of all buffers held.
    ``readahead``: number of segments to decrypt ahead of a sequential reader
    (0 disables).  ``workers``: readahead threads (1 recommended).
    ``mlock``: try to mlock buffers.  ``chunk_size``: if given, preallocate
    ``capacity_bytes // chunk_size`` pooled buffers of that size now (they are
    used by sources whose ``max_segment_size`` equals ``chunk_size``); otherwise
    pooled buffers are created on first need and reused afterwards.
    ``zero_reused``: zero an evicted buffer completely before it is reused
    (default).  False zeroes only the stale tail the new segment does not
    overwrite (faster; the old plaintext is then overwritten by the new
    decryption, and a failed decryption zeroes the whole buffer).
    Buffers are always zeroed on ``wipe``, on failure, and before they are
    pooled or unmapped.
    """

    #: a read starting within ``min(near, max_segment_size // 8)`` bytes of the
    #: previous read's end counts as sequential
    near = 256 * 1024
    #: max queued readahead tasks (oldest dropped)
    max_queue = 64
    #: number of per-source sequential-detection records kept
    max_streams = 4096
    #: pooled buffers mapped in huge pages (ctfs.hugemem), at most: the ones a sequential
    #: reader keeps recycling; a cache filling up with random reads gets 4 KiB pages
    huge_buffers = 16

    def __init__(
        self,
        capacity_bytes: int,
        readahead: int = 3,
        workers: int = 1,
        *,
        mlock: bool = True,
        chunk_size: int | None = None,
        zero_reused: bool = True,
        recycle_consumed: bool = False,
    ) -> None:
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        self._capacity = int(capacity_bytes)
        self._ra_depth = max(0, int(readahead))
        self._n_workers = max(0, int(workers))
        self._want_mlock = bool(mlock)
        self._zero_reused = bool(zero_reused)
        # With the kernel page cache in front of us (keep_cache), a chunk a reader has read
        # to its end is rarely asked for again: recycle its (hot, already mlocked) buffer
        # before growing the pool, instead of faulting in fresh memory for every chunk.
        self._recycle = bool(recycle_consumed)

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # memory / wipe waiters
        self._work_cond = threading.Condition(self._lock)  # readahead workers
        self._map: collections.OrderedDict[tuple, _Chunk] = collections.OrderedDict()
        self._free: dict[int, list[_Buffer]] = {}
        self._buffers: set[_Buffer] = set()  # every live buffer (tests/inspection)
        self._huge_live = 0  # of them in huge pages
        self._held = 0
        self._peak = 0
        self._mem_waiters = 0
        self._doomed: set[_Chunk] = set()
        self._closed = False
        self._gen = 0

        self._queue: collections.deque[_Task] = collections.deque()
        self._queued: set[tuple] = set()
        self._threads: list[threading.Thread] = []
        self._seq: collections.OrderedDict[Hashable, tuple[int, int]] = collections.OrderedDict()

        self._mlock_ok = self._want_mlock
        self._dontdump_ok = True
        self._warned: set[str] = set()  # the one-time warnings given (buffer setup failures)

        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._bytes_decrypted = 0
        self._decrypt_seconds = 0.0
        self._ra_issued = 0
        self._ra_hits = 0
        self._ra_dropped = 0

        if chunk_size:
            self.reserve(chunk_size, self._capacity // _round_page(int(chunk_size)))

    # ------------------------------------------------------------------ API

    def reserve(self, segment_size: int, count: int) -> int:
        """Have ``count`` free pooled buffers for segments of ``segment_size`` bytes: map
        (and mlock: that faults them in) as many as are missing now, within the bound, so
        that the first reads find them ready instead of paying for fresh memory. Returns
        how many were added (a mount that is locked and unlocked again adds none)."""
        cap = _round_page(int(segment_size))
        made = 0
        while True:
            with self._lock:
                if (self._closed or len(self._free.get(cap, ())) >= count
                        or self._held + cap > self._capacity):
                    break
                self._held += cap
                self._peak = max(self._peak, self._held)
            try:
                b = self._new_buffer(cap, pooled=True)
            except BaseException:
                with self._lock:
                    self._held -= cap
                raise
            with self._lock:
                self._free.setdefault(cap, []).append(b)
            made += 1
        return made

    def read_into(self, source: SegmentSource, source_key: Hashable, offset: int, out: Any) -> int:
        """Copy data-section bytes [offset, offset+len(out)) into ``out``.

        The range is clipped at ``source.data_len``; returns the number of
        bytes copied.  Exceptions from ``read_segment`` propagate.
        """
        if not isinstance(out, memoryview):
            out = memoryview(out)
        if out.itemsize != 1 or out.ndim != 1:
            out = out.cast("B")
        if offset < 0:
            raise ValueError("negative offset")
        if self._closed:
            raise ValueError("ChunkCache is closed")
        n = len(out)
        data_len = source.data_len
        if n == 0 or offset >= data_len:
            return 0
        end = min(offset + n, data_len)
        starts = source.segment_starts
        first = bisect.bisect_right(starts, offset) - 1
        if self._ra_depth and self._n_workers:
            last = bisect.bisect_right(starts, end - 1) - 1
            self._note_access(source, source_key, offset, end, first, last)

        pos = offset
        i = first
        while pos < end:
            s = starts[i]
            e = source.segment_end(i)
            ch = self._get_chunk(source, source_key, i, s, e)
            try:
                a = pos - s
                b = min(end, e) - s
                dst = pos - offset
                out[dst:dst + (b - a)] = ch.buf.mv[a:b]  # type: ignore[union-attr]
                if self._recycle:
                    self._mark_served(ch, b - a)
            finally:
                self._unpin(ch)
            pos = s + b
            i += 1
        return end - offset

    def read_pinned(self, source: SegmentSource, source_key: Hashable, offset: int, n: int,
                    consume: Any, max_segments: int = 64) -> Any:
        """Call ``consume(views)`` with memoryviews of the cached plaintext of data bytes
        [offset, offset+n) (clipped at ``data_len``), every chunk pinned for the call, and
        return its result: lets a caller hand the plaintext on without copying it first.

        Returns None without calling ``consume`` where that would be unsafe or pointless:
        an empty range, one spanning more than ``max_segments`` segments, or a later
        segment that would have to wait for room while an earlier one is pinned (a foreground
        read pins one chunk at a time and never waits holding a pin). Exceptions from
        ``read_segment`` and ``consume`` propagate."""
        if offset < 0:
            raise ValueError("negative offset")
        if self._closed:
            raise ValueError("ChunkCache is closed")
        data_len = source.data_len
        if n <= 0 or offset >= data_len:
            return None
        end = min(offset + n, data_len)
        starts = source.segment_starts
        first = bisect.bisect_right(starts, offset) - 1
        last = bisect.bisect_right(starts, end - 1) - 1
        if last - first >= max_segments:
            return None
        if self._ra_depth and self._n_workers:
            self._note_access(source, source_key, offset, end, first, last)
        chunks: list[_Chunk] = []
        views: list[memoryview] = []
        try:
            for i in range(first, last + 1):
                s = starts[i]
                ch = self._get_chunk(source, source_key, i, s, source.segment_end(i), wait=not chunks)
                if ch is None:
                    return None
                chunks.append(ch)
                views.append(ch.buf.mv[max(offset, s) - s:min(end, source.segment_end(i)) - s])  # type: ignore[union-attr]
            result = consume(views)
            if self._recycle:
                for ch, v in zip(chunks, views):
                    self._mark_served(ch, len(v))
            return result
        finally:
            for v in views:
                v.release()
            for ch in chunks:
                self._unpin(ch)

    def wipe(self, timeout: float | None = 5.0, *, release: bool = False) -> bool:
        """Zero and drop every cached chunk and cancel pending readahead.

        Chunks currently being decrypted or copied out are dropped (zeroed)
        as soon as their users are done; ``wipe`` waits up to ``timeout``
        seconds for that (None: forever).  With ``release=True`` the (zeroed)
        buffer pool is unmapped as well; otherwise the zeroed pool is kept for
        reuse.  Returns True if nothing with plaintext is left.
        """
        with self._lock:
            self._gen += 1
            self._queue.clear()
            self._queued.clear()
            self._seq.clear()
            for ch in list(self._map.values()):
                self._drop_locked(ch)
            self._map.clear()
            for lst in self._free.values():
                for b in lst:
                    b.zero()
            if release:
                self._release_free_locked()
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._doomed:
                if deadline is None:
                    self._cond.wait()
                else:
                    rem = deadline - time.monotonic()
                    if rem <= 0:
                        break
                    self._cond.wait(rem)
            if release:
                self._release_free_locked()
            return not self._doomed

    def _drop_locked(self, ch: _Chunk) -> None:
        """Zero and release an idle chunk now; a busy one as soon as its users are done."""
        ch.doomed = True
        if ch.state == _READY and ch.pins == 0:
            buf, ch.buf, ch.state = ch.buf, None, _DROPPED
            if buf is not None:
                self._recycle_locked(buf)
        else:
            self._doomed.add(ch)

    def drop_source(self, source_key: Hashable) -> None:
        """Zero and drop all idle chunks of one source (e.g. file replaced)."""
        with self._lock:
            self._seq.pop(source_key, None)
            for key in [k for k in self._map if k[0] == source_key]:
                self._drop_locked(self._map.pop(key))
            if self._queue:
                keep = [t for t in self._queue if t.skey != source_key]
                self._queue.clear()
                self._queue.extend(keep)
                self._queued = {(t.skey, t.index) for t in keep}

    def close(self, timeout: float | None = 5.0) -> None:
        """Wipe, unmap all buffers and stop the readahead workers."""
        with self._lock:
            already = self._closed
            self._closed = True
            self._work_cond.notify_all()
            self._cond.notify_all()
        if not already:
            self.wipe(timeout, release=True)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
        self._threads = []

    def __enter__(self) -> "ChunkCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def stats(self) -> dict:
        with self._lock:
            cached = 0
            nready = 0
            ninflight = 0
            for ch in self._map.values():
                if ch.state == _READY:
                    cached += ch.size
                    nready += 1
                elif ch.state == _LOADING:
                    ninflight += 1
            req = self._hits + self._misses
            return {
                "bytes_cached": cached,
                "bytes_held": self._held,
                "peak_bytes_held": self._peak,
                "capacity": self._capacity,
                "chunks": nready,
                "inflight": ninflight,
                "hits": self._hits,
                "misses": self._misses,
                "hit_ratio": (self._hits / req) if req else 0.0,
                "evictions": self._evictions,
                "bytes_decrypted": self._bytes_decrypted,
                "decrypt_seconds": self._decrypt_seconds,
                "readahead_issued": self._ra_issued,
                "readahead_hits": self._ra_hits,
                "readahead_dropped": self._ra_dropped,
                "mlocked": bool(self._mlock_ok),
                "excluded_from_core_dumps": self._dontdump_ok,
            }

    def cached_keys(self) -> list[tuple]:
        """Keys of ready chunks, least recently used first."""
        with self._lock:
            return [k for k, ch in self._map.items() if ch.state == _READY]

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            ch = self._map.get(key)
            return ch is not None and ch.state == _READY

    @property
    def capacity(self) -> int:
        return self._capacity

    # ------------------------------------------------------------ internals

    def _new_buffer(self, cap: int, pooled: bool) -> _Buffer:
        with self._lock:
            huge = pooled and self._huge_live < self.huge_buffers
            self._huge_live += huge
        try:
            b = _Buffer(cap, pooled, self._want_mlock, huge)
        except BaseException:
            with self._lock:
                self._huge_live -= huge
            raise
        if self._want_mlock and not b.locked:
            with self._lock:
                self._mlock_ok = False
            self._warn_once("mlock", "could not mlock plaintext cache buffers (%s); decrypted weights "
                            "may be swapped to disk (raise RLIMIT_MEMLOCK / grant CAP_IPC_LOCK)", b.lock_error)
        if b.dontdump_error:
            with self._lock:
                self._dontdump_ok = False
            self._warn_once("dontdump", "could not exclude plaintext cache buffers from core dumps (%s); "
                            "the daemon itself stays non-dumpable", b.dontdump_error)
        with self._lock:
            self._buffers.add(b)
        return b

    def _warn_once(self, what: str, fmt: str, *args) -> None:
        with self._lock:
            if what in self._warned:
                return
            self._warned.add(what)
        log.warning(fmt, *args)

    def _destroy_locked(self, buf: _Buffer) -> None:
        buf.close()
        self._huge_live -= buf.huge
        self._buffers.discard(buf)
        self._held -= buf.cap

    def _recycle_locked(self, buf: _Buffer) -> None:
        """Zero a buffer that is no longer used and pool or unmap it."""
        buf.zero()
        if buf.pooled and self._held <= self._capacity and not self._closed:
            self._free.setdefault(buf.cap, []).append(buf)
        else:
            self._destroy_locked(buf)
        if self._mem_waiters:
            self._cond.notify_all()

    def _release_free_locked(self) -> None:
        for lst in self._free.values():
            for b in lst:
                self._destroy_locked(b)
        self._free.clear()

    def _find_victim_locked(self, for_readahead: bool) -> _Chunk | None:
        for ch in self._map.values():
            if ch.state == _READY and ch.pins == 0 and not (for_readahead and ch.ra_pending):
                return ch
        return None

    def _acquire_locked(self, cap: int, wait: bool, for_readahead: bool) -> tuple[_Buffer | None, bool]:
        """Get room for a buffer of ``cap`` bytes (lock held).

        Returns (buffer, needs_zero) where buffer is None if the caller must
        map a new one (the bytes are already reserved).  Raises _NoRoom if
        ``wait`` is false and nothing can be freed.
        """
        while True:
            if self._closed:
                raise ValueError("ChunkCache is closed")
            fl = self._free.get(cap)
            if fl:
                return fl.pop(), False
            if self._recycle and self._map:
                front = next(iter(self._map.values()))
                if front.consumed and front.state == _READY and front.pins == 0 \
                        and front.buf is not None and front.buf.cap == cap:
                    del self._map[front.key]
                    self._evictions += 1
                    buf, front.buf, front.state = front.buf, None, _DROPPED
                    return buf, True
            if self._held + cap <= self._capacity:
                self._held += cap
                if self._held > self._peak:
                    self._peak = self._held
                return None, False
            # Free idle pool buffers of other sizes before evicting live data.
            other = next((c for c, lst in self._free.items() if lst and c != cap), None)
            if other is not None:
                self._destroy_locked(self._free[other].pop())
                continue
            victim = self._find_victim_locked(for_readahead)
            if victim is not None:
                del self._map[victim.key]
                self._evictions += 1
                buf = victim.buf
                victim.buf = None
                victim.state = _DROPPED
                assert buf is not None
                if buf.cap == cap:
                    return buf, True
                self._destroy_locked(buf)
                continue
            if cap > self._capacity:
                # Oversize segment: everything evictable is gone; serve it anyway.
                self._held += cap
                if self._held > self._peak:
                    self._peak = self._held
                return None, False
            if not wait:
                raise _NoRoom()
            self._mem_waiters += 1
            try:
                self._cond.wait()
            finally:
                self._mem_waiters -= 1

    def _get_chunk(self, source: Any, skey: Hashable, idx: int, start: int, end: int,
                   wait: bool = True) -> _Chunk | None:
        """Return a READY chunk for segment ``idx``, pinned by the caller. With ``wait``
        false, None where loading it would have to wait for room."""
        key = (skey, idx)
        lock = self._lock
        lock.acquire()
        try:
            while True:
                if self._closed:
                    raise ValueError("ChunkCache is closed")
                ch = self._map.get(key)
                if ch is None:
                    break
                if not wait and ch.state == _LOADING and ch.buf is None:
                    return None  # its loader may itself be waiting for room
                ch.pins += 1
                if ch.state == _LOADING:
                    lock.release()
                    try:
                        ch.event.wait()
                    finally:
                        lock.acquire()
                if ch.state == _READY:
                    self._hits += 1
                    if ch.ra_pending:
                        ch.ra_pending = False
                        self._ra_hits += 1
                    if self._map.get(key) is ch:
                        self._map.move_to_end(key)
                    return ch
                # failed (or dropped while we waited)
                ch.pins -= 1
                if ch.state == _FAILED and not ch.from_ra:
                    assert ch.error is not None
                    raise ch.error
                # readahead failure: retry in the foreground

            # Miss: become the loader (single flight).
            self._misses += 1
            size = end - start
            if size <= 0:
                raise ValueError(f"segment {idx} is empty")
            m = _round_page(source.max_segment_size)
            if size <= m:
                cap, pooled = m, True
            else:
                cap, pooled = _round_page(size), False
            ch = _Chunk(key, idx, size)
            if cap > self._capacity:
                ch.transient = True
            self._map[key] = ch
            try:
                buf, needs_zero = self._acquire_locked(cap, wait=wait, for_readahead=False)
            except _NoRoom as e:
                self._fail_locked(ch, e, None)
                return None
            except BaseException as e:
                self._fail_locked(ch, e, None)
                raise
        finally:
            lock.release()
        self._load(ch, source, buf, needs_zero, cap, pooled)
        return ch

    def _fail_locked(self, ch: _Chunk, err: BaseException, buf: _Buffer | None) -> None:
        ch.state = _FAILED
        ch.error = err
        ch.pins -= 1  # loader's pin
        ch.buf = None
        if self._map.get(ch.key) is ch:
            del self._map[ch.key]
        if buf is not None:
            self._recycle_locked(buf)
        self._doomed.discard(ch)
        ch.event.set()
        self._cond.notify_all()

    def _load(self, ch: _Chunk, source: Any, buf: _Buffer | None, needs_zero: bool, cap: int, pooled: bool) -> None:
        """Decrypt ``ch`` (lock not held). On failure the chunk is failed and the error raised."""
        dt = 0.0
        try:
            if buf is None:
                try:
                    buf = self._new_buffer(cap, pooled)
                except BaseException:
                    with self._lock:
                        self._held -= cap
                    raise
            elif needs_zero:
                # Evicted buffer handed to a new segment: scrub the old plaintext.
                # With zero_reused=False only the part the new segment does not
                # overwrite is zeroed (the decryption overwrites the rest, and a
                # failed decryption zeroes the whole buffer).
                buf.zero(0 if self._zero_reused else ch.size)
            ch.buf = buf
            if buf.used < ch.size:
                buf.used = ch.size
            t0 = time.perf_counter()
            try:
                n = source.read_segment(ch.index, buf.mv[: ch.size])
            finally:
                dt = time.perf_counter() - t0
            if n != ch.size:
                raise OSError(errno.EIO, f"segment {ch.index}: read_segment returned {n}, expected {ch.size}")
        except BaseException as e:
            with self._lock:
                self._decrypt_seconds += dt
                self._fail_locked(ch, e, buf)
            raise
        with self._lock:
            self._decrypt_seconds += dt
            self._bytes_decrypted += ch.size
            ch.state = _READY
            if self._map.get(ch.key) is ch:
                self._map.move_to_end(ch.key)
            ch.event.set()

    def _mark_served(self, ch: _Chunk, n: int) -> None:
        """Count bytes copied out; a chunk whose every byte has been served (as many bytes
        as it holds) goes to the eviction end of the LRU."""
        with self._lock:
            ch.served += n
            if not ch.consumed and ch.served >= ch.size and ch.state == _READY \
                    and self._map.get(ch.key) is ch:
                ch.consumed = True
                self._map.move_to_end(ch.key, last=False)

    def _unpin(self, ch: _Chunk) -> None:
        with self._lock:
            ch.pins -= 1
            if ch.pins == 0 and ch.state == _READY:
                if ch.transient or ch.doomed:
                    if self._map.get(ch.key) is ch:
                        del self._map[ch.key]
                    buf = ch.buf
                    ch.buf = None
                    ch.state = _DROPPED
                    if buf is not None:
                        self._recycle_locked(buf)
                    if ch in self._doomed:
                        self._doomed.discard(ch)
                    self._cond.notify_all()
                elif self._mem_waiters:
                    self._cond.notify_all()

    # ------------------------------------------------------------ readahead

    def _ra_window(self, source: Any) -> int:
        cap = _round_page(source.max_segment_size)
        return max(0, min(self._ra_depth, self._capacity // cap - 1))

    def _note_access(self, source: Any, skey: Hashable, offset: int, end: int, first: int, last: int) -> None:
        with self._lock:
            prev = self._seq.get(skey)
            self._seq[skey] = (end, last)
            if prev is None:
                if len(self._seq) > self.max_streams:
                    self._seq.popitem(last=False)
                return
            self._seq.move_to_end(skey)
            prev_end, prev_last = prev
            near = min(self.near, source.max_segment_size // 8)
            if not (abs(offset - prev_end) <= near or first == prev_last + 1):
                return
            depth = self._ra_window(source)
            if depth <= 0:
                return
            nseg = len(source.segment_starts)
            added = False
            for j in range(last + 1, min(last + 1 + depth, nseg)):
                key = (skey, j)
                if key in self._map or key in self._queued:
                    continue
                if len(self._queue) >= self.max_queue:
                    old = self._queue.popleft()
                    self._queued.discard((old.skey, old.index))
                self._queue.append(_Task(source, skey, j, self._gen))
                self._queued.add(key)
                added = True
            if added:
                if len(self._threads) < self._n_workers and not self._closed:
                    self._start_workers_locked()
                self._work_cond.notify()

    def _start_workers_locked(self) -> None:
        while len(self._threads) < self._n_workers:
            t = threading.Thread(
                target=self._worker_main, name=f"ctfs-readahead-{len(self._threads)}", daemon=True
            )
            self._threads.append(t)
            t.start()

    def _worker_main(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._work_cond.wait()
                if self._closed:
                    return
                task = self._queue.popleft()
                key = (task.skey, task.index)
                self._queued.discard(key)
                if task.gen != self._gen or key in self._map:
                    continue
                seq = self._seq.get(task.skey)
                if seq is not None and task.index <= seq[1]:
                    continue  # the reader already went past it: decrypting it is wasted work
                src = task.source
                try:
                    start = src.segment_starts[task.index]
                    size = src.segment_end(task.index) - start
                    m = _round_page(src.max_segment_size)
                except Exception:
                    log.debug("readahead: bad segment %r", key, exc_info=True)
                    continue
                if size <= 0:
                    continue
                if size <= m:
                    cap, pooled = m, True
                else:
                    cap, pooled = _round_page(size), False
                if cap > self._capacity:
                    continue
                try:
                    buf, needs_zero = self._acquire_locked(cap, wait=False, for_readahead=True)
                except _NoRoom:
                    self._ra_dropped += 1
                    continue
                except ValueError:
                    return  # closed
                ch = _Chunk(key, task.index, size)
                ch.from_ra = True
                ch.ra_pending = True
                self._map[key] = ch
                self._ra_issued += 1
            del task
            try:
                self._load(ch, src, buf, needs_zero, cap, pooled)
            except Exception:
                log.debug("readahead of segment %r failed", key, exc_info=True)
            else:
                self._unpin(ch)
            del src, ch, buf
