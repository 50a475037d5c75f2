"""Tests for ctfs.mount.cache.ChunkCache (plaintext chunk cache of the FUSE read path)."""
from __future__ import annotations

import logging
import random
import threading
import time

import pytest
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

from ctfs.mount.cache import buffers as buffers_mod
from ctfs.mount.cache import table as table_mod
from ctfs.mount.cache import ChunkCache
from ctfs.errors import IntegrityError

PAGE = buffers_mod.PAGE


class FakeSource:
    """SegmentSource over a plaintext bytes object.

    ``seg`` is the regular segment size (= max_segment_size); ``starts`` may be
    given explicitly to create irregular (e.g. larger-than-max) segments.
    """

    def __init__(self, data: bytes, seg: int, *, starts=None, delay: float = 0.0,
                 corrupt=(), max_segment_size=None):
        self.data = data
        self.data_len = len(data)
        self.max_segment_size = max_segment_size or seg
        self.segment_starts = list(starts) if starts is not None else list(range(0, len(data), seg))
        self.delay = delay
        self.corrupt = set(corrupt)
        self.calls: dict[int, int] = {}
        self._lock = threading.Lock()

    def segment_end(self, i: int) -> int:
        return self.segment_starts[i + 1] if i + 1 < len(self.segment_starts) else self.data_len

    def read_segment(self, i: int, out: memoryview) -> int:
        with self._lock:
            self.calls[i] = self.calls.get(i, 0) + 1
        s, e = self.segment_starts[i], self.segment_end(i)
        assert len(out) >= e - s
        if self.delay:
            time.sleep(self.delay)
        if i in self.corrupt:
            out[: e - s] = b"\xee" * (e - s)  # partial garbage, must never be served
            raise IntegrityError("bad tag", chunk=i)
        out[: e - s] = self.data[s:e]
        return e - s

    def total_calls(self) -> int:
        return sum(self.calls.values())


def rand_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def read(cache, src, key, off, n):
    buf = bytearray(n)
    got = cache.read_into(src, key, off, memoryview(buf))
    return bytes(buf[:got])


def live_buffers(cache):
    with cache._lock:
        return list(cache.pool.live)


def check_bound(cache):
    s = cache.stats()
    assert s["bytes_held"] <= s["capacity"]
    assert s["peak_bytes_held"] <= s["capacity"]
    assert s["bytes_cached"] <= s["bytes_held"]
    # (a readahead worker may have reserved bytes it has not mapped yet)
    assert sum(b.cap for b in live_buffers(cache)) <= s["bytes_held"]


@pytest.fixture
def data():
    return rand_bytes(10 * PAGE + 123, seed=1)


# --------------------------------------------------------------------- basic


SEG = PAGE  # one page per segment keeps buffers small
DATA = rand_bytes(20 * SEG + 777, seed=42)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(off=st.integers(0, len(DATA) + 10), n=st.integers(0, 5 * SEG))
def test_random_ranges_exact(off, n):
    src = FakeSource(DATA, SEG)
    with ChunkCache(6 * SEG, readahead=0) as c:
        assert read(c, src, "f", off, n) == DATA[off:off + n]
        # second time from cache, same answer
        assert read(c, src, "f", off, n) == DATA[off:off + n]
        check_bound(c)


@settings(max_examples=30, deadline=None, database=None)
@given(ops=st.lists(st.tuples(st.integers(0, len(DATA)), st.integers(1, 3 * SEG)), min_size=1, max_size=40),
       cap_chunks=st.integers(1, 5), ra=st.integers(0, 3))
def test_random_sequence_exact_and_bounded(ops, cap_chunks, ra):
    src = FakeSource(DATA, SEG)
    with ChunkCache(cap_chunks * SEG, readahead=ra) as c:
        for off, n in ops:
            assert read(c, src, "f", off, n) == DATA[off:off + n]
            check_bound(c)


