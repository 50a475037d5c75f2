"""Anonymous memory for the read path's big buffers, backed by transparent huge pages.

Both of the read path's big buffers do better in 2 MiB pages than in 4 KiB ones:

* ciphertext read with ``O_DIRECT`` (``ctfs.storage.direct``): the disk needs a DMA segment per
  page, which caps a direct read into 4 KiB pages at ~1.2 GB/s on the lab VM;
* decrypted chunks (``ctfs.mount.cache``), from which the kernel copies each read's reply
  (``ctfs.mount.fuse_reply``): it pins the reply's pages one by one, and a huge page spares it
  the page-table walk and the TLB misses of 4 KiB ones.

THP only backs a private anonymous mapping advised ``MADV_HUGEPAGE`` (with
``/sys/kernel/mm/transparent_hugepage/enabled`` at ``madvise`` or ``always``), in 2 MiB
pieces aligned to 2 MiB. So a buffer is mapped 2 MiB larger than asked and used from its
first 2 MiB boundary; the slack is never touched, so it costs address space, not memory.
Where THP is missing or no huge page is free, the kernel uses 4 KiB pages: slower, but the
same bytes.

A *fresh* huge page can cost far more than it saves: on a VM with free page reporting the
guest has handed its free 2 MiB blocks back to the host, and the first touch of one stalls
on the host (measured here: random reads through a mount that kept mapping new huge-page
chunk buffers used 1.0-2.0 CPU-s/GB instead of 0.5). So huge pages are for a few buffers
that are used again and again: the ciphertext pool, and the chunk cache's first buffers,
which a sequential reader keeps recycling (``ChunkCache.huge_buffers``). The mount faults
those in before it serves (``Mount._reserve_buffers``), so no read waits for them.
"""
from __future__ import annotations

import ctypes
import mmap

HUGE = 2 << 20  # transparent huge page size (x86_64, aarch64 with 4 KiB pages)


def address(view: memoryview) -> int:
    """Address of the first byte of a writable buffer."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def touch(view: memoryview) -> None:
    """Fault in every page of a fresh buffer now (by zeroing it)."""
    ctypes.memset(address(view), 0, len(view))


def huge_mapping(size: int, huge: bool = True) -> tuple[mmap.mmap, memoryview]:
    """A private anonymous mapping and a view of ``size`` bytes of it that starts on a
    2 MiB boundary, its whole 2 MiB pieces advised for huge pages (a 2 MiB chunk plus its
    16-byte tag takes one huge page and one small one, not two huge ones). Sizes under
    2 MiB, and ``huge=False``, get a plain mapping. Release the view before closing the
    mapping."""
    if size < HUGE or not huge:
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return m, memoryview(m)
    m = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = memoryview(m)
    skip = (-address(whole)) % HUGE
    view = whole[skip:skip + size]
    whole.release()
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:  # whole huge pages only: a tail past the last one stays in 4 KiB pages
            m.madvise(mmap.MADV_HUGEPAGE, skip, size - size % HUGE)
        except OSError:  # THP compiled out: 4 KiB pages still work
            pass
    return m, view
