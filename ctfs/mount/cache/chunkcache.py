"""The chunk cache: decrypted segments of encrypted files, loaded once, served many times.

:meth:`ChunkCache.read_into` copies byte ranges out of cached segments and decrypts the
missing ones on demand; :meth:`ChunkCache.read_pinned` hands them out without a copy. This
module is the single-flight loading and the API; the buffers and the byte bound are
:mod:`.buffers`, the LRU table and its counters :mod:`.table`, readahead :mod:`.readahead`.

* One ``threading.Lock`` guards all bookkeeping (table, pins, pool, counters), shared by
  the parts. Decryption (``read_segment``), zeroing of reused buffers and the copy-out to
  the caller happen *outside* it.
* Single flight: a missing segment is put in the table LOADING before it is decrypted;
  concurrent readers of the same segment pin it and wait on its event. A failed
  decryption is removed (never cached), its buffer zeroed and recycled, and every waiter
  re-raises the loader's exception (waiters of a failed *readahead* load retry the
  decryption themselves, so the error surfaces in a foreground read).
* Room: a new segment takes a free pooled buffer, else recycles a chunk served to its end
  (``recycle_consumed``), else grows the pool within the bound, else unmaps an idle buffer
  of another size, else evicts the least recently used idle chunk. Segments of up to
  ``source.max_segment_size`` bytes use pooled buffers of that size; larger ones get a
  dedicated buffer, unmapped when evicted; one larger than the whole cache is served
  through a transient buffer (after evicting everything evictable) and dropped after use.
  With nothing evictable, foreground readers wait; readahead never waits and never evicts
  a pinned chunk or one read ahead and not yet used.
* No ``threading.local`` (libfuse callback threads are not persistent Python threads).
"""
from __future__ import annotations

import bisect
import collections
import errno
import logging
import threading
import time
from typing import Any, Hashable, Protocol, Sequence

from .buffers import Buffer, BufferPool, round_page
from .readahead import Readahead
from .table import DROPPED, FAILED, LOADING, READY, Chunk, ChunkTable

log = logging.getLogger("ctfs.cache")


class SegmentSource(Protocol):
    """What the cache needs from an encrypted file."""

    data_len: int
    segment_starts: Sequence[int]
    max_segment_size: int

    def segment_end(self, i: int) -> int: ...

    def read_segment(self, i: int, out: memoryview) -> int: ...


