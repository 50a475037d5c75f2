"""``ctfs prefetch``: fill a host's cache dir with a model's ciphertext before it serves.

Needs no key: the chunk boundaries are in each file's header
(:func:`ctfs.format.reader.chunk_ranges`), and the cache holds ciphertext only. Chunks
already cached are skipped; the rest are fetched in GETs of up to ``request_size`` bytes,
``concurrency`` at a time, through the same pinned, retried client as a mount.
"""
from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable

from ..format.header import read_header_blob
from ..format.modeldir import TENSOR_SUFFIXES
from ..format.reader import chunk_ranges
from .s3 import S3Store, StoreError


def plan(store: S3Store) -> list[tuple[object, list[list[tuple[int, int]]]]]:
    """Per tensor file: (blob, groups of contiguous chunk ranges still to fetch)."""
    out = []
    limit = store.opts.request_size
    for e in store.walk():
        if e.kind != "file" or not e.path.endswith(TENSOR_SUFFIXES):
            continue
        blob = store.open(e.path)
        try:
            ranges = chunk_ranges(read_header_blob(blob, named=False))
        except Exception as err:  # noqa: BLE001 - name the object
            blob.close()
            raise StoreError(f"{blob.name}: cannot read its header: {err}") from None
        todo = [(o, n) for o, n in ranges if (blob.tag, o, n) not in store.cache]
        groups: list[list[tuple[int, int]]] = []
        for off, n in todo:
            g = groups[-1] if groups else None
            if g and g[-1][0] + g[-1][1] == off and off + n - g[0][0] <= limit:
                g.append((off, n))
            else:
                groups.append([(off, n)])
        out.append((blob, groups))
    return out


def prefetch(store: S3Store, progress: Callable[[int], None] | None = None,
             on_total: Callable[[int], None] | None = None) -> dict:
    """Fetch every encrypted chunk not yet in ``store.cache``; returns counts."""
    if store.cache is None:
        raise StoreError(f"{store.url}: prefetch needs a cache dir (--cache-dir)")
    work = plan(store)
    total = sum(n for _, groups in work for g in groups for _, n in g)
    if on_total:
        on_total(total)
    files, done = len(work), 0

    def fetch(blob, group):
        start, end = group[0][0], group[-1][0] + group[-1][1]
        data = blob.get(start, end)
        view = memoryview(data)
        for off, n in group:
            store.cache.put(blob.tag, off, view[off - start:off - start + n])
        return end - start

    jobs = [(blob, g) for blob, groups in work for g in groups]
    with ThreadPoolExecutor(store.opts.concurrency, thread_name_prefix="ctfs-prefetch") as ex:
        running = set()
        it = iter(jobs)
        try:
            while True:
                while len(running) < 2 * store.opts.concurrency:
                    job = next(it, None)
                    if job is None:
                        break
                    running.add(ex.submit(fetch, *job))
                if not running:
                    break
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    n = f.result()
                    done += n
                    if progress:
                        progress(n)
        finally:
            for f in running:
                f.cancel()
            for blob, _ in work:
                blob.close()
    return {"files": files, "bytes_fetched": done, "cache_dir": store.cache.stats()}
