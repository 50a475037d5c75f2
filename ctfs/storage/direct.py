"""Reading ciphertext without keeping a second copy of the model in the page cache.

A mounted file's plaintext is cached by the kernel (the FUSE page cache) and by ctfs's chunk
cache. If its ciphertext went through the page cache as well, a model load would take twice
its size in memory. The daemon would also fill a fresh page for every 4 KiB it reads. On a VM
that hands free memory back to its host, that fill costs a host page fault per page: up to
2 CPU-seconds per GB on the lab VM (``benchmarks/README.md``).

So :class:`Source` reads a chunk whose ciphertext is not in the page cache with ``O_DIRECT``.
The disk writes straight into a pooled, page-aligned buffer that is used again for the next
chunk. A chunk that is in the page cache already (a file just written or copied) is read
from there. ``cachestat(2)`` (Linux 6.5 and later) tells which.

Modes: ``auto`` (the default, as above), ``buffered`` (always the page cache: what a plain
``pread`` does) and ``direct`` (``O_DIRECT`` whenever the file system allows it). Where
``cachestat`` is missing, ``auto`` reads direct. Where ``O_DIRECT`` is refused, every mode
reads buffered.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading

from .hugemem import HUGE, huge_mapping, touch

log = logging.getLogger("ctfs.source")

MODES = ("auto", "buffered", "direct")
#: offset, length and address alignment of direct reads (covers every logical block size)
ALIGN = 4096
_SYS_CACHESTAT = {"x86_64": 451, "aarch64": 451}.get(os.uname().machine)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(f, ctypes.c_uint64) for f in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_syscall = ctypes.CDLL(None, use_errno=True).syscall
_syscall.restype = ctypes.c_long
_cachestat_ok = _SYS_CACHESTAT is not None


def cached_pages(fd: int, offset: int, length: int) -> int | None:
    """Pages of FD's range [offset, offset+length) in the page cache, or None where the
    kernel cannot tell (no ``cachestat``)."""
    global _cachestat_ok
    if not _cachestat_ok:
        return None
    rng, st = _Range(offset, length), _Stat()
    if _syscall(ctypes.c_long(_SYS_CACHESTAT), ctypes.c_int(fd), ctypes.byref(rng),
                ctypes.byref(st), ctypes.c_uint(0)) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # old kernel, or seccomp
            _cachestat_ok = False
        return None
    return st.nr_cache


def span(offset: int, length: int) -> tuple[int, int]:
    """The ALIGN-aligned range [start, end) that covers [offset, offset+length)."""
    return offset - offset % ALIGN, -(-(offset + length) // ALIGN) * ALIGN


def buffer_size(length: int, extra: int = 0) -> int:
    """Size of a buffer that takes an aligned read of LENGTH bytes at any offset and has
    EXTRA bytes of room after them."""
    return span(ALIGN - 1, length + extra)[1]


class _Pool:
    """Page-aligned buffers of one size, reused by every thread.

    Huge-page mappings (``ctfs.storage.hugemem``): a direct read into 4 KiB pages needs a DMA
    segment per page, which here caps it at ~1.2 GB/s; into 2 MiB pages it runs at disk
    speed with next to no CPU.
    """

    def __init__(self, size: int, keep: int = 8):
        self.size, self._keep = size, keep
        self._free: list[tuple[mmap.mmap, memoryview]] = []
        self._out: dict[int, mmap.mmap] = {}
        self._lock = threading.Lock()

    def get(self) -> memoryview:
        with self._lock:
            if self._free:
                m, view = self._free.pop()
                self._out[id(view)] = m
                return view
        m, view = self._map()
        with self._lock:
            self._out[id(view)] = m
        return view

    def _map(self) -> tuple[mmap.mmap, memoryview]:
        # under 2 MiB: one whole huge page all the same (a direct read into 4 KiB pages is
        # slow); above: whole huge pages and a small tail
        return huge_mapping(max(self.size, HUGE))

    def reserve(self, count: int) -> None:
        """Have ``count`` buffers mapped and faulted in ahead of the first reads."""
        while True:
            with self._lock:
                if len(self._free) + len(self._out) >= min(count, self._keep):
                    return
            m, view = self._map()
            touch(view)
            with self._lock:
                self._free.append((m, view))

    def put(self, view: memoryview) -> None:
        with self._lock:
            m = self._out.pop(id(view))
            if len(self._free) < self._keep:
                self._free.append((m, view))
                return
        _unmap(m, view)


def _unmap(m: mmap.mmap, view: memoryview) -> None:
    view.release()
    try:
        m.close()
    except BufferError:  # a slice is still alive (a traceback's frame): unmapped with it
        pass


_pools: dict[int, _Pool] = {}
_pools_lock = threading.Lock()


def _shared_pool(size: int, keep: int = 0) -> _Pool:
    """One pool per buffer size for the whole process: a model of many shards keeps a few
    buffers in all, not a few per file. KEEP: buffers a caller wants kept for reuse."""
    with _pools_lock:
        if size not in _pools:
            _pools[size] = _Pool(size, keep=8 + 2 * READ_AHEAD)
        pool = _pools[size]
        pool._keep = max(pool._keep, keep)
        return pool


def shared_pool(length: int, extra: int = 0, keep: int = 0) -> _Pool:
    """The process-wide pool of page-aligned, huge-page-backed buffers that take LENGTH bytes
    with EXTRA bytes of room after them (``get``/``put``/``reserve``), keeping at least KEEP
    for reuse: object-storage chunk reads use it too (fresh memory is dear on a VM)."""
    return _shared_pool(buffer_size(length, extra), keep)


#: direct reads a sequential reader keeps in flight ahead of itself, per file
READ_AHEAD = 2
#: reads at most this far behind the furthest one still belong to the same sequential stream
#: (the chunk cache's readahead runs a few chunks ahead of the reads it serves)
STREAM_WINDOW = 16 << 20
_io_pool = None
_io_pool_lock = threading.Lock()


def _io_threads():
    global _io_pool
    with _io_pool_lock:
        if _io_pool is None:
            from concurrent.futures import ThreadPoolExecutor
            _io_pool = ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="ctfs-io")
        return _io_pool


class Source:
    """Positioned reads of one open file: from the page cache, or ``O_DIRECT`` into pooled
    buffers. ``max_length``: the longest ``read``; ``extra``: room wanted after its bytes.

    Direct reads have no kernel readahead behind them. So when a direct read continues a
    sequential stream, the next ranges its caller names are read on I/O threads (up to
    ``READ_AHEAD`` at a time), and a later ``read`` of such a range takes the result.
    """

    def __init__(self, fd: int, path: str, mode: str = "auto", *, max_length: int,
                 extra: int = 0):
        if mode not in MODES:
            raise ValueError(f"source I/O mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.fd, self.path, self.mode, self.max_length = fd, path, mode, max_length
        self._pool = _shared_pool(buffer_size(max_length, extra))
        self._dfd = self._stale = -1
        self._lock = threading.Lock()
        self._ahead: dict[tuple[int, int], object] = {}  # (offset, length) -> Future
        self._front: int | None = None  # end of the furthest read of the current stream
        self.direct_reads = self.buffered_reads = self.ahead_hits = 0  # tests, inspection
        if mode != "buffered":
            try:  # the same open file, reopened (the path might name another file by now)
                self._dfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
            except OSError as e:
                log.info("%s: no O_DIRECT here (%s); reading through the page cache",
                         path, e.strerror or e)

    def _direct(self, start: int, end: int) -> bool:
        if self._dfd < 0:
            return False
        if self.mode == "direct":
            return True
        have = cached_pages(self.fd, start, end - start)
        return have is None or have < (end - start) // ALIGN

    def read(self, offset: int, length: int, ahead=None) -> tuple[memoryview, int, int]:
        """Read LENGTH bytes at OFFSET. Returns ``(buf, at, got)``: the bytes are
        ``buf[at:at+got]``, with ``extra`` bytes of room after them; ``got < length`` only
        at the end of the file. Give BUF back with :meth:`release`. ``ahead``: a function
        giving the (offset, length) ranges likely read next, called with how many are wanted,
        and only to read them ahead."""
        if length > self.max_length:
            raise ValueError(f"a read of {length} bytes, more than {self.max_length}")
        with self._lock:
            fut = self._ahead.pop((offset, length), None)
            front = self._front
            sequential = front is not None and -STREAM_WINDOW <= offset - front <= ALIGN
            self._front = max(front, offset + length) if sequential else offset + length
        result = None
        if fut is not None:
            try:
                result = fut.result()
                self.ahead_hits += 1
            except Exception:  # read it again here; that read reports the error, if any
                log.debug("%s: read-ahead of %d+%d failed", self.path, offset, length,
                          exc_info=True)
        direct = result is not None
        if result is None:
            result, direct = self._read(offset, length, None)
        if direct and sequential and ahead is not None:
            self._read_ahead(ahead(READ_AHEAD))
        return result

    def _read(self, offset: int, length: int, direct: bool | None):
        """One read into a pool buffer: ((buf, at, got), whether it went direct)."""
        buf = self._pool.get()
        try:
            start, end = span(offset, length)
            if direct is None:
                direct = self._direct(start, end)
            dfd = self._dfd
            if direct and dfd >= 0:
                try:
                    got = os.preadv(dfd, [buf[:end - start]], start)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self._refused(dfd, e)
                else:
                    self.direct_reads += 1
                    at = offset - start
                    return (buf, at, max(0, min(length, got - at))), True
            self.buffered_reads += 1
            return (buf, 0, os.preadv(self.fd, [buf[:length]], offset)), False
        except BaseException:
            self._pool.put(buf)
            raise

    def _read_ahead(self, ranges) -> None:
        with self._lock:
            if self._dfd < 0:
                return
            for off, n in ranges[:READ_AHEAD]:
                key = (off, n)
                if key in self._ahead or n > self.max_length:
                    continue
                while len(self._ahead) >= 2 * READ_AHEAD:  # the oldest was not wanted after all
                    self._discard(self._ahead.pop(next(iter(self._ahead))))
                self._ahead[key] = _io_threads().submit(lambda o=off, k=n: self._read(o, k, True)[0])

    def _discard(self, fut) -> None:
        def give_back(f):
            if not f.cancelled() and f.exception() is None:
                self._pool.put(f.result()[0])
        if not fut.cancel():
            fut.add_done_callback(give_back)

    def _refused(self, dfd: int, e: OSError) -> None:
        # Some file systems open with O_DIRECT but refuse the reads (or want a coarser
        # alignment): read buffered from now on. The descriptor stays open until close(),
        # as another thread may be reading through it.
        with self._lock:
            if self._dfd == dfd and dfd >= 0:
                log.warning("%s: O_DIRECT read refused (%s); reading through the page cache",
                            self.path, e.strerror or e)
                self._stale, self._dfd = dfd, -1

    def reserve(self, count: int) -> None:
        """Have ``count`` buffers of the shared pool ready (mapped and faulted in)."""
        self._pool.reserve(count)

    def release(self, buf: memoryview) -> None:
        """Give back a buffer that :meth:`read` returned."""
        self._pool.put(buf)

    def close(self) -> None:
        """Wait for reads ahead and close the ``O_DIRECT`` descriptor (not FD: it is the
        caller's). The buffers stay in the process-wide pool (ciphertext only)."""
        with self._lock:
            pending, self._ahead = list(self._ahead.values()), {}
            dfd, stale, self._dfd, self._stale = self._dfd, self._stale, -1, -1
        for fut in pending:
            if not fut.cancel():
                try:
                    self._pool.put(fut.result()[0])
                except Exception:
                    pass
        for fd in (dfd, stale):
            if fd >= 0:
                os.close(fd)