class _NoRoom(Exception):
    pass


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
    ``recycle_consumed``: with the kernel page cache in front of the cache, a chunk a
    reader has read to its end is rarely asked for again: recycle its (hot, already
    mlocked) buffer before growing the pool, instead of faulting in fresh memory. In this
    mode the pool also stops growing at ``huge_buffers`` buffers of a size while an idle
    chunk can be evicted: the page cache holds what was served, and decrypting a chunk
    again (~0.3 CPU-s/GB without VAES) costs less than memory the daemon has never touched
    (random 1 MiB reads that grew the pool to the whole bound took 2.5-4 CPU-s/GB and 170k
    minor faults per GB on a VM with free page reporting; 0.6-0.9 with this limit).
    Buffers are always zeroed on ``wipe``, on failure, and before they are
    pooled or unmapped.
    """

    #: pooled buffers mapped in huge pages (ctfs.storage.hugemem), at most: the ones a
    #: sequential reader keeps recycling; a cache filling up with random reads gets 4 KiB pages
    #: (with ``recycle_consumed``, also the working set: see above)
    huge_buffers = 16

    def __init__(self, capacity_bytes: int, readahead: int = 3, workers: int = 1, *,
                 mlock: bool = True, chunk_size: int | None = None, zero_reused: bool = True,
                 recycle_consumed: bool = False) -> None:
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be positive")
        self._capacity = int(capacity_bytes)
        self._zero_reused = bool(zero_reused)
        self._recycle = bool(recycle_consumed)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # memory / wipe waiters
        self.pool = BufferPool(self._capacity, self._lock, mlock=bool(mlock), huge_buffers=self.huge_buffers)
        self.table = ChunkTable()
        self.readahead = Readahead(readahead, workers, self._lock, self._read_ahead_one)
        self._mem_waiters = 0
        self._doomed: set[Chunk] = set()
        self._closed = False
        self._fill_q: collections.deque = collections.deque()
        self._fill_cv = threading.Condition(self._lock)
        self._filler: threading.Thread | None = None
        # (recycle_consumed) segments whose every byte went to the kernel's page cache, served
        # or stored: readahead skips them (a hint, oldest forgotten first: see _fed_locked)
        self._fed: collections.OrderedDict = collections.OrderedDict()
        self._bytes_decrypted = 0
        self._decrypt_seconds = 0.0
        if chunk_size:
            self.reserve(chunk_size, self._capacity // round_page(int(chunk_size)))

    # ------------------------------------------------------------------ API

    def reserve(self, segment_size: int, count: int) -> int:
        """Have ``count`` free pooled buffers for segments of ``segment_size`` bytes: map
        (and mlock: that faults them in) as many as are missing now, within the bound, so
        that the first reads find them ready instead of paying for fresh memory. Returns
        how many were added (a mount that is locked and unlocked again adds none)."""
        return self.pool.reserve(round_page(int(segment_size)), count, lambda: self._closed)

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
        if self.readahead.enabled:
            self._note_access(source, source_key, offset, end, first,
                              bisect.bisect_right(starts, end - 1) - 1)
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
                    with self._lock:
                        self._served_locked(ch, b - a)
            finally:
                self._unpin(ch)
            pos = s + b
            i += 1
        return end - offset

    def read_pinned(self, source: SegmentSource, source_key: Hashable, offset: int, n: int,
                    consume: Any, max_segments: int = 64, rest: Any = None) -> Any:
        """Call ``consume(views)`` with memoryviews of the cached plaintext of data bytes
        [offset, offset+n) (clipped at ``data_len``), every chunk pinned for the call, and
        return its result: lets a caller hand the plaintext on without copying it first.

        Returns None without calling ``consume`` where that would be unsafe or pointless:
        an empty range, one spanning more than ``max_segments`` segments, or a later
        segment that would have to wait for room while an earlier one is pinned (a foreground
        read pins one chunk at a time and never waits holding a pin). Exceptions from
        ``read_segment`` and ``consume`` propagate.

        ``rest(start, views)``, if given, is called after ``consume`` for each segment of a
        read that does not continue a sequential stream, once per time the segment is
        decrypted (on a filler thread, while the segment is still cached), with pinned views of
        the whole segment (plus up to a page of each cached neighbour the bound leaves room to
        pin: _pin_for_fill_locked) from data offset ``start`` on: the caller may hand
        the bytes the reader did not ask for to the kernel's page cache, so that a random
        reader finds them there instead of having the segment decrypted again. A sequential
        reader asks for them anyway. It returns true where the bytes went to the page cache
        (readahead then skips the segment); its exceptions are logged, never raised."""
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
        sequential = False
        if self.readahead.enabled:
            sequential = self._note_access(source, source_key, offset, end, first, last)
        chunks: list[Chunk] = []
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
            if self._recycle or rest is not None:
                with self._lock:
                    for ch, v in zip(chunks, views):
                        if self._recycle:
                            self._served_locked(ch, len(v))
                        if rest is not None and result and not sequential and not ch.stored \
                                and len(v) < ch.size:
                            self._queue_fill_locked(source, source_key, ch, rest)
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
            self.readahead.clear_locked()
            self._fed.clear()
            for ch in self.table.clear():
                self._drop_locked(ch)
            self.pool.zero_free_locked()
            if release:
                self.pool.release_free_locked()
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
                self.pool.release_free_locked()
            return not self._doomed

    def drop_source(self, source_key: Hashable) -> None:
        """Zero and drop all idle chunks of one source (e.g. file replaced)."""
        with self._lock:
            self.readahead.drop_source_locked(source_key)
            for k in [k for k in self._fed if k[0] == source_key]:
                del self._fed[k]
            for ch in self.table.of_source(source_key):
                self._drop_locked(ch)

    def close(self, timeout: float | None = 5.0) -> None:
        """Wipe, unmap all buffers and stop the readahead workers."""
        with self._lock:
            already = self._closed
            self._closed = True
            self.readahead.close_locked()
            self._cond.notify_all()
            self._fill_cv.notify_all()
            filler = self._filler
        if not already:
            self.wipe(timeout, release=True)
        self.readahead.join(timeout)
        if filler is not None and filler is not threading.current_thread():
            filler.join(timeout)

    def __enter__(self) -> "ChunkCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def stats(self) -> dict:
        with self._lock:
            t, p, ra = self.table.stats(), self.pool, self.readahead
            return {
                "bytes_cached": t["bytes_cached"],
                "bytes_held": p.held,
                "peak_bytes_held": p.peak,
                "capacity": self._capacity,
                "chunks": t["chunks"],
                "inflight": t["inflight"],
                "hits": t["hits"],
                "misses": t["misses"],
                "hit_ratio": t["hit_ratio"],
                "evictions": t["evictions"],
                "bytes_decrypted": self._bytes_decrypted,
                "decrypt_seconds": self._decrypt_seconds,
                "readahead_issued": ra.issued,
                "readahead_hits": ra.hits,
                "readahead_dropped": ra.dropped,
                "readahead_split": ra.split,
                "mlocked": bool(p.mlock_ok),
                "excluded_from_core_dumps": p.dontdump_ok,
            }

    def cached_keys(self) -> list[tuple]:
        """Keys of ready chunks, least recently used first."""
        with self._lock:
            return self.table.ready_keys()

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            ch = self.table.get(key)
            return ch is not None and ch.state == READY

    @property
    def capacity(self) -> int:
        return self._capacity

    # ------------------------------------------------------------ single flight

    def _drop_locked(self, ch: Chunk) -> None:
        """Zero and release an idle chunk now; a busy one as soon as its users are done."""
        ch.doomed = True
        if ch.state == READY and ch.pins == 0:
            buf, ch.buf, ch.state = ch.buf, None, DROPPED
            if buf is not None:
                self._recycle_locked(buf)
        else:
            self._doomed.add(ch)

    def _recycle_locked(self, buf: Buffer) -> None:
        self.pool.recycle_locked(buf, self._closed)
        if self._mem_waiters:
            self._cond.notify_all()

    def _acquire_locked(self, cap: int, wait: bool, for_readahead: bool) -> tuple[Buffer | None, bool]:
        """Get room for a buffer of ``cap`` bytes (lock held).

        Returns (buffer, needs_zero) where buffer is None if the caller must
        map a new one (the bytes are already claimed).  Raises _NoRoom if
        ``wait`` is false and nothing can be freed.
        """
        pool, table = self.pool, self.table
        while True:
            if self._closed:
                raise ValueError("ChunkCache is closed")
            buf = pool.take_free_locked(cap)
            if buf is not None:
                return buf, False
            if self._recycle:
                front = table.consumed_front(cap)
                if front is not None:
                    return table.evict(front), True
                if pool.held + cap > self.huge_buffers * cap:
                    # Past the working set, reuse the least recently used chunk's buffer
                    # rather than map fresh memory (see the class docstring).
                    victim = table.victim(for_readahead)
                    if victim is not None and victim.buf is not None and victim.buf.cap == cap:
                        return table.evict(victim), True
            if pool.claim_locked(cap):
                return None, False
            # Free idle pool buffers of other sizes before evicting live data.
            if pool.drop_idle_other_locked(cap):
                continue
            victim = table.victim(for_readahead)
            if victim is not None:
                buf = table.evict(victim)
                if buf.cap == cap:
                    return buf, True
                pool.destroy_locked(buf)
                continue
            if cap > self._capacity:
                # Oversize segment: everything evictable is gone; serve it anyway.
                pool.claim_locked(cap, beyond=True)
                return None, False
            if not wait:
                raise _NoRoom()
            self._mem_waiters += 1
            try:
                self._cond.wait()
            finally:
                self._mem_waiters -= 1

    def _buffer_shape(self, source: Any, size: int) -> tuple[int, bool]:
        """(capacity, pooled) of the buffer for a segment of SIZE bytes of SOURCE."""
        m = round_page(source.max_segment_size)
        return (m, True) if size <= m else (round_page(size), False)

    def _get_chunk(self, source: Any, skey: Hashable, idx: int, start: int, end: int,
                   wait: bool = True) -> Chunk | None:
        """Return a READY chunk for segment ``idx``, pinned by the caller. With ``wait``
        false, None where loading it would have to wait for room."""
        key = (skey, idx)
        lock = self._lock
        lock.acquire()
        try:
            while True:
                if self._closed:
                    raise ValueError("ChunkCache is closed")
                ch = self.table.get(key)
                if ch is None:
                    break
                if not wait and ch.state == LOADING and ch.buf is None and not ch.from_ra:
                    # its loader may itself be waiting for room (a readahead loader never
                    # waits: it has its room before the chunk is in the table)
                    return None
                ch.pins += 1
                if ch.state == LOADING:
                    lock.release()
                    try:
                        ch.event.wait()
                    finally:
                        lock.acquire()
                if ch.state == READY:
                    self.table.hits += 1
                    if ch.ra_pending:
                        ch.ra_pending = False
                        self.readahead.hits += 1
                    self.table.touch(ch)
                    return ch
                # failed (or dropped while we waited)
                ch.pins -= 1
                if ch.state == FAILED and not ch.from_ra:
                    assert ch.error is not None
                    raise ch.error
                # readahead failure: retry in the foreground

            # Miss: become the loader (single flight).
            self.table.misses += 1
            size = end - start
            if size <= 0:
                raise ValueError(f"segment {idx} is empty")
            cap, pooled = self._buffer_shape(source, size)
            ch = Chunk(key, idx, size)
            if cap > self._capacity:
                ch.transient = True
            self.table.add(ch)
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

    def _fail_locked(self, ch: Chunk, err: BaseException, buf: Buffer | None) -> None:
        ch.state = FAILED
        ch.error = err
        ch.pins -= 1  # loader's pin
        ch.buf = None
        self.table.remove(ch)
        if buf is not None:
            self._recycle_locked(buf)
        self._doomed.discard(ch)
        ch.event.set()
        self._cond.notify_all()

    def _load(self, ch: Chunk, source: Any, buf: Buffer | None, needs_zero: bool, cap: int, pooled: bool) -> None:
        """Decrypt ``ch`` (lock not held). On failure the chunk is failed and the error raised."""
        dt = 0.0
        try:
            if buf is None:
                try:
                    buf = self.pool.map(cap, pooled)
                except BaseException:
                    self.pool.unclaim(cap)
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
            ch.state = READY
            self.table.touch(ch)
            ch.event.set()

    #: bytes of each cached neighbour handed to ``rest`` with a segment (a page: the kernel
    #: keeps whole pages only, and a segment rarely starts or ends on a page boundary)
    rest_margin = 4096
    #: page-cache fills waiting for the filler thread at most (more are skipped: the reader
    #: asks for those pages instead)
    max_fill_queue = 8

    def _queue_fill_locked(self, source: Any, skey: Hashable, ch: Chunk, rest: Any) -> None:
        """Ask the filler thread to call ``rest`` with chunk CH (lock held).

        Not in the reader's thread: the kernel may make a store wait for a page that a read
        in flight must fill first, and a FUSE worker blocked there (with others queued
        behind it) can leave no thread to serve that read. A queued fill holds no pin: the
        filler finds the chunk again, and skips it if it was evicted meanwhile."""
        if len(self._fill_q) >= self.max_fill_queue or self._closed:
            return
        ch.stored = True
        self._fill_q.append((source, skey, ch.index, rest, self.readahead.generation))
        if self._filler is None:
            self._filler = threading.Thread(target=self._fill_loop, name="ctfs-fill", daemon=True)
            self._filler.start()
        self._fill_cv.notify()

    def _fill_loop(self) -> None:
        while True:
            with self._lock:
                while not self._fill_q and not self._closed:
                    self._fill_cv.wait()
                if not self._fill_q:
                    return
                source, skey, idx, rest, gen = self._fill_q.popleft()
                pinned: list[Chunk] = []
                if gen == self.readahead.generation and not self._closed:  # else wiped since
                    pinned = self._pin_for_fill_locked(source, skey, idx)
            if not pinned:
                continue
            try:
                if self._hand_rest(source, pinned, rest) and self._recycle:
                    with self._lock:
                        if gen == self.readahead.generation:
                            self._fed_locked(pinned[0].key)
            finally:
                for o in pinned:
                    self._unpin(o)

    def _pin_for_fill_locked(self, source: Any, skey: Hashable, idx: int) -> list[Chunk]:
        """Pin cached segment IDX, and its cached neighbours, for a store (lock held).

        The store may wait for a page that a read in flight must fill first, and that read
        may need room in the cache: so a fill pins at most what leaves room for the largest
        buffer a reader of this source asks for, and a read that finds no room can always
        wait for other readers' pins to go (they never wait holding one). The bound holds.
        Returns the pinned chunks, segment IDX first; none if it is no longer cached or the
        cache is too small to store from."""
        budget = self._capacity - round_page(source.max_segment_size)
        out: list[Chunk] = []
        starts = source.segment_starts
        for j in (idx, idx - 1, idx + 1):
            ch = self.table.get((skey, j)) if 0 <= j < len(starts) else None
            if ch is None or ch.state != READY or ch.buf is None or ch.buf.cap > budget:
                if j == idx:
                    return []
                continue
            budget -= ch.buf.cap
            ch.pins += 1
            out.append(ch)
        return out

    def _hand_rest(self, source: Any, pinned: list[Chunk], rest: Any) -> bool:
        """``rest(start, views)`` for the pinned chunks from _pin_for_fill_locked: the bytes
        of the first, with up to ``rest_margin`` bytes of each neighbour before and after.
        Returns what ``rest`` did (true: the segment is in the page cache now)."""
        ch, nb = pinned[0], pinned[1:]
        views: list[memoryview] = []
        try:
            start = source.segment_starts[ch.index]
            for o in nb:
                if o.index < ch.index:
                    k = min(self.rest_margin, o.size)
                    views.append(o.buf.mv[o.size - k:o.size])  # type: ignore[union-attr]
                    start -= k
            views.append(ch.buf.mv[:ch.size])  # type: ignore[union-attr]
            for o in nb:
                if o.index > ch.index:
                    views.append(o.buf.mv[:min(self.rest_margin, o.size)])  # type: ignore[union-attr]
            return bool(rest(start, views))
        except Exception:  # noqa: BLE001 - an optimisation: never fail the read
            log.exception("handing segment %r to the page cache failed", ch.key)
            return False
        finally:
            for v in views:
                v.release()

    def _unpin(self, ch: Chunk) -> None:
        with self._lock:
            ch.pins -= 1
            if ch.pins == 0 and ch.state == READY:
                if ch.transient or ch.doomed:
                    self.table.remove(ch)
                    buf = ch.buf
                    ch.buf = None
                    ch.state = DROPPED
                    if buf is not None:
                        self._recycle_locked(buf)
                    if ch in self._doomed:
                        self._doomed.discard(ch)
                    self._cond.notify_all()
                elif self._mem_waiters:
                    self._cond.notify_all()

    # ------------------------------------------------------------ readahead

    #: segments remembered as handed whole to the page cache (``_fed``), at most
    max_fed = 1 << 16

    def _served_locked(self, ch: Chunk, n: int) -> None:
        """(recycle_consumed) N more bytes of CH went to the page cache in a reply."""
        self.table.served(ch, n)
        if ch.consumed:
            self._fed_locked(ch.key)

    def _fed_locked(self, key: tuple) -> None:
        fed = self._fed
        fed[key] = None
        fed.move_to_end(key)
        if len(fed) > self.max_fed:
            fed.popitem(last=False)

    def _known(self, key: tuple) -> bool:
        """(lock held) Segment KEY needs no readahead: cached, being decrypted, or (page-cache
        mode) handed whole to the kernel's page cache already, where the reader finds it
        unless the kernel has reclaimed it since (then the reader's request decrypts it)."""
        return key in self.table.map or key in self._fed

    def _note_access(self, source: Any, skey: Hashable, offset: int, end: int, first: int, last: int) -> bool:
        """Readahead's view of a read: whether it continues a sequential stream."""
        with self._lock:
            window = self.readahead.window(round_page(source.max_segment_size), self._capacity)
            return self.readahead.note_access_locked(source, skey, offset, end, first, last, window,
                                                     self._known)

    def _read_ahead_one(self) -> bool:
        """A readahead worker's turn: take the next task and decrypt it; False once closed."""
        with self._lock:
            task = self.readahead.next_task_locked(self._known)
            if task is None:
                return False
            key, src = (task.skey, task.index), task.source
            try:
                size = src.segment_end(task.index) - src.segment_starts[task.index]
                cap, pooled = self._buffer_shape(src, size)
            except Exception:
                log.debug("readahead: bad segment %r", key, exc_info=True)
                return True
            if size <= 0 or cap > self._capacity:
                return True
            try:
                buf, needs_zero = self._acquire_locked(cap, wait=False, for_readahead=True)
            except _NoRoom:
                self.readahead.dropped += 1
                return True
            except ValueError:
                return False  # closed
            ch = Chunk(key, task.index, size)
            ch.from_ra = True
            ch.ra_pending = True
            self.table.add(ch)
            self.readahead.issued += 1
        del task
        try:
            self._load(ch, src, buf, needs_zero, cap, pooled)
        except Exception:
            log.debug("readahead of segment %r failed", key, exc_info=True)
        else:
            self._unpin(ch)
        return True