def test_spanning_and_end_of_data(data):
    src = FakeSource(data, PAGE)
    c = ChunkCache(20 * PAGE, readahead=0)
    # spans 4 segments
    assert read(c, src, "k", PAGE // 2, 3 * PAGE + 10) == data[PAGE // 2: PAGE // 2 + 3 * PAGE + 10]
    assert sorted(src.calls) == [0, 1, 2, 3]
    # clipped at end of data
    assert read(c, src, "k", len(data) - 50, 1000) == data[-50:]
    assert read(c, src, "k", len(data), 10) == b""
    assert read(c, src, "k", len(data) + 5, 10) == b""
    assert read(c, src, "k", 0, 0) == b""
    # whole file in one read
    assert read(c, src, "k", 0, len(data) + 100) == data
    # each segment decrypted exactly once
    assert all(v == 1 for v in src.calls.values())
    with pytest.raises(ValueError):
        read(c, src, "k", -1, 10)
    c.close()


def test_touches_only_covering_segments(data):
    src = FakeSource(data, PAGE)
    with ChunkCache(20 * PAGE, readahead=0) as c:
        read(c, src, "k", 3 * PAGE + 5, 10)
        assert src.calls == {3: 1}
        read(c, src, "k", 5 * PAGE - 1, 2)
        assert src.calls == {3: 1, 4: 1, 5: 1}


def test_sources_share_cache_by_key(data):
    other = rand_bytes(len(data), seed=7)
    a, b = FakeSource(data, PAGE), FakeSource(other, PAGE)
    with ChunkCache(4 * PAGE, readahead=0) as c:
        for _ in range(3):
            assert read(c, a, "a", 0, 100) == data[:100]
            assert read(c, b, "b", 0, 100) == other[:100]
        assert a.calls == {0: 1} and b.calls == {0: 1}
        assert set(c.cached_keys()) == {("a", 0), ("b", 0)}


# ------------------------------------------------------------ bound and LRU


def test_lru_bound_and_eviction_order(data):
    src = FakeSource(data, PAGE)
    c = ChunkCache(3 * PAGE, readahead=0)
    for i in (0, 1, 2):
        read(c, src, "k", i * PAGE, 10)
    assert c.cached_keys() == [("k", 0), ("k", 1), ("k", 2)]
    read(c, src, "k", 0, 10)  # touch 0 -> LRU is 1
    assert c.cached_keys() == [("k", 1), ("k", 2), ("k", 0)]
    read(c, src, "k", 3 * PAGE, 10)  # evicts 1
    assert c.cached_keys() == [("k", 2), ("k", 0), ("k", 3)]
    read(c, src, "k", 4 * PAGE, 10)  # evicts 2
    assert c.cached_keys() == [("k", 0), ("k", 3), ("k", 4)]
    s = c.stats()
    assert s["evictions"] == 2
    assert s["bytes_held"] == 3 * PAGE and s["capacity"] == 3 * PAGE
    assert s["hits"] == 1 and s["misses"] == 5
    assert s["hit_ratio"] == pytest.approx(1 / 6)
    # pool buffers are reused, never more than capacity allows
    assert len(live_buffers(c)) == 3
    ids = {id(b) for b in live_buffers(c)}
    for i in range(len(src.segment_starts)):
        read(c, src, "k", i * PAGE, PAGE)
        check_bound(c)
    assert {id(b) for b in live_buffers(c)} == ids
    # evicted segment decrypted again
    before = src.calls[1]
    assert ("k", 1) not in c.cached_keys()
    read(c, src, "k", 1 * PAGE, 10)
    assert src.calls[1] == before + 1
    c.close()
    assert c.stats()["bytes_held"] == 0


def test_eviction_zeroes_buffer_before_reuse(data, monkeypatch):
    src = FakeSource(data, PAGE)
    c = ChunkCache(1 * PAGE, readahead=0)
    read(c, src, "k", 0, 10)
    (buf,) = live_buffers(c)
    seen = []

    def spy(i, out):
        seen.append(bytes(buf.mv))  # what the reused buffer holds when handed out
        return FakeSource.read_segment(src, i, out)

    monkeypatch.setattr(src, "read_segment", spy)
    assert read(c, src, "k", PAGE, 10) == data[PAGE:PAGE + 10]
    assert seen == [bytes(PAGE)]
    c.close()


def test_zero_reused_false_scrubs_tail(monkeypatch):
    P = PAGE
    data = rand_bytes(2 * P + P // 2, seed=21)  # last segment is half a page
    src = FakeSource(data, P)
    c = ChunkCache(P, readahead=0, zero_reused=False)
    read(c, src, "k", 0, 10)
    (buf,) = live_buffers(c)
    seen = []

    def spy(i, out):
        seen.append(bytes(buf.mv))
        return FakeSource.read_segment(src, i, out)

    monkeypatch.setattr(src, "read_segment", spy)
    assert read(c, src, "k", 2 * P, P) == data[2 * P:]
    # stale tail of the old segment zeroed before the new decryption
    assert seen[0][P // 2:] == bytes(P // 2) and seen[0][:P // 2] == data[:P // 2]
    assert bytes(buf.mv) == data[2 * P:] + bytes(P // 2)
    c.wipe()
    assert bytes(buf.mv) == bytes(P)
    c.close()


def test_preallocated_pool(data):
    src = FakeSource(data, PAGE)
    c = ChunkCache(4 * PAGE + 100, readahead=0, chunk_size=PAGE)
    bufs = live_buffers(c)
    assert len(bufs) == 4 and c.stats()["bytes_held"] == 4 * PAGE
    for i in range(len(src.segment_starts)):
        assert read(c, src, "k", i * PAGE, PAGE) == data[i * PAGE:(i + 1) * PAGE]
    assert {id(b) for b in live_buffers(c)} == {id(b) for b in bufs}
    check_bound(c)
    c.close()


# ------------------------------------------------------------- single flight


def test_single_flight():
    data = rand_bytes(4 * PAGE, seed=3)
    src = FakeSource(data, PAGE, delay=0.2)
    c = ChunkCache(4 * PAGE, readahead=0)
    barrier = threading.Barrier(8)
    results, errors = [], []

    def worker():
        try:
            barrier.wait()
            results.append(read(c, src, "k", PAGE + 7, 100))
        except Exception as e:  # pragma: no cover
            errors.append(e)

    ts = [threading.Thread(target=worker) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert results == [data[PAGE + 7:PAGE + 107]] * 8
    assert src.calls == {1: 1}
    s = c.stats()
    assert s["misses"] == 1 and s["hits"] == 7
    c.close()


# ------------------------------------------------------------------ failures


def test_failed_segment_raises_every_time_not_cached(data):
    src = FakeSource(data, PAGE, corrupt={2})
    c = ChunkCache(4 * PAGE, readahead=0)
    for n in range(1, 4):
        with pytest.raises(IntegrityError):
            read(c, src, "k", 2 * PAGE + 1, 10)
        assert src.calls[2] == n
        assert ("k", 2) not in c.cached_keys()
    # range spanning a bad segment fails, nothing partial returned as success
    out = bytearray(3 * PAGE)
    with pytest.raises(IntegrityError):
        c.read_into(src, "k", PAGE, memoryview(out))
    assert out[:PAGE] == data[PAGE:2 * PAGE] and out[PAGE:] == bytes(2 * PAGE)
    # failed buffer was zeroed and recycled; other segments still fine
    assert read(c, src, "k", 0, 10) == data[:10]
    for b in live_buffers(c):
        assert b"\xee" * 64 not in bytes(b.mv)
    check_bound(c)
    # once fixed, it is served
    src.corrupt.clear()
    assert read(c, src, "k", 2 * PAGE, 10) == data[2 * PAGE:2 * PAGE + 10]
    c.close()


def test_failure_propagates_to_all_waiters():
    data = rand_bytes(4 * PAGE, seed=4)
    src = FakeSource(data, PAGE, delay=0.2, corrupt={0})
    c = ChunkCache(4 * PAGE, readahead=0)
    barrier = threading.Barrier(6)
    errs = []

    def worker():
        barrier.wait()
        try:
            read(c, src, "k", 0, 10)
        except IntegrityError as e:
            errs.append(e)

    ts = [threading.Thread(target=worker) for _ in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(errs) == 6
    assert src.calls[0] == 1  # single flight also for failures
    assert c.stats()["bytes_cached"] == 0
    c.close()


def test_wrong_size_from_source_is_an_error(data):
    src = FakeSource(data, PAGE)
    src.read_segment = lambda i, out: 1
    with ChunkCache(4 * PAGE, readahead=0) as c:
        with pytest.raises(OSError):
            read(c, src, "k", 0, 10)
        assert c.cached_keys() == []


def test_arbitrary_exception_propagates(data):
    src = FakeSource(data, PAGE)

    def boom(i, out):
        raise KeyError("x")

    src.read_segment = boom
    with ChunkCache(4 * PAGE, readahead=0) as c:
        with pytest.raises(KeyError):
            read(c, src, "k", 0, 10)


# ---------------------------------------------------------------------- wipe


def test_wipe_zeroes_and_empties(data):
    src = FakeSource(data, PAGE)
    c = ChunkCache(6 * PAGE, readahead=0)
    read(c, src, "k", 0, 6 * PAGE)
    bufs = live_buffers(c)
    assert len(bufs) == 6 and any(bytes(b.mv) != bytes(b.cap) for b in bufs)
    assert c.wipe() is True
    for b in bufs:
        assert b.closed or bytes(b.mv) == bytes(b.cap)
    for b in live_buffers(c):
        assert bytes(b.mv) == bytes(b.cap)
    s = c.stats()
    assert s["bytes_cached"] == 0 and c.cached_keys() == []
    # served again (decrypts again)
    assert read(c, src, "k", 0, 10) == data[:10]
    assert src.calls[0] == 2
    c.wipe(release=True)
    assert c.stats()["bytes_held"] == 0 and live_buffers(c) == []
    c.close()
    with pytest.raises(ValueError):
        read(c, src, "k", 0, 10)


def test_wipe_with_inflight_and_pending_readahead():
    data = rand_bytes(40 * PAGE, seed=5)
    src = FakeSource(data, PAGE, delay=0.05)
    c = ChunkCache(8 * PAGE, readahead=3)
    res = []
    t = threading.Thread(target=lambda: res.append(read(c, src, "k", 5 * PAGE, 100)))
    read(c, src, "k", 0, PAGE)
    read(c, src, "k", PAGE, PAGE)  # sequential -> readahead queued
    t.start()
    time.sleep(0.01)
    assert c.wipe(timeout=5) is True
    t.join()
    assert res == [data[5 * PAGE:5 * PAGE + 100]]  # in-flight read still served
    for b in live_buffers(c):
        assert bytes(b.mv) == bytes(b.cap)
    assert c.cached_keys() == []
    time.sleep(0.2)  # cancelled readahead must not refill the cache
    assert c.cached_keys() == []
    c.close()


# ----------------------------------------------------------------- readahead


def test_readahead_sequential_scan():
    nseg = 30
    data = rand_bytes(nseg * PAGE, seed=6)
    src = FakeSource(data, PAGE, delay=0.003)
    c = ChunkCache(8 * PAGE, readahead=3)
    half = PAGE // 2
    got = bytearray()
    for off in range(0, len(data), half):
        got += read(c, src, "k", off, half)
    assert bytes(got) == data
    s = c.stats()
    assert s["readahead_issued"] > 0
    assert s["readahead_hits"] >= nseg - 4
    assert s["misses"] <= 3
    assert all(v == 1 for v in src.calls.values()) and len(src.calls) == nseg
    assert s["hit_ratio"] > 0.9
    check_bound(c)
    c.close()


def test_no_readahead_for_random_access():
    data = rand_bytes(30 * PAGE, seed=8)
    src = FakeSource(data, PAGE)
    with ChunkCache(8 * PAGE, readahead=3) as c:
        for i in (20, 3, 27, 11, 0, 15):
            read(c, src, "k", i * PAGE + 10, 100)
        time.sleep(0.05)
        assert c.stats()["readahead_issued"] == 0
        assert sorted(src.calls) == [0, 3, 11, 15, 20, 27]


def test_readahead_disabled_and_respects_small_capacity():
    data = rand_bytes(20 * PAGE, seed=9)
    src = FakeSource(data, PAGE)
    with ChunkCache(8 * PAGE, readahead=0) as c:
        for off in range(0, len(data), PAGE):
            read(c, src, "k", off, PAGE)
        assert c.stats()["readahead_issued"] == 0
    src = FakeSource(data, PAGE)
    with ChunkCache(1 * PAGE, readahead=3) as c:  # no room for readahead
        for off in range(0, len(data), PAGE):
            assert read(c, src, "k", off, PAGE) == data[off:off + PAGE]
        assert c.stats()["readahead_issued"] == 0
        assert all(v == 1 for v in src.calls.values())


def test_readahead_does_not_evict_pinned_or_exceed_bound():
    data = rand_bytes(30 * PAGE, seed=10)
    src = FakeSource(data, PAGE, delay=0.002)
    c = ChunkCache(3 * PAGE, readahead=3)
    for off in range(0, len(data), PAGE // 4):
        assert read(c, src, "k", off, PAGE // 4) == data[off:off + PAGE // 4]
        check_bound(c)
    time.sleep(0.05)
    check_bound(c)
    assert c.stats()["readahead_issued"] > 0
    c.close()


def test_readahead_errors_swallowed_foreground_raises(caplog):
    data = rand_bytes(10 * PAGE, seed=11)
    src = FakeSource(data, PAGE, corrupt={3})
    c = ChunkCache(8 * PAGE, readahead=3)
    with caplog.at_level(logging.DEBUG, logger="ctfs.cache"):
        read(c, src, "k", 0, PAGE)
        read(c, src, "k", PAGE, PAGE)  # schedules 2,3,4
        deadline = time.time() + 2
        while src.calls.get(3, 0) == 0 and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(0.02)
        assert read(c, src, "k", 2 * PAGE, PAGE) == data[2 * PAGE:3 * PAGE]
        with pytest.raises(IntegrityError):
            read(c, src, "k", 3 * PAGE, PAGE)
    assert ("k", 3) not in c.cached_keys()
    c.close()


# ------------------------------------------------------ larger-than-max segments


def test_larger_than_max_segment():
    # segments: [0,P) [P,4P) (3 pages > max: dedicated buffer) [4P,5P) [5P,6P)
    P = PAGE
    data = rand_bytes(6 * P, seed=12)
    src = FakeSource(data, P, starts=[0, P, 4 * P, 5 * P], max_segment_size=P)
    c = ChunkCache(5 * P, readahead=0)
    assert read(c, src, "k", 0, len(data)) == data  # 0 evicted (LRU) to make room for 3
    assert c.cached_keys() == [("k", 1), ("k", 2), ("k", 3)]
    assert sorted(b.cap for b in live_buffers(c)) == [P, P, 3 * P]
    check_bound(c)
    # large segment served from cache
    assert read(c, src, "k", P + 5, 2 * P) == data[P + 5:3 * P + 5]
    assert src.calls[1] == 1
    # pulling 0 and 4.. evicts the dedicated buffer (LRU is 2, then 3, then 1)
    read(c, src, "k", 0, 10)   # evicts 2 (same size, reused)
    read(c, src, "k", 4 * P, 10)  # 2 again: evicts 3
    assert c.cached_keys() == [("k", 1), ("k", 0), ("k", 2)]
    read(c, src, "k", 5 * P, 10)  # 3: evicts 1 (dedicated, unmapped), room for new pool buffer
    assert ("k", 1) not in c.cached_keys()
    assert all(b.cap == P for b in live_buffers(c))
    check_bound(c)
    assert read(c, src, "k", P, 3 * P) == data[P:4 * P]
    assert src.calls[1] == 2
    check_bound(c)
    c.close()


def test_segment_larger_than_capacity_served_then_dropped():
    P = PAGE
    data = rand_bytes(10 * P, seed=13)
    src = FakeSource(data, P, starts=[0, P, 9 * P], max_segment_size=P)  # seg 1 is 8 pages
    c = ChunkCache(2 * P, readahead=0)
    assert read(c, src, "k", 0, P) == data[:P]
    assert read(c, src, "k", 2 * P, 3 * P) == data[2 * P:5 * P]
    s = c.stats()
    assert ("k", 1) not in c.cached_keys()
    assert s["bytes_held"] <= 2 * P  # transient buffer released
    assert all(b.cap <= 2 * P for b in live_buffers(c))
    assert read(c, src, "k", P, 8 * P) == data[P:9 * P]
    assert src.calls[1] == 2
    c.close()


# -------------------------------------------------------------------- mlock


def test_mlock_status_and_failure_not_fatal(data, monkeypatch, caplog):
    src = FakeSource(data, PAGE)
    with ChunkCache(4 * PAGE) as c:
        read(c, src, "k", 0, 10)
        assert isinstance(c.stats()["mlocked"], bool)
    monkeypatch.setattr(buffers_mod, "mlock", lambda addr, n: (False, "mlock failed: EPERM"))
    with caplog.at_level(logging.WARNING, logger="ctfs.cache"):
        with ChunkCache(4 * PAGE, readahead=0) as c:
            for i in range(4):
                assert read(c, src, "k", i * PAGE, 10) == data[i * PAGE:i * PAGE + 10]
            assert c.stats()["mlocked"] is False
    warnings = [r for r in caplog.records if r.name == "ctfs.cache" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    with ChunkCache(4 * PAGE, mlock=False) as c:
        read(c, src, "k", 0, 10)
        assert c.stats()["mlocked"] is False


# -------------------------------------------------------------- concurrency


@pytest.mark.parametrize("cap_chunks,ra", [(3, 3), (6, 2), (32, 3)])
def test_concurrency_stress(cap_chunks, ra):
    P = PAGE
    data = rand_bytes(40 * P + 321, seed=14)
    src = FakeSource(data, P, delay=0.0002)
    src2 = FakeSource(rand_bytes(len(data), seed=15), P)
    c = ChunkCache(cap_chunks * P, readahead=ra)
    errors = []
    stop = time.time() + 1.0

    def worker(seed):
        r = random.Random(seed)
        try:
            while time.time() < stop:
                s, key = (src, "a") if r.random() < 0.7 else (src2, "b")
                if r.random() < 0.5:  # sequential run
                    off = r.randrange(len(data))
                    for _ in range(r.randrange(1, 10)):
                        n = r.randrange(1, 2 * P)
                        got = read(c, s, key, off, n)
                        if got != s.data[off:off + n]:
                            errors.append(("seq", key, off, n))
                        off += n
                else:
                    off = r.randrange(len(data) + 10)
                    n = r.randrange(0, 4 * P)
                    if read(c, s, key, off, n) != s.data[off:off + n]:
                        errors.append(("rnd", key, off, n))
                st_ = c.stats()
                if st_["bytes_held"] > st_["capacity"]:
                    errors.append(("bound", st_["bytes_held"]))
        except Exception as e:  # pragma: no cover
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[:5]
    check_bound(c)
    s = c.stats()
    assert s["hits"] + s["misses"] > 100
    c.close()
    assert c.stats()["bytes_held"] == 0


def test_stats_keys():
    with ChunkCache(PAGE) as c:
        s = c.stats()
    for k in ("bytes_cached", "capacity", "hits", "misses", "hit_ratio", "evictions",
              "bytes_decrypted", "decrypt_seconds", "readahead_issued", "readahead_hits", "mlocked"):
        assert k in s


def test_capacity_below_one_segment_still_serves(data):
    src = FakeSource(data, 2 * PAGE)
    with ChunkCache(PAGE, readahead=3) as c:
        for off in range(0, len(data), PAGE):
            assert read(c, src, "k", off, PAGE) == data[off:off + PAGE]
            s = c.stats()
            assert s["bytes_held"] == 0 and s["bytes_cached"] == 0  # transient, dropped
        assert c.stats()["readahead_issued"] == 0


def test_drop_source(data):
    a, b = FakeSource(data, PAGE), FakeSource(data[::-1], PAGE)
    with ChunkCache(8 * PAGE, readahead=0) as c:
        read(c, a, "a", 0, 3 * PAGE)
        read(c, b, "b", 0, 2 * PAGE)
        c.drop_source("a")
        assert c.cached_keys() == [("b", 0), ("b", 1)]
        assert ("b", 0) in c and ("a", 0) not in c
        assert read(c, a, "a", 0, 10) == data[:10]
        assert a.calls[0] == 2
        check_bound(c)


def test_recycle_consumed_keeps_a_sequential_scan_in_a_few_hot_buffers():
    data = rand_bytes(64 * 4096, seed=7)
    for recycle, expect_peak in ((True, 4096), (False, 64 * 4096)):
        src = FakeSource(data, 4096)
        with ChunkCache(1 << 20, readahead=0, recycle_consumed=recycle) as c:
            out = bytearray(2048)
            got = bytearray()
            for off in range(0, len(data), 2048):
                n = c.read_into(src, "k", off, memoryview(out))
                got += out[:n]
            assert bytes(got) == data
            assert c.stats()["peak_bytes_held"] == expect_peak
            # a chunk read only partly (random access) is not recycled first
            c.read_into(src, "k", 5 * 4096 + 10, memoryview(bytearray(100)))
            assert ("k", 5) in c


def test_recycle_consumed_stops_growing_at_the_working_set_under_random_reads():
    # Random partial reads never consume a chunk. With the page cache in front
    # (recycle_consumed) the pool stops at huge_buffers buffers and the LRU chunk's buffer
    # is reused; without it the cache grows to its bound (it is the only cache then).
    nseg = 64
    data = rand_bytes(nseg * 4096, seed=8)
    order = list(range(nseg))
    random.Random(3).shuffle(order)
    for recycle, expect_peak in ((True, ChunkCache.huge_buffers * 4096), (False, nseg * 4096)):
        src = FakeSource(data, 4096)
        with ChunkCache(1 << 20, readahead=0, recycle_consumed=recycle) as c:
            for i in order:
                assert read(c, src, "k", i * 4096 + 100, 1000) == data[i * 4096 + 100:i * 4096 + 1100]
            assert c.stats()["peak_bytes_held"] == expect_peak
            assert src.total_calls() == nseg
            check_bound(c)


def test_a_read_spanning_two_segments_decrypts_the_second_beside_the_first():
    data = rand_bytes(8 * 4096, seed=9)
    src = FakeSource(data, 4096, delay=0.2)
    who: dict[int, str] = {}
    inner = src.read_segment

    def read_segment(i, out):
        who[i] = threading.current_thread().name
        return inner(i, out)
    src.read_segment = read_segment
    with ChunkCache(1 << 20, readahead=2, recycle_consumed=True) as c:
        t0 = time.monotonic()
        assert read(c, src, "k", 5 * 4096 - 100, 200) == data[5 * 4096 - 100:5 * 4096 + 100]
        took = time.monotonic() - t0
        assert who[4] == threading.current_thread().name
        assert who[5].startswith("ctfs-readahead")
        assert src.calls == {4: 1, 5: 1}
        assert took < 0.35  # two 0.2 s decryptions at once, not one after the other
        assert c.stats()["readahead_split"] == 1


# ------------------------------------------------------------ read_pinned


def pinned(cache, src, key, off, n, **kw):
    """read_pinned with a consume that checks its views are pinned and returns their bytes."""
    seen = []

    def consume(views):
        with cache._lock:
            mine = [ch for ch in cache.table.map.values() if ch.key[0] == key
                    and ch.buf is not None and any(v.obj is ch.buf.mm for v in views)]
            assert len(mine) == len(views) and all(ch.pins > 0 for ch in mine)
        seen.append([bytes(v) for v in views])
        return "sent"

    r = cache.read_pinned(src, key, off, n, consume, **kw)
    return r, (seen[0] if seen else None)


def no_pins(cache):
    with cache._lock:
        return all(ch.pins == 0 for ch in cache.table.map.values())


def test_read_pinned_gives_the_exact_bytes_of_one_or_two_segments(data):
    src = FakeSource(data, PAGE)
    with ChunkCache(20 * PAGE, readahead=0) as c:
        assert pinned(c, src, "k", 100, 200) == ("sent", [data[100:300]])
        assert pinned(c, src, "k", PAGE - 10, PAGE) == \
            ("sent", [data[PAGE - 10:PAGE], data[PAGE:2 * PAGE - 10]])
        assert pinned(c, src, "k", 2 * PAGE, PAGE) == ("sent", [data[2 * PAGE:3 * PAGE]])
        # clipped at the end of the data, as read_into is
        assert pinned(c, src, "k", len(data) - 50, 1000) == ("sent", [data[-50:]])
        assert no_pins(c)
        assert all(v == 1 for v in src.calls.values())  # decrypted once, then cached


def test_read_pinned_declines_what_it_cannot_pin_safely(data):
    src = FakeSource(data, PAGE)
    with ChunkCache(20 * PAGE, readahead=0) as c:
        called = []
        for off, n in ((0, 2 * PAGE + 1),          # three segments, more than allowed
                       (len(data), 10), (0, 0)):    # nothing to send
            assert c.read_pinned(src, "k", off, n, called.append, max_segments=2) is None
        assert called == [] and src.calls == {}
        assert pinned(c, src, "k", 0, 3 * PAGE, max_segments=3)[1] == \
            [data[:PAGE], data[PAGE:2 * PAGE], data[2 * PAGE:3 * PAGE]]
        with pytest.raises(ValueError):
            c.read_pinned(src, "k", -1, 10, called.append)


def test_read_pinned_never_waits_for_room_while_holding_a_pin(data):
    # Room for one chunk only: the second segment of the range would have to wait for the
    # first (pinned by this very call) to go. It declines instead of deadlocking, and a
    # read_into (one pin at a time) still serves the range.
    src = FakeSource(data, PAGE)
    with ChunkCache(PAGE, readahead=0) as c:
        called = []
        assert c.read_pinned(src, "k", PAGE - 10, 20, called.append) is None
        assert called == [] and no_pins(c)
        check_bound(c)
        assert read(c, src, "k", PAGE - 10, 20) == data[PAGE - 10:PAGE + 10]


def _fill_once(c, src, off, n, rest):
    """A non-sequential read_pinned of [off, off+n) whose chunk goes to REST on the filler."""
    done = threading.Event()

    def wrapped(start, views):
        try:
            return rest(start, views)
        finally:
            done.set()
    assert c.read_pinned(src, "k", off, n, lambda views: 1, rest=wrapped) == 1
    assert done.wait(10), "the filler never handed the chunk on"


def test_rest_gets_the_whole_segment_with_a_page_of_each_cached_neighbour():
    data = rand_bytes(4 * 3 * PAGE, seed=5)
    src = FakeSource(data, 3 * PAGE)
    with ChunkCache(40 * PAGE, readahead=0) as c:
        for i in (0, 2):
            read(c, src, "k", i * 3 * PAGE, 1)
        got = []
        _fill_once(c, src, 3 * PAGE + 10, 100, lambda start, views: got.append((start, b"".join(views))))
        # segment 1 = [3P, 6P): with the last page of segment 0 and the first of segment 2
        assert got == [(2 * PAGE, data[2 * PAGE:7 * PAGE])]
        # handed on once: another partial read of it is not queued again
        assert c.read_pinned(src, "k", 4 * PAGE, 10, lambda views: 1, rest=lambda *a: got.append(a)) == 1
        time.sleep(0.2)
        assert len(got) == 1 and no_pins(c)


def test_only_a_segment_that_reached_the_page_cache_is_spared_readahead():
    # rest's answer says whether the bytes went to the page cache (a store can be skipped:
    # node id not known yet, mount locked); only then does readahead skip the segment
    data = rand_bytes(6 * PAGE, seed=11)
    src = FakeSource(data, PAGE)
    with ChunkCache(20 * PAGE, readahead=0, recycle_consumed=True) as c:
        _fill_once(c, src, 10, 100, lambda start, views: False)
        _fill_once(c, src, 2 * PAGE + 10, 100, lambda start, views: True)
        deadline = time.monotonic() + 5  # the filler notes it right after rest returns
        while ("k", 2) not in c._fed and time.monotonic() < deadline:
            time.sleep(0.01)
        with c._lock:
            assert not c._known(("k", 4)) and c._known(("k", 0))  # 0: still cached
            c.table.map.clear()                                   # (as if evicted)
            assert not c._known(("k", 0)) and c._known(("k", 2))


def test_a_fill_that_waits_on_a_read_leaves_that_read_room_within_the_bound():
    # The kernel may make a store wait for a page that a read in flight must fill first.
    # Here REST waits for a read of another segment that needs room in a cache of two
    # segments: the fill may pin its own segment only (not its cached neighbour), so the
    # read evicts the neighbour and finishes; the bound holds throughout.
    data = rand_bytes(8 * PAGE, seed=6)
    src = FakeSource(data, PAGE)
    with ChunkCache(2 * PAGE, readahead=0) as c:
        read(c, src, "k", PAGE, 1)  # the neighbour, cached
        got, finished = [], []

        def rest(start, views):
            t = threading.Thread(target=lambda: finished.append(read(c, src, "k", 5 * PAGE, 100)))
            t.start()
            t.join(5)
            got.append((start, b"".join(views)))

        _fill_once(c, src, 10, 100, rest)
        assert finished == [data[5 * PAGE:5 * PAGE + 100]]
        assert got == [(0, data[:PAGE])]  # no neighbour page: pinning it would leave no room
        check_bound(c)
        assert no_pins(c)


def test_a_fill_skips_a_segment_evicted_before_the_filler_got_to_it():
    data = rand_bytes(8 * PAGE, seed=7)
    src = FakeSource(data, PAGE)
    with ChunkCache(2 * PAGE, readahead=0) as c:
        gate, held, got = threading.Event(), threading.Event(), []

        def hold(start, views):  # holds the filler
            held.set()
            gate.wait(5)
        c.read_pinned(src, "k", 0, 10, lambda views: 1, rest=hold)
        assert held.wait(5)
        c.read_pinned(src, "k", 2 * PAGE + 1, 10, lambda views: 1, rest=lambda s, v: got.append(s))
        for i in (4, 5, 6):  # evict segment 2 while its fill waits in the queue
            read(c, src, "k", i * PAGE, 1)
        assert ("k", 2) not in c
        gate.set()
        time.sleep(0.2)
        assert got == [] and no_pins(c)
        check_bound(c)


def test_readahead_skips_segments_the_page_cache_already_has():
    # page-cache mode (recycle_consumed): a segment whose every byte was served is in the
    # kernel's page cache, and a reader reaching it will not ask; readahead does not
    # decrypt it again once evicted. Without a page cache in front it does.
    data = rand_bytes(12 * PAGE, seed=9)
    for recycle, again in ((True, 0), (False, 1)):
        src = FakeSource(data, PAGE)
        with ChunkCache(3 * PAGE, readahead=2, recycle_consumed=recycle) as c:
            read(c, src, "k", 6 * PAGE, 3 * PAGE)  # segments 6-8, whole
            for i in (0, 10, 11):                  # evict them (parts of other segments)
                read(c, src, "k", i * PAGE, 100)
            assert not any(("k", i) in c for i in (6, 7, 8))
            for i in range(3, 6):                  # a sequential reader coming up to 6
                read(c, src, "k", i * PAGE, PAGE)
            deadline = time.monotonic() + 5
            while again and src.calls.get(7, 0) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            assert [src.calls.get(i, 0) for i in (6, 7)] == [1 + again] * 2
            c.wipe()
            with c._lock:
                assert not c._fed


def test_a_read_continuing_one_other_read_still_hands_its_chunk_on():
    # A fault in a mapping asks for a window around the page: two requests in a row. That
    # is not a sequential reader yet, so the second read's chunk goes to the page cache too.
    data = rand_bytes(8 * 3 * PAGE, seed=10)
    src = FakeSource(data, 3 * PAGE)
    with ChunkCache(40 * PAGE, readahead=3, recycle_consumed=True) as c:
        got = []
        lock, done = threading.Lock(), threading.Semaphore(0)

        def rest(start, views):
            with lock:
                got.append(start)
            done.release()
        for off in (3 * PAGE - 2 * PAGE, 3 * PAGE):   # [P, 3P) then [3P, 5P)
            assert c.read_pinned(src, "k", off, 2 * PAGE, lambda views: 1, rest=rest) == 1
        assert done.acquire(timeout=5) and done.acquire(timeout=5)
        assert sorted(got) == [0, 3 * PAGE - PAGE]  # segment 0; segment 1 with a page of 0


def test_read_pinned_chunks_outlive_a_wipe_until_consume_returns(data):
    src = FakeSource(data, PAGE)
    c = ChunkCache(20 * PAGE, readahead=0)
    got = []

    def consume(views):
        assert c.wipe(timeout=0.05) is False  # busy: our pins keep the chunks
        got.append([bytes(v) for v in views])  # not zeroed under us
        return True

    assert c.read_pinned(src, "k", PAGE - 10, 20, consume) is True
    assert got == [[data[PAGE - 10:PAGE], data[PAGE:PAGE + 10]]]
    assert c.wipe(timeout=1) is True  # dropped and zeroed once released
    assert c.cached_keys() == []
    assert all(not any(b.mv[:PAGE]) for b in live_buffers(c))
    c.close()


def test_read_pinned_errors_propagate_and_release_everything(data):
    src = FakeSource(data, PAGE, corrupt={1})
    with ChunkCache(20 * PAGE, readahead=0) as c:
        called = []
        with pytest.raises(IntegrityError):
            c.read_pinned(src, "k", PAGE - 10, 20, called.append)
        assert called == [] and no_pins(c)
        assert ("k", 1) not in c  # a failed chunk is never cached

        def boom(views):
            raise OSError(5, "consumer failed")
        with pytest.raises(OSError, match="consumer failed"):
            c.read_pinned(src, "k", 10, 20, boom)
        assert no_pins(c)
        assert read(c, src, "k", 0, 100) == data[:100]


def test_read_pinned_counts_as_sequential_access_for_readahead():
    data = rand_bytes(16 * PAGE, seed=3)
    src = FakeSource(data, PAGE)
    with ChunkCache(16 * PAGE, readahead=2) as c:
        for i in range(4):
            assert pinned(c, src, "k", i * PAGE, PAGE)[1] == [data[i * PAGE:(i + 1) * PAGE]]
        deadline = time.monotonic() + 5
        while ("k", 5) not in c and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ("k", 5) in c  # decrypted ahead of the reader


def test_only_the_first_pooled_buffers_are_huge_pages():
    # 2 MiB chunks: huge-page buffers start on a 2 MiB boundary; once huge_buffers of them
    # live, a cache filling up (random reads) gets 4 KiB pages, and a slot frees on unmap
    seg = 2 << 20
    src = FakeSource(b"\x5a" * (6 * seg), seg)
    with ChunkCache(6 * seg, readahead=0) as c:
        c.pool.huge_buffers = 2
        for i in range(4):
            assert read(c, src, "k", i * seg, 10) == b"\x5a" * 10
        bufs = live_buffers(c)
        assert sorted(b.huge for b in bufs) == [False, False, True, True]
        assert all(b.addr % seg == 0 for b in bufs if b.huge)
        c.wipe(release=True)
        assert live_buffers(c) == [] and c.pool.huge_live == 0
        assert read(c, src, "k", 0, 10) == b"\x5a" * 10
        assert [b.huge for b in live_buffers(c)] == [True]


def test_reserve_maps_buffers_that_the_first_reads_use():
    data = rand_bytes(8 * PAGE, seed=9)
    src = FakeSource(data, PAGE)
    with ChunkCache(5 * PAGE, readahead=0) as c:
        assert c.reserve(PAGE, 3) == 3
        assert c.stats()["bytes_held"] == 3 * PAGE
        ready = {id(b) for b in live_buffers(c)}
        assert all(b.locked == c.pool.mlock_ok for b in live_buffers(c))
        for i in range(3):
            assert read(c, src, "k", i * PAGE, PAGE) == data[i * PAGE:(i + 1) * PAGE]
        assert {id(b) for b in live_buffers(c)} == ready  # no buffer mapped on the read path
        assert c.reserve(PAGE, 10) == 2  # never past the bound
        check_bound(c)


def test_read_pinned_does_not_wait_on_a_load_that_waits_for_room(data):
    # A chunk-1 placeholder whose loader has no buffer yet (it is waiting for room, which
    # chunk 0 may be holding): read_pinned, pinning chunk 0, must not wait on it.
    src = FakeSource(data, PAGE)
    with ChunkCache(2 * PAGE, readahead=0) as c:
        assert read(c, src, "k", 0, 10) == data[:10]
        placeholder = table_mod.Chunk(("k", 1), 1, PAGE)
        with c._lock:
            c.table.map[("k", 1)] = placeholder  # LOADING, loader's pin only, no buffer
        called, result = [], []
        t = threading.Thread(target=lambda: result.append(
            c.read_pinned(src, "k", PAGE - 10, 20, called.append)), daemon=True)
        t.start()
        t.join(5)
        alive = t.is_alive()
        placeholder.state = table_mod.FAILED  # let a stuck reader go before asserting
        placeholder.event.set()
        assert not alive and result == [None] and called == []
        assert placeholder.pins == 1
        with c._lock:
            assert c.table.map[("k", 0)].pins == 0


def test_read_pinned_waits_on_a_readahead_load_without_a_buffer_yet(data):
    # A readahead loader has its room before its chunk is in the table (it never waits for
    # room), so a read that pins chunk 0 can wait for it: the reply still goes out pinned.
    src = FakeSource(data, PAGE)
    with ChunkCache(4 * PAGE, readahead=0) as c:
        assert read(c, src, "k", 0, 10) == data[:10]
        placeholder = table_mod.Chunk(("k", 1), 1, PAGE)
        placeholder.from_ra = placeholder.ra_pending = True
        with c._lock:
            assert c.pool.claim_locked(PAGE)
            c.table.map[("k", 1)] = placeholder  # LOADING, loader's pin only, no buffer yet
        result = []
        t = threading.Thread(target=lambda: result.append(
            c.read_pinned(src, "k", PAGE - 10, 20, lambda views: b"".join(bytes(v) for v in views))),
            daemon=True)
        t.start()
        time.sleep(0.2)
        assert t.is_alive() and result == []  # waiting for the readahead load
        buf = c.pool.map(PAGE, pooled=True)   # the loader maps its buffer and decrypts
        buf.mv[:PAGE] = data[PAGE:2 * PAGE]
        buf.used = PAGE
        with c._lock:
            placeholder.buf, placeholder.state = buf, table_mod.READY
            placeholder.event.set()
        c._unpin(placeholder)
        t.join(5)
        assert result == [data[PAGE - 10:PAGE + 10]]
        with c._lock:
            assert [ch.pins for ch in c.table.map.values()] == [0, 0]


def test_reserve_tops_up_instead_of_adding_each_time():
    # a mount reserves again after every unlock; a kept (wiped) pool must not grow
    with ChunkCache(10 * PAGE, readahead=0) as c:
        assert c.reserve(PAGE, 3) == 3
        c.wipe()
        assert c.reserve(PAGE, 3) == 0
        assert c.stats()["bytes_held"] == 3 * PAGE


# ------------------------------------------------------------- out of core dumps


def smaps_flags(addr: int) -> set[str]:
    """The VmFlags of this process's mapping that holds ADDR."""
    start = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                start = lo if lo <= addr < hi else None
            elif head == "VmFlags:" and start is not None:
                return set(line.split()[1:])
    raise LookupError(f"{addr:#x} is not mapped")


def test_plaintext_buffers_are_excluded_from_core_dumps(data):
    with ChunkCache(4 * PAGE, readahead=0) as c:
        src = FakeSource(data, PAGE)
        assert read(c, src, "k", 0, 3 * PAGE) == data[:3 * PAGE]
        bufs = live_buffers(c)
        assert bufs and all("dd" in smaps_flags(b.addr) for b in bufs)  # "dd": MADV_DONTDUMP
        assert all("dd" in smaps_flags(b.addr + b.cap - 1) for b in bufs)
        assert c.stats()["excluded_from_core_dumps"] is True


def test_dontdump_failure_is_warned_once_and_shown(data, monkeypatch, caplog):
    monkeypatch.setattr(buffers_mod, "dontdump", lambda mm: "madvise(MADV_DONTDUMP): Invalid argument")
    with caplog.at_level(logging.WARNING, logger="ctfs.cache"):
        with ChunkCache(4 * PAGE, readahead=0) as c:
            src = FakeSource(data, PAGE)
            assert read(c, src, "k", 0, 4 * PAGE) == data[:4 * PAGE]  # still served
            assert len(live_buffers(c)) >= 2
            assert c.stats()["excluded_from_core_dumps"] is False
    assert [m for m in caplog.messages if "core dumps" in m] == [
        "could not exclude plaintext cache buffers from core dumps (madvise(MADV_DONTDUMP): Invalid "
        "argument); the daemon itself stays non-dumpable"]
