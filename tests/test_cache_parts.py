"""The chunk cache's parts on their own (ctfs/mount/cache/): the buffer pool and its bound,
the LRU table, and readahead planning. tests/test_cache.py drives them together."""
from __future__ import annotations

import threading

import pytest

from ctfs.mount.cache.buffers import PAGE, BufferPool
from ctfs.mount.cache.readahead import Readahead
from ctfs.mount.cache.table import DROPPED, READY, Chunk, ChunkTable


def pool(capacity_pages=4, huge=0):
    return BufferPool(capacity_pages * PAGE, threading.Lock(), mlock=False, huge_buffers=huge)


# --------------------------------------------------------------------- buffer pool

def test_pool_claims_within_the_bound_and_beyond_only_when_told():
    p = pool(4)
    assert p.claim_locked(3 * PAGE) and p.held == 3 * PAGE
    assert not p.claim_locked(2 * PAGE) and p.held == 3 * PAGE
    assert p.claim_locked(2 * PAGE, beyond=True) and (p.held, p.peak) == (5 * PAGE, 5 * PAGE)
    p.unclaim(2 * PAGE)
    assert (p.held, p.peak) == (3 * PAGE, 5 * PAGE)


def test_pool_recycles_zeroed_buffers_and_unmaps_the_rest():
    p = pool(4)
    assert p.claim_locked(PAGE)
    b = p.map(PAGE, pooled=True)
    b.mv[:5] = b"plain"
    b.used = 5
    p.recycle_locked(b, closed=False)
    assert p.free == {PAGE: [b]} and bytes(b.mv[:5]) == bytes(5) and p.held == PAGE
    assert p.take_free_locked(PAGE) is b and p.take_free_locked(PAGE) is None
    p.recycle_locked(b, closed=True)  # a closed cache pools nothing
    assert p.free == {PAGE: []} and p.held == 0 and p.live == set() and b.closed


def test_pool_reserve_maps_ahead_within_the_bound():
    p = pool(3)
    assert p.reserve(PAGE, 5, lambda: False) == 3  # the bound stops it
    assert len(p.free[PAGE]) == 3 and p.held == 3 * PAGE
    assert p.reserve(PAGE, 2, lambda: False) == 0  # already there
    assert p.drop_idle_other_locked(2 * PAGE) and p.held == 2 * PAGE
    assert not p.drop_idle_other_locked(PAGE)  # none of another size than PAGE now
    p.release_free_locked()
    assert p.held == 0 and p.live == set()


# --------------------------------------------------------------------- LRU table

class Buf:
    cap = PAGE


def ready(key, size=PAGE):
    """A READY, idle chunk holding a (stand-in) buffer of one page."""
    ch = Chunk(key, key[1], size)
    ch.state, ch.pins, ch.buf = READY, 0, Buf()
    return ch


def test_table_victims_in_lru_order_skipping_pinned_and_unread_readahead():
    t = ChunkTable()
    a, b, c = ready(("f", 0)), ready(("f", 1)), ready(("f", 2))
    for ch in (a, b, c):
        t.add(ch)
    t.touch(a)                      # order now b, c, a
    b.pins = 1                      # pinned: never a victim
    c.ra_pending = True             # read ahead, not yet used: not for readahead
    assert t.victim(for_readahead=False) is c
    assert t.victim(for_readahead=True) is a
    buf = t.evict(c)
    assert buf is not None and c.state == DROPPED and c.buf is None
    assert (("f", 2) in t, t.evictions) == (False, 1)


def test_table_moves_a_chunk_served_to_its_end_to_the_eviction_end():
    t = ChunkTable()
    a, b = ready(("f", 0)), ready(("f", 1))
    t.add(a)
    t.add(b)
    assert t.consumed_front(PAGE) is None
    t.served(b, PAGE - 1)
    assert list(t.map) == [a.key, b.key] and not b.consumed
    t.served(b, 1)
    assert list(t.map) == [b.key, a.key] and b.consumed
    assert t.consumed_front(PAGE) is b and t.consumed_front(2 * PAGE) is None


def test_table_stats_count_ready_and_loading():
    t = ChunkTable()
    t.add(ready(("f", 0), 100))
    t.add(Chunk(("f", 1), 1, 50))  # LOADING
    t.hits, t.misses = 3, 1
    assert t.stats() == {"bytes_cached": 100, "chunks": 1, "inflight": 1, "hits": 3, "misses": 1,
                         "hit_ratio": 0.75, "evictions": 0}
    assert [c.key for c in t.of_source("f")] == [("f", 0), ("f", 1)] and not t.map


