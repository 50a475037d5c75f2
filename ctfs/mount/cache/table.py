"""Which decrypted chunks the cache holds, in LRU order, and what it counts about them.

A :class:`Chunk` is one segment of one source: LOADING while its single loader decrypts
it, then READY, or FAILED (never cached), or DROPPED (evicted, wiped). It is pinned
(``pins > 0``) while anybody copies out of it or waits for it; a pinned or loading chunk is
never evicted. :class:`ChunkTable` keeps them in least-recently-used order and picks the
victims. Its methods expect the cache's lock held.
"""
from __future__ import annotations

import collections
import threading
from typing import Hashable

from .buffers import Buffer

LOADING, READY, FAILED, DROPPED = range(4)


class Chunk:
    __slots__ = (
        "key", "index", "buf", "size", "state", "pins", "event", "error",
        "from_ra", "ra_pending", "doomed", "transient", "consumed", "served", "stored",
    )

    def __init__(self, key: tuple, index: int, size: int) -> None:
        self.key = key
        self.index = index
        self.size = size
        self.buf: Buffer | None = None
        self.state = LOADING
        self.pins = 1  # the loader's pin
        self.event = threading.Event()
        self.error: BaseException | None = None
        self.from_ra = False
        self.consumed = False
        self.served = 0  # bytes copied out so far (consumed once it covers the chunk)
        self.stored = False  # handed whole to the kernel's page cache (read_pinned's rest)
        self.ra_pending = False
        self.doomed = False
        self.transient = False


class ChunkTable:
    """Chunks by ``(source_key, index)``, least recently used first, with the cache's hit,
    miss and eviction counters."""

    def __init__(self) -> None:
        self.map: collections.OrderedDict[tuple, Chunk] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: tuple) -> Chunk | None:
        return self.map.get(key)

    def __contains__(self, key: tuple) -> bool:
        return key in self.map

    def add(self, ch: Chunk) -> None:
        self.map[ch.key] = ch

    def remove(self, ch: Chunk) -> None:
        """Forget CH if it is still the chunk under its key."""
        if self.map.get(ch.key) is ch:
            del self.map[ch.key]

    def touch(self, ch: Chunk) -> None:
        """CH was used: most recently used now."""
        if self.map.get(ch.key) is ch:
            self.map.move_to_end(ch.key)

    def served(self, ch: Chunk, n: int) -> None:
        """Count bytes copied out; a chunk whose every byte has been served (as many bytes
        as it holds) goes to the eviction end."""
        ch.served += n
        if not ch.consumed and ch.served >= ch.size and ch.state == READY \
                and self.map.get(ch.key) is ch:
            ch.consumed = True
            self.map.move_to_end(ch.key, last=False)

    def evict(self, ch: Chunk) -> Buffer:
        """Take an idle READY chunk out of the table; its buffer is the caller's now."""
        del self.map[ch.key]
        self.evictions += 1
        buf, ch.buf, ch.state = ch.buf, None, DROPPED
        assert buf is not None
        return buf

    def consumed_front(self, cap: int) -> Chunk | None:
        """The least recently used chunk if it was served to its end, is idle and holds a
        buffer of ``cap`` bytes (recycled before the pool grows)."""
        if not self.map:
            return None
        front = next(iter(self.map.values()))
        if front.consumed and front.state == READY and front.pins == 0 \
                and front.buf is not None and front.buf.cap == cap:
            return front
        return None

    def victim(self, for_readahead: bool) -> Chunk | None:
        """The least recently used idle READY chunk (for readahead: not one read ahead and
        not yet consumed)."""
        for ch in self.map.values():
            if ch.state == READY and ch.pins == 0 and not (for_readahead and ch.ra_pending):
                return ch
        return None

    def of_source(self, source_key: Hashable) -> list[Chunk]:
        return [self.map.pop(k) for k in [k for k in self.map if k[0] == source_key]]

    def clear(self) -> list[Chunk]:
        chunks = list(self.map.values())
        self.map.clear()
        return chunks

    def ready_keys(self) -> list[tuple]:
        return [k for k, ch in self.map.items() if ch.state == READY]

    def stats(self) -> dict:
        cached = nready = ninflight = 0
        for ch in self.map.values():
            if ch.state == READY:
                cached += ch.size
                nready += 1
            elif ch.state == LOADING:
                ninflight += 1
        req = self.hits + self.misses
        return {"bytes_cached": cached, "chunks": nready, "inflight": ninflight, "hits": self.hits,
                "misses": self.misses, "hit_ratio": (self.hits / req) if req else 0.0,
                "evictions": self.evictions}
