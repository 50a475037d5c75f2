"""Readahead planning: which segments to decrypt before a sequential reader asks for them.

Per source the furthest end of a stream of reads is remembered; a read starting near it
(FUSE workers take the kernel's requests in any order), or in the segment right after the
one it ended in, continues the stream and queues the next segments (one, then two, up to
the window: ``depth``, bounded by what fits in the cache) for the cache's background
workers (one by default: best on 2 cores). Any read spanning several segments also queues
its later ones at the head, to be decrypted beside its first. The oldest queued task goes
when the queue is full; a task the reader has gone past, or one from before a wipe
(``generation``), is skipped. Shares the cache's lock: ``*_locked`` methods expect it held.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable, Hashable

log = logging.getLogger("ctfs.cache")


class Task:
    __slots__ = ("source", "skey", "index", "gen", "now")

    def __init__(self, source: Any, skey: Hashable, index: int, gen: int, now: bool = False) -> None:
        self.source = source
        self.skey = skey
        self.index = index
        self.gen = gen
        self.now = now  # a later segment of the read in progress: decrypt it in parallel


class Readahead:
    """Sequential detection, the queue of segments to read ahead, and its worker threads.
    ``run_one()`` (lock not held) is a worker's turn: take a task (:meth:`next_task_locked`)
    and read it ahead; False once the cache is closed."""

    #: a read starting within ``min(near, max_segment_size // 8)`` bytes of the previous
    #: read's end counts as sequential
    near = 256 * 1024
    #: max queued readahead tasks (oldest dropped)
    max_queue = 64
    #: number of per-source sequential-detection records kept
    max_streams = 4096
    #: FUSE workers take the kernel's readahead requests in any order: a read starting up
    #: to this many segments (or two of its lengths) before the furthest end of the stream
    #: continues it (a safetensors load through a mapping: requests up to 4 MiB behind, with
    #: 2 MiB segments)
    reorder = 2
    #: reads in a row that make a stream sequential (note_access_locked's answer). A fault
    #: in a mapping asks for a window around the page (two requests), so one read that
    #: continues another is not yet a sequential reader: a loader touching the first page of
    #: each tensor before reading any of them did exactly that.
    confirm = 2

    def __init__(self, depth: int, workers: int, lock: threading.Lock, run_one: Callable[[], bool]):
        self.depth = max(0, int(depth))
        self.n_workers = max(0, int(workers))
        self.enabled = bool(self.depth and self.n_workers)
        self.lock = lock
        self.work = threading.Condition(lock)
        self._run_one = run_one
        self.queue: collections.deque[Task] = collections.deque()
        self.queued: set[tuple] = set()
        # per source: (furthest end of its stream, last segment of it, sequential reads in a row)
        self.seq: collections.OrderedDict[Hashable, tuple[int, int, int]] = collections.OrderedDict()
        self.threads: list[threading.Thread] = []
        self.generation = 0
        self.closed = False
        self.issued = self.hits = self.dropped = 0  # counters for the stats
        self.split = 0  # segments queued to be decrypted beside the read that needs them

    def window(self, max_segment_cap: int, capacity: int) -> int:
        """Segments to keep decrypted ahead: the depth, but leaving room for the one read."""
        return max(0, min(self.depth, capacity // max_segment_cap - 1))

    def note_access_locked(self, source: Any, skey: Hashable, offset: int, end: int, first: int,
                           last: int, window: int, known: Callable[[tuple], bool]) -> bool:
        """A read of data bytes [offset, end) in segments first..last; queue what comes
        next if it continues the source's previous read (one segment for the first such
        read, two for the second, up to ``window``). ``known(key)``: already cached or
        loading, or handed to the page cache. Returns whether the read is sequential: the
        ``confirm``-th in a row or later."""
        prev = self.seq.get(skey)
        if last > first and window > 0:
            self._split_locked(source, skey, first, last, known)
        if prev is None:
            self.seq[skey] = (end, last, 0)
            if len(self.seq) > self.max_streams:
                self.seq.popitem(last=False)
            return False
        self.seq.move_to_end(skey)
        prev_end, prev_last, run = prev
        size = end - offset
        near = max(min(self.near, source.max_segment_size // 8), size)
        back = max(self.reorder * source.max_segment_size, 2 * size)
        if not (prev_end - back <= offset <= prev_end + near or first == prev_last + 1):
            self.seq[skey] = (end, last, 0)
            return False
        run += 1
        self.seq[skey] = (max(end, prev_end), max(last, prev_last), run)
        window = min(window, run)  # ramp up: a stream of two reads is often a read-around
        if window <= 0:
            return run >= self.confirm
        nseg = len(source.segment_starts)
        added = False
        for j in range(last + 1, min(last + 1 + window, nseg)):
            key = (skey, j)
            if known(key) or key in self.queued:
                continue
            if len(self.queue) >= self.max_queue:
                old = self.queue.popleft()
                self.queued.discard((old.skey, old.index))
            self.queue.append(Task(source, skey, j, self.generation))
            self.queued.add(key)
            added = True
        if added:
            self._wake_locked()
        return run >= self.confirm

    def _split_locked(self, source: Any, skey: Hashable, first: int, last: int,
                      known: Callable[[tuple], bool]) -> None:
        """A read that spans segments first..last: queue first+1..last at the head, so a
        worker decrypts them while the reader's thread decrypts ``first`` (a random 1 MiB
        read spans two 2 MiB segments about half the time; one core would do both)."""
        added = False
        for j in range(last, first, -1):
            key = (skey, j)
            if known(key) or key in self.queued:
                continue
            if len(self.queue) >= self.max_queue:
                old = self.queue.pop()
                self.queued.discard((old.skey, old.index))
            self.queue.appendleft(Task(source, skey, j, self.generation, now=True))
            self.queued.add(key)
            self.split += 1
            added = True
        if added:
            self._wake_locked()

    def _wake_locked(self) -> None:
        """Tasks were queued: have the workers started and one of them woken."""
        if len(self.threads) < self.n_workers and not self.closed:
            self._start_workers_locked()
        self.work.notify()

    def next_task_locked(self, known: Callable[[tuple], bool]) -> Task | None:
        """Wait for the next task worth doing; None once closed."""
        while True:
            while not self.queue and not self.closed:
                self.work.wait()
            if self.closed:
                return None
            task = self.queue.popleft()
            key = (task.skey, task.index)
            self.queued.discard(key)
            if task.gen != self.generation or known(key):
                continue
            seq = self.seq.get(task.skey)
            if seq is not None and task.index <= seq[1] and not task.now:
                continue  # the reader already went past it: decrypting it is wasted work
            return task

    def clear_locked(self) -> None:
        """Forget every stream and queued task (a wipe): tasks in hand are stale now."""
        self.generation += 1
        self.queue.clear()
        self.queued.clear()
        self.seq.clear()

    def drop_source_locked(self, skey: Hashable) -> None:
        self.seq.pop(skey, None)
        if self.queue:
            keep = [t for t in self.queue if t.skey != skey]
            self.queue.clear()
            self.queue.extend(keep)
            self.queued = {(t.skey, t.index) for t in keep}

    def close_locked(self) -> None:
        self.closed = True
        self.work.notify_all()

    def join(self, timeout: float | None) -> None:
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(timeout)
        self.threads = []

    def _start_workers_locked(self) -> None:
        while len(self.threads) < self.n_workers:
            t = threading.Thread(target=self._run_forever, name=f"ctfs-readahead-{len(self.threads)}",
                                 daemon=True)
            self.threads.append(t)
            t.start()

    def _run_forever(self) -> None:
        while self._run_one():
            pass