# --------------------------------------------------------------------- readahead planning

class Src:
    max_segment_size = 8 * PAGE
    segment_starts = list(range(0, 20 * 8 * PAGE, 8 * PAGE))


def planner(depth=3):
    ra = Readahead(depth, 0, threading.Lock(), lambda: False)  # no workers: plan only
    return ra, Src()


def note(ra, src, key, first, known=lambda k: False, window=3):
    """A read of exactly segment FIRST of SRC under KEY (the lock held, as the cache does)."""
    seg = src.max_segment_size
    with ra.lock:
        return ra.note_access_locked(src, key, first * seg, (first + 1) * seg, first, first,
                                     window=window, known=known)


def test_readahead_ramps_up_to_the_window_after_sequential_reads():
    ra, src = planner()
    assert note(ra, src, "f", 0) is False
    assert not ra.queue                                   # first read: nothing known yet
    assert note(ra, src, "f", 1) is False                 # continues it: one segment ahead,
    assert [t.index for t in ra.queue] == [2]             # but not yet a sequential reader
    assert note(ra, src, "f", 2, known=lambda k: k == ("f", 4)) is True
    assert [t.index for t in ra.queue] == [2, 3]          # two ahead, less what is known
    assert note(ra, src, "f", 3) is True
    assert [t.index for t in ra.queue] == [2, 3, 4, 5, 6]  # the whole window (3)
    assert note(ra, src, "f", 12) is False
    assert len(ra.queue) == 5                             # a jump is not sequential
    assert ra.seq["f"] == (13 * src.max_segment_size, 12, 0)


def test_readahead_takes_requests_out_of_order_as_one_stream():
    # FUSE workers take the kernel's readahead requests in any order
    ra, src = planner()
    seg = src.max_segment_size
    ra.reorder = 3
    runs = []
    for i in (0, 1, 3, 2, 5, 4, 6):
        note(ra, src, "f", i)
        runs.append(ra.seq["f"][2])
    assert runs == [0, 1, 2, 3, 4, 5, 6]
    assert ra.seq["f"][:2] == (7 * seg, 6)                # the furthest end seen
    note(ra, src, "f", 10)                                # forward jump: a new stream
    note(ra, src, "f", 6)                                 # 5 segments behind: too far back
    assert ra.seq["f"] == (7 * seg, 6, 0)


def test_readahead_skips_stale_and_passed_tasks_and_bounds_its_queue():
    ra, src = planner()
    ra.max_queue = 2
    for i in range(3):
        note(ra, src, "f", i)
    assert [t.index for t in ra.queue] == [3, 4]          # the oldest (2) went
    ra.seq["f"] = (4 * src.max_segment_size, 3, 2)        # the reader is past segment 3
    with ra.lock:
        assert ra.next_task_locked(lambda k: False).index == 4
    for i in range(3):
        note(ra, src, "g", i)
    stale = ra.queue[0]
    with ra.lock:
        ra.clear_locked()                                 # a wipe: nothing queued, new generation
    assert not ra.queue and not ra.seq and ra.generation == 1
    ra.queue.append(stale)                                # a task from before the wipe
    ra.queue.append(type(stale)(src, "g", 7, ra.generation))
    with ra.lock:
        assert ra.next_task_locked(lambda k: False).index == 7


def test_readahead_window_leaves_room_for_the_read_itself():
    ra, _ = planner(depth=3)
    assert ra.window(PAGE, 10 * PAGE) == 3
    assert ra.window(PAGE, 3 * PAGE) == 2
    assert ra.window(PAGE, PAGE) == 0


def test_readahead_drop_source_forgets_only_that_source():
    ra, src = planner()
    for key in ("f", "g"):
        for i in range(3):
            note(ra, src, key, i, window=2)
    with ra.lock:
        ra.drop_source_locked("f")
    assert {t.skey for t in ra.queue} == {"g"} and ra.queued == {("g", 2), ("g", 3), ("g", 4)}
    assert "f" not in ra.seq and "g" in ra.seq


@pytest.mark.parametrize("depth, workers, enabled", [(3, 1, True), (0, 1, False), (3, 0, False)])
def test_readahead_enabled_needs_depth_and_workers(depth, workers, enabled):
    assert Readahead(depth, workers, threading.Lock(), lambda: False).enabled is enabled
