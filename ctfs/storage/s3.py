"""An S3-compatible bucket prefix as a :class:`ctfs.storage.Store` (``s3://BUCKET/PREFIX``).

**Client.** `obstore` (Rust ``object_store``: it releases the GIL for the whole request,
so several GETs and the decryption run on all cores; ``benchmarks/README.md`` gives the
measurement against boto3). Credentials come from the standard AWS chain through botocore
(environment, ``AWS_PROFILE`` and the shared files, web identity, container and instance
roles), the region from it or ``AWS_REGION``, the endpoint from ``--s3-endpoint``, or
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, and a CA bundle from ``AWS_CA_BUNDLE``.

**Pinned.** The mount lists the prefix once; each object's ETag (and version id, where the
bucket is versioned) is pinned then, and every later GET is conditional on it
(``If-Match``). An object overwritten after the mount fails with :class:`ObjectChanged`
(EIO for that file, a log line naming it); it never yields a mix of old and new bytes.

**Retried.** Every GET is retried with exponential backoff and full jitter on 5xx, 429 /
SlowDown, timeouts, resets and short bodies, until ``timeout`` seconds have passed since
the first try; then it fails with EIO and a log line. 4xx answers fail at once.

**Read ahead.** A sequential reader's next chunks are fetched on I/O threads, coalesced
into GETs of up to ``request_size`` bytes, as far ahead as the readahead window (bytes):
it starts at two requests and doubles whenever the reader had to wait for a fetch, up to
``readahead``. A random reader fetches only the chunk it touches.

**Cache dir.** With ``cache_dir``, fetched chunks (ciphertext) are kept on local disk
(:mod:`ctfs.storage.diskcache`) and read from there first.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timezone

from ..errors import CtfsError
from .base import Entry
from .direct import shared_pool
from .diskcache import DiskCache, object_tag

log = logging.getLogger("ctfs.s3")

SCHEME = "s3://"


class StoreError(CtfsError):
    """The object store cannot serve the prefix (the message names the URL and the cause)."""


class ObjectChanged(OSError):
    """An object's ETag is no longer the one pinned at mount."""


