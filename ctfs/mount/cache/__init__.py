"""The plaintext chunk cache of the FUSE read path, by concern:

* :mod:`.buffers` — plaintext buffers (mlocked, out of core dumps, some in huge pages) and
  the byte bound;
* :mod:`.table` — the chunks held, in LRU order, and the eviction and hit/miss accounting;
* :mod:`.readahead` — which segments to decrypt ahead of a sequential reader;
* :mod:`.chunkcache` — single-flight loading and the API (:class:`ChunkCache`).
"""
from .chunkcache import ChunkCache, SegmentSource

__all__ = ["ChunkCache", "SegmentSource"]