def is_url(src) -> bool:
    return isinstance(src, str) and src.startswith(SCHEME)


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ("bucket", "some/prefix")."""
    if not is_url(url):
        raise ValueError(f"{url}: not an s3:// URL")
    bucket, _, prefix = url[len(SCHEME):].partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
        raise StoreError(f"{url}: {bucket!r} is not a valid bucket name (s3://BUCKET/PREFIX)")
    return bucket, prefix.strip("/")


@dataclass
class S3Options:
    endpoint: str | None = None          # None: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS
    path_style: bool | None = None       # None: path style when an endpoint is given
    region: str | None = None            # None: the AWS chain's, else us-east-1
    timeout: float = 120.0               # give up on a GET after this long (then EIO)
    request_timeout: float = 30.0        # one HTTP request
    concurrency: int = 16                # most GETs in flight, whole process (Flow adapts below it)
    request_size: int = 8 << 20          # coalesced readahead GETs up to this size
    readahead: int = 128 << 20           # largest readahead window per file
    cache_dir: str | None = None
    cache_dir_size: int = 50 << 30
    # credentials for tests and tools that have them at hand; None: the AWS chain
    credentials: dict | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, s3_endpoint=None, s3_path_style=None, s3_region=None, s3_timeout=120.0,
                      s3_concurrency=16, s3_readahead=128 << 20, cache_dir=None,
                      cache_dir_size=50 << 30) -> "S3Options":
        """From the settings as ``ctfs mount`` and the config files name them (``SETTINGS``)."""
        return cls(endpoint=s3_endpoint, path_style=s3_path_style, region=s3_region,
                   timeout=s3_timeout, concurrency=s3_concurrency, readahead=s3_readahead,
                   cache_dir=cache_dir, cache_dir_size=cache_dir_size)


#: the settings of an s3:// source, as the command line and the config files name them
SETTINGS = ("s3_endpoint", "s3_path_style", "s3_region", "s3_timeout", "s3_concurrency",
            "s3_readahead", "cache_dir", "cache_dir_size")


class Flow:
    """How many GETs may be in flight at once: found by measurement, not configured.

    On a slow link (latency, a cap per connection) more requests in flight bring more
    bytes; on a fast one whose CPUs the server shares, more only add context switches
    (measured: loopback 0.72 GB/s with 4 in flight, 0.63 with 8; through a 20 ms, 100 MB/s
    per connection link 0.16 with 4, 0.26 with 8, 0.28 with 16). So the limit climbs a hill:
    every epoch (enough completed requests, at least ``EPOCH_S`` seconds) it compares the
    bytes per second with the last epoch's, keeps going the same way (one step up or down)
    while that pays by 5 % or more, turns round when it costs, and steps down when it makes
    no difference; a step is a third of the limit. It stays within [``lo``, ``hi``]."""

    EPOCH_S = 0.25

    def __init__(self, hi: int, lo: int = 2, start: int = 6):
        self.lo, self.hi = max(1, min(lo, hi)), max(1, hi)
        self.limit = min(max(start, self.lo), self.hi)
        self.active = 0
        self._cond = threading.Condition()
        self._dir = 1
        self._prev: float | None = None
        self._t0 = time.monotonic()
        self._bytes = self._done = 0

    def acquire(self) -> None:
        with self._cond:
            while self.active >= self.limit:
                self._cond.wait()
            self.active += 1

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.active -= 1
            self._bytes += nbytes
            self._done += 1
            now = time.monotonic()
            if self._done >= self.limit and now - self._t0 >= self.EPOCH_S:
                rate = self._bytes / (now - self._t0)
                if self._prev is not None:
                    if rate < self._prev * 0.95:
                        self._dir = -self._dir
                    elif rate < self._prev * 1.05:
                        self._dir = -1
                step = max(1, self.limit // 3)  # a few epochs from 4 to 16 and back
                self.limit = min(self.hi, max(self.lo, self.limit + self._dir * step))
                self._prev, self._t0, self._bytes, self._done = rate, now, 0, 0
            self._cond.notify_all()


class Stats:
    """Counters of one store (``ctfs status``, metrics)."""

    WINDOW = 5.0  # seconds of throughput shown

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = self.retries = self.failures = self.changed = 0
        self.bytes_fetched = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def fetched(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.bytes_fetched += n
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - self.WINDOW:
                self._recent.popleft()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def throughput(self) -> float:
        now = time.monotonic()
        with self._lock:
            return sum(n for t, n in self._recent if t >= now - self.WINDOW) / self.WINDOW

    def as_dict(self) -> dict:
        with self._lock:
            d = {"requests": self.requests, "retries": self.retries, "failures": self.failures,
                 "changed": self.changed, "bytes_fetched": self.bytes_fetched}
        d["throughput_bps"] = self.throughput()
        return d


_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([^<]+)</Code>")
_FINAL_CAUSES = {401: "unauthenticated (401): check the credentials (AWS_ACCESS_KEY_ID, "
                      "AWS_PROFILE, ...)",
                 403: "access denied (403): check the credentials and the bucket policy",
                 404: "not found (404)"}


def _describe(e: BaseException) -> tuple[int | None, str]:
    """(HTTP status or None, a short cause) of an obstore error."""
    text = str(e)
    m, c = _STATUS.search(text), _CODE.search(text)
    status = int(m.group(1)) if m else None
    if isinstance(e, FileNotFoundError) and status is None:
        status = 404
    code = c.group(1) if c else None
    if status in _FINAL_CAUSES:
        cause = _FINAL_CAUSES[status]
        if code in ("NoSuchBucket",):
            cause = "no such bucket (404)"
        elif code and code not in ("AccessDenied",):
            cause = f"{cause} [{code}]"
        return status, cause
    if status is not None:
        return status, f"HTTP {status}" + (f" {code}" if code else "")
    first = text.splitlines()[0] if text else type(e).__name__
    return None, first[:200]


def _retryable(e: BaseException, status: int | None) -> bool:
    from obstore.exceptions import PreconditionError
    if isinstance(e, (PreconditionError, ObjectChanged)):
        return False
    if status is None:
        return True  # connection refused/reset, timeout, truncated body
    return status >= 500 or status in (408, 429)


def _first(*names: str) -> str | None:
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    return None


class Client:
    """One bucket: listing, HEAD and conditional ranged GETs, retried as the module says."""

    def __init__(self, bucket: str, opts: S3Options, url: str):
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
        from obstore.store import S3Store
        self.bucket, self.opts, self.url = bucket, opts, url
        self.stats = Stats()
        self.flow = Flow(opts.concurrency)
        # botocore says where it found credentials at INFO, on every start: not our log's business
        logging.getLogger("botocore").setLevel(max(logging.WARNING, logging.getLogger("botocore").level))
        creds = opts.credentials or {}
        session = boto3.Session(aws_access_key_id=creds.get("key_id"),
                                aws_secret_access_key=creds.get("secret"),
                                aws_session_token=creds.get("token"))
        region = opts.region or session.region_name or _first("AWS_REGION", "AWS_DEFAULT_REGION") \
            or "us-east-1"
        endpoint = opts.endpoint or _first("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        path_style = opts.path_style if opts.path_style is not None else bool(endpoint)
        client = {"timeout": f"{opts.request_timeout:g}s", "connect_timeout": "10s",
                  "pool_max_idle_per_host": str(max(8, opts.concurrency))}
        if endpoint and endpoint.startswith("http://"):
            client["allow_http"] = True
        ca = os.environ.get("AWS_CA_BUNDLE")
        if ca and endpoint and endpoint.startswith("https://"):
            client["root_certificate"] = ca
        if session.get_credentials() is None:
            raise StoreError(f"{url}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                             f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a role; under systemd pass "
                             f"a shared credentials file with LoadCredential=)")
        kw = dict(region=region, virtual_hosted_style_request=not path_style,
                  client_options=client, retry_config={"max_retries": 0},
                  credential_provider=Boto3CredentialProvider(session))
        if endpoint:
            kw["endpoint"] = endpoint
        try:
            self.store = S3Store(bucket, **kw)
        except Exception as e:  # noqa: BLE001 - obstore's configuration errors
            raise StoreError(f"{url}: cannot configure the S3 client: {e}") from None

    # --- the retry loop ----------------------------------------------------------------
    def call(self, what: str, fn, *, deadline: float | None = None):
        """fn() retried as the module says; OSError(EIO) (or ObjectChanged) when it gives up."""
        from obstore.exceptions import PreconditionError
        start = time.monotonic()
        deadline = deadline if deadline is not None else start + self.opts.timeout
        delay, tries = 0.1, 0
        while True:
            tries += 1
            self.stats.add("requests")
            try:
                return fn()
            except PreconditionError:
                self.stats.add("changed")
                log.error("%s: the object changed since it was mounted (ETag no longer the pinned "
                          "one); returning EIO for this file (remount to serve the new one)", what)
                raise ObjectChanged(errno.EIO, f"{what}: the object changed since it was mounted "
                                               f"(its ETag is no longer the pinned one)") from None
            except ObjectChanged:
                raise
            except Exception as e:  # noqa: BLE001 - obstore raises many kinds
                status, cause = _describe(e)
                left = deadline - time.monotonic()
                if not _retryable(e, status) or left <= 0:
                    self.stats.add("failures")
                    err = OSError(errno.EIO, f"{what}: {cause}" + (
                        f" (gave up after {tries} tries in {time.monotonic() - start:.1f}s)"
                        if tries > 1 else ""))
                    err.status = status
                    log.error("%s; returning EIO", err.strerror)
                    raise err from None
                self.stats.add("retries")
                pause = min(left, random.uniform(0, delay))  # full jitter
                log.debug("%s: %s; retry %d in %.2fs", what, cause, tries, pause)
                time.sleep(pause)
                delay = min(delay * 2, 5.0)

    def list(self, prefix: str) -> list[dict]:
        import obstore

        def run():
            out = []
            for batch in obstore.list(self.store, prefix=(prefix + "/") if prefix else None):
                out.extend(batch)
            return out
        return self.call(f"{self.url}: list", run, deadline=time.monotonic() + min(self.opts.timeout, 60))

    def head(self, key: str, what: str) -> dict:
        import obstore
        return self.call(f"{what}: HEAD", lambda: obstore.head(self.store, key),
                         deadline=time.monotonic() + min(self.opts.timeout, 60))

    def get(self, key: str, start: int, end: int, etag: str, version: str | None, what: str):
        """Bytes [start, end) of KEY at ETAG, in a new bytearray."""
        out = bytearray(end - start)
        self.get_into(key, start, [memoryview(out)], etag, version, what)
        return out

    def get_into(self, key: str, start: int, targets: list, etag: str, version: str | None,
                 what: str) -> None:
        """Fill TARGETS (buffers, one after another) with the bytes of KEY at ETAG from START,
        exactly. A body cut short is resumed where it broke (the next try asks for the rest
        only), so a flaky link still makes progress."""
        import obstore
        n = sum(len(t) for t in targets)
        end = start + n
        got = 0

        def run():
            opts = {"range": (start + got, end), "if_match": etag}
            if version:
                opts["version"] = version
            self.flow.acquire()
            before = got
            try:
                fill(obstore.get(self.store, key, options=opts))
            finally:
                self.flow.release(got - before)

        def fill(r):
            nonlocal got
            # where byte `got` goes: target i at position `at`
            i, at = 0, got
            while at >= len(targets[i]):
                at -= len(targets[i])
                i += 1
            for piece in r.stream(min_chunk_size=256 << 10):
                src, k = memoryview(piece), len(piece)
                if got + k > n:
                    raise ConnectionError("the server sent more than the range")
                done = 0
                while done < k:
                    t = targets[i]
                    m = min(k - done, len(t) - at)
                    t[at:at + m] = src[done:done + m]
                    done += m
                    at += m
                    if at == len(t) and i + 1 < len(targets):
                        i, at = i + 1, 0
                got += k
            if got != n:
                raise ConnectionError(f"short body: {got} of {n} bytes")
        self.call(f"{what}: GET bytes={start}-{end - 1}", run)
        self.stats.fetched(n)


_io_pool: ThreadPoolExecutor | None = None
_io_lock = threading.Lock()


def _io_threads(n: int) -> ThreadPoolExecutor:
    global _io_pool
    with _io_lock:
        if _io_pool is None:
            _io_pool = ThreadPoolExecutor(n, thread_name_prefix="ctfs-s3")
        return _io_pool


class S3Store:
    """The objects under ``s3://BUCKET/PREFIX``, listed once and pinned (see the module)."""

    def __init__(self, url: str, opts: S3Options | None = None):
        self.opts = opts or S3Options()
        self.bucket, self.prefix = parse_url(url)
        self.url = f"{SCHEME}{self.bucket}/{self.prefix}".rstrip("/")
        self.client = Client(self.bucket, self.opts, self.url)
        self.cache = DiskCache(self.opts.cache_dir, self.opts.cache_dir_size) \
            if self.opts.cache_dir else None
        try:
            metas = self.client.list(self.prefix)
        except OSError as e:
            raise StoreError(f"{self.url}: cannot list the prefix: {_cause(e)}") from None
        cut = len(self.prefix) + 1 if self.prefix else 0
        self._objects: dict[str, dict] = {}
        dirs: set[str] = set()
        for m in metas:
            rel = m["path"][cut:]
            if not rel or rel.endswith("/"):  # directory markers
                if rel:
                    dirs.add(rel.rstrip("/"))
                continue
            self._objects[rel] = m
            parts = rel.split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
        if not self._objects:
            raise StoreError(f"{self.url}: no objects under this prefix (check the bucket, the "
                             f"prefix and the endpoint)")
        self._dirs = dirs
        self._mtime = max(_ts(m) for m in self._objects.values())

    def locate(self, path: str) -> str:
        return f"{self.url}/{path}" if path else self.url

    def key(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def stat(self, path: str) -> Entry:
        if path == "" or path in self._dirs:
            return Entry(path, "dir", 0, self._mtime, "")
        m = self._objects.get(path)
        if m is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", self.locate(path))
        return Entry(path, "file", m["size"], _ts(m), m.get("e_tag") or "")

    def walk(self):
        children: dict[str, tuple[list[str], list[str]]] = {"": ([], [])}
        for d in sorted(self._dirs):
            children.setdefault(d, ([], []))
        for d in self._dirs:
            parent = d.rpartition("/")[0]
            children.setdefault(parent, ([], []))[0].append(d)
        for f in self._objects:
            children.setdefault(f.rpartition("/")[0], ([], []))[1].append(f)

        def visit(d: str):
            yield self.stat(d)
            subdirs, files = children.get(d, ([], []))
            for s in sorted(subdirs):
                yield self.stat(s)
            for f in sorted(files):
                yield self.stat(f)
            for s in sorted(subdirs):
                yield from _skip_first(visit(s))
        yield from visit("")

    def open(self, path: str, mode: str = "auto") -> "S3Blob":
        """Object PATH as pinned at the listing; its first open also pins its version id
        (a HEAD: versioned buckets then keep serving the mounted version)."""
        m = self._objects.get(path)
        if m is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", self.locate(path))
        if "headed" not in m:
            h = self.client.head(self.key(path), self.locate(path))
            if m.get("e_tag") and h.get("e_tag") != m.get("e_tag"):
                self.client.stats.add("changed")
                log.error("%s changed since the prefix was listed (ETag %s, now %s); "
                          "returning EIO", self.locate(path), m.get("e_tag"), h.get("e_tag"))
                raise ObjectChanged(errno.EIO, "the object changed since it was listed",
                                    self.locate(path))
            m = self._objects[path] = {**m, "version": h.get("version"), "headed": True}
        return S3Blob(self, path, m)

    def stats(self) -> dict:
        d = {"url": self.url, **self.client.stats.as_dict(), "in_flight_limit": self.client.flow.limit}
        if self.cache is not None:
            d["cache_dir"] = self.cache.stats()
        return d


def _skip_first(it):
    next(it, None)
    yield from it


def _ts(m: dict) -> float:
    lm = m.get("last_modified")
    return lm.replace(tzinfo=lm.tzinfo or timezone.utc).timestamp() if lm is not None else 0.0


def _cause(e: OSError) -> str:
    return e.strerror or str(e)


class S3Blob:
    """One pinned object. ``pread_into`` GETs what it is asked for (whole objects of a few
    MiB are fetched once and kept: config and tokenizer files); chunk reads go through
    :class:`S3Chunks`."""

    SMALL = 4 << 20   # objects fetched whole on their first read
    RECENT = 1 << 20  # small reads kept (the last four), for a header read twice

    def __init__(self, store: S3Store, path: str, meta: dict):
        self.store, self.path = store, path
        self.name = store.locate(path)
        self.key = store.key(path)
        self.size = meta["size"]
        self.etag = meta.get("e_tag") or "*"
        self.version = meta.get("version")
        self.tag = object_tag(store.bucket, self.key, self.etag)
        self._whole = None
        self._recent: list[tuple[int, bytes]] = []
        self._lock = threading.Lock()

    def get(self, start: int, end: int):
        return self.store.client.get(self.key, start, end, self.etag, self.version, self.name)

    def get_into(self, start: int, targets: list) -> None:
        self.store.client.get_into(self.key, start, targets, self.etag, self.version, self.name)

    def pread_into(self, buf, offset: int) -> int:
        buf = memoryview(buf).cast("B")
        n = max(0, min(len(buf), self.size - offset))
        if n == 0:
            return 0
        with self._lock:
            if self.size <= self.SMALL and self._whole is None:
                self._whole = self.get(0, self.size)
            if self._whole is not None:
                buf[:n] = memoryview(self._whole)[offset:offset + n]
                return n
            for (start, data) in self._recent:  # the header, read again by the next layer
                if start <= offset and offset + n <= start + len(data):
                    buf[:n] = memoryview(data)[offset - start:offset - start + n]
                    return n
        data = self.get(offset, offset + n)
        buf[:n] = memoryview(data)
        if n <= self.RECENT:
            with self._lock:
                self._recent = [(offset, data), *self._recent[:3]]
        return n

    def chunk_reader(self, max_length: int, extra: int) -> "S3Chunks":
        return S3Chunks(self, max_length, extra)

    def close(self) -> None:
        self._whole = None
        self._recent = []


class S3Chunks:
    """Chunk reads of one object: from the cache dir, from a GET already under way for a
    sequential reader, or a GET of just that chunk; see the module for readahead."""

    STALE = 10.0  # seconds a chunk fetched ahead waits to be read before it is given up

    def __init__(self, blob: S3Blob, max_length: int, extra: int):
        self.blob, self.max_length = blob, max_length
        self.opts = blob.store.opts
        self.cache = blob.store.cache
        self._lock = threading.Lock()
        self._plan_lock = threading.Lock()
        # offset -> (future, start of its GET, length, its buffer, when asked for)
        self._pending: dict[int, tuple[object, int, int, memoryview, float]] = {}
        self._front: int | None = None
        self._served: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._window = min(self.opts.readahead, 2 * self.opts.request_size)
        # buffers kept for reuse: a full window of chunks in flight, and a few being decrypted
        keep = (self.opts.readahead + 2 * self.opts.request_size) // max(max_length, 1) + 8
        self._pool = shared_pool(max_length, extra, keep)
        self.ahead_hits = self.waits = 0

    # --- buffers: the process-wide huge-page pool of ciphertext buffers ---------------
    def _buffer(self) -> memoryview:
        return self._pool.get()

    def release(self, buf: memoryview) -> None:
        self._pool.put(buf)

    def reserve(self, count: int) -> None:
        self._pool.reserve(count)

    # --- reads -----------------------------------------------------------------------
    def read(self, offset: int, length: int, ahead=None) -> tuple[memoryview, int, int]:
        if length > self.max_length:
            raise ValueError(f"a read of {length} bytes, more than {self.max_length}")
        length = max(0, min(length, self.blob.size - offset))
        with self._lock:
            pending = self._pending.pop(offset, None)
            front = self._front
            # a little behind the front still counts (the kernel has several reads in flight)
            sequential = front is not None and -self.opts.request_size <= offset - front <= 4096
            self._front = max(front, offset + length) if sequential else offset + length
        buf = None
        if pending is not None and pending[2] != length:
            self._drop(offset, pending)
        elif pending is not None:
            fut = pending[0]
            if not fut.done():
                self.waits += 1
                self._grow()
            try:
                buf = fut.result()[offset]  # its own retries ran: an error here is final
                self.ahead_hits += 1
            except CancelledError:  # dropped by a jump meanwhile: read it here
                self.release(pending[3])
                buf = None
        with self._lock:  # served: never fetched ahead again (the chunk cache has it now)
            self._served[offset] = None
            if len(self._served) > 4096:
                self._served.popitem(last=False)
        if sequential and ahead is not None:
            self._read_ahead(ahead((self._window + self.opts.request_size) // max(length, 1)))
        if buf is not None:
            return buf, 0, length
        buf = self._buffer()
        try:
            if self.cache is None or not self.cache.get(self.blob.tag, offset, length, buf):
                self.blob.get_into(offset, [buf[:length]])
                if self.cache is not None:
                    self.cache.put(self.blob.tag, offset, buf[:length])
        except BaseException:
            self.release(buf)
            raise
        return buf, 0, length

    def discard(self, offset: int, length: int) -> bool:
        """The chunk at OFFSET failed authentication: drop a cached copy. True if there was
        one (a fresh read from the object store may then differ)."""
        return self.cache is not None and self.cache.discard(self.blob.tag, offset, length)

    def _grow(self) -> None:
        with self._lock:
            self._window = min(self.opts.readahead, self._window * 2)

    def _read_ahead(self, ranges) -> None:
        """Fetch the not yet fetched of RANGES (the next chunks, in order) in whole requests
        of ``request_size``; a last, smaller one only where RANGES reach the end (fewer than
        asked for). So a sequential reader keeps the window full with large GETs. One
        planner at a time (the chunk cache's readahead and the FUSE threads both read), so
        no chunk is asked for twice."""
        with self._plan_lock:
            self._plan(ranges)

    def _plan(self, ranges) -> None:
        asked = (self._window + self.opts.request_size) // max(self.max_length, 1)
        cap = 2 * max(1, (self.opts.readahead + self.opts.request_size) // max(self.max_length, 1))
        now = time.monotonic()
        with self._lock:
            # chunks fetched ahead and not read for STALE seconds were not wanted after all
            # (a reader that left that stream); the others stay until read, however many
            # streams interleave (a model loader reading several tensors at once): dropping
            # them would only fetch them again
            stale = [off for off, e in self._pending.items() if now - e[4] > self.STALE]
            dropped = [(off, self._pending.pop(off)) for off in stale]
            room = cap - len(self._pending)
            todo = [(o, n) for o, n in ranges
                    if o not in self._pending and o not in self._served and n <= self.max_length]
            todo = todo[:max(0, room)]  # back-pressure: no more in flight than the cap
        for off, e in dropped:
            self._drop(off, e)
        pool = _io_threads(self.opts.concurrency)
        if self.cache is not None:  # cached chunks are read ahead from the cache dir
            cached = [(o, n) for o, n in todo if (self.blob.tag, o, n) in self.cache]
            for off, n in cached[:max(1, self._window // max(self.max_length, 1))]:
                buf = self._buffer()
                fut = pool.submit(self._load_cached, off, n, buf)
                with self._lock:
                    self._pending[off] = (fut, off, n, buf, now)
            done = set(cached)
            todo = [r for r in todo if r not in done]
        groups: list[list[tuple[int, int]]] = []
        for off, n in todo:
            g = groups[-1] if groups else None
            if g and g[-1][0] + g[-1][1] == off and off + n - g[0][0] <= self.opts.request_size:
                g.append((off, n))
            else:
                groups.append([(off, n)])
        at_end = len(ranges) < asked
        for j, g in enumerate(groups):
            size = g[-1][0] + g[-1][1] - g[0][0]
            last = j == len(groups) - 1
            if last and not at_end and size + self.max_length <= self.opts.request_size:
                break  # not a whole request yet: the next read tops it up
            bufs = {off: self._buffer() for off, _ in g}
            fut = pool.submit(self._fetch_group, g, bufs)
            with self._lock:
                for off, n in g:
                    self._pending[off] = (fut, g[0][0], n, bufs[off], now)

    def _load_cached(self, off: int, n: int, buf):
        try:
            if not self.cache.get(self.blob.tag, off, n, buf):  # evicted meanwhile
                self.blob.get_into(off, [buf[:n]])
        except BaseException:
            self.release(buf)
            raise
        return {off: buf}

    def _fetch_group(self, group, bufs):
        try:
            self.blob.get_into(group[0][0], [bufs[off][:n] for off, n in group])
        except BaseException:
            for b in bufs.values():
                self.release(b)
            raise
        if self.cache is not None:
            for off, n in group:
                self.cache.put(self.blob.tag, off, bufs[off][:n])
        return bufs

    def _drop(self, off: int, entry) -> None:
        """A chunk fetched ahead that no read will take: its fetch is cancelled if it has not
        started, and its buffer goes back to the pool (once the fetch is over, if it has)."""
        fut, buf = entry[0], entry[3]

        def give_back(f):
            if f.cancelled() or f.exception() is not None:
                if f.cancelled():
                    self.release(buf)
                return
            self.release(buf)
        fut.cancel()
        fut.add_done_callback(give_back)

    def close(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for off, entry in pending.items():
            self._drop(off, entry)
