"""Optional Prometheus endpoint of a mount (``--metrics HOST:PORT``, needs prometheus-client).

A custom collector reads :meth:`ctfs.service.Mount.status` on every scrape, so the numbers
are never stale and nothing is counted twice. The HTTP server listens on the given
address only (``:PORT`` or ``PORT`` alone means 127.0.0.1:PORT, never all interfaces).
The socket is bound before the mount is made (a taken port fails the mount at once, with
the reason) and requests are served only once the mount is ready.

Exposed (all prefixed ``ctfs_``): ``up``, ``mount_info{mountpoint,source,provider}``,
``start_time_seconds``, ``files``, ``locked``, ``open_handles``, ``cache_bytes``,
``cache_held_bytes``, ``cache_capacity_bytes``, ``cache_chunks``, ``cache_hit_ratio``,
``cache_hits_total``, ``cache_misses_total``, ``cache_evictions_total``, for an ``s3://``
source ``s3_requests_total``, ``s3_retries_total``, ``s3_failures_total``,
``s3_changed_objects_total``, ``s3_bytes_fetched_total``, ``s3_throughput_bytes_per_second``,
``s3_in_flight_limit`` and the ``cache_dir_*`` figures of ``--cache-dir``,
``bytes_decrypted_total``, ``decrypt_seconds_total``, ``readahead_issued_total``,
``readahead_hits_total``, ``readahead_dropped_total``, ``integrity_failures_total``, and
once the mount serves ``fuse_read_requests_total``, ``fuse_direct_replies_total``,
``fuse_max_read_request_bytes``, ``fuse_read_ahead_bytes``.
"""
from __future__ import annotations

import logging
import re
import socket
import threading
from typing import Callable, Optional

from ..errors import CtfsError

log = logging.getLogger("ctfs.metrics")


class MetricsError(CtfsError):
    """The metrics endpoint could not be set up."""


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:9101' / '[::1]:9101' / 'localhost:9101' / ':9101' / '9101' -> (host, port)."""
    s = str(text).strip()
    bad = MetricsError(f"not a metrics address: {text!r} (HOST:PORT, e.g. 127.0.0.1:9101 or [::1]:9101)")
    if s.isdigit():
        host, port = "127.0.0.1", s
    elif s.startswith("["):
        m = re.fullmatch(r"\[([^\]]+)\]:(\d+)", s)
        if not m:
            raise bad
        host, port = m.groups()
    else:
        host, sep, port = s.rpartition(":")
        if not sep or ":" in host or not port.isdigit():
            raise bad
        host = host or "127.0.0.1"
    if not 0 <= int(port) <= 65535:
        raise MetricsError(f"metrics port out of range: {port}")
    return host, int(port)


def _families(status: dict):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
    cache = status.get("cache", {})

    def gauge(name, doc, value):
        return GaugeMetricFamily(f"ctfs_{name}", doc, value=float(value))

    def counter(name, doc, value):
        return CounterMetricFamily(f"ctfs_{name}", doc, value=float(value))

    yield gauge("up", "1 while the mount answers status queries.", 1)
    yield InfoMetricFamily("ctfs_mount", "The mount served by this daemon.",
                           value={"mountpoint": str(status.get("mountpoint", "")),
                                  "source": str(status.get("source", "")),
                                  "provider": str(status.get("provider", ""))})
    yield gauge("start_time_seconds", "When the daemon authorised the mount (Unix time).",
                status.get("started", 0))
    yield gauge("files", "Encrypted files authorised and served.", len(status.get("files", ())))
    yield gauge("locked", "1 while the mount is locked (keys and plaintext dropped).",
                1 if status.get("locked") else 0)
    yield gauge("open_handles", "Files open through the mount.", status.get("open_handles", 0))
    yield gauge("cache_bytes", "Decrypted plaintext held in the chunk cache.", cache.get("bytes_cached", 0))
    yield gauge("cache_held_bytes", "Cache memory in use, including chunks being decrypted.",
                cache.get("bytes_held", 0))
    yield gauge("cache_capacity_bytes", "Bound of the chunk cache.", cache.get("capacity", 0))
    yield gauge("cache_chunks", "Decrypted chunks in the cache.", cache.get("chunks", 0))
    yield gauge("cache_hit_ratio", "Cache hits / (hits + misses) since start.", cache.get("hit_ratio", 0.0))
    yield counter("cache_hits", "Chunk lookups answered from the cache.", cache.get("hits", 0))
    yield counter("cache_misses", "Chunk lookups that had to decrypt.", cache.get("misses", 0))
    yield counter("cache_evictions", "Chunks evicted from the cache.", cache.get("evictions", 0))
    yield counter("bytes_decrypted", "Plaintext bytes decrypted (and authenticated).",
                  cache.get("bytes_decrypted", 0))
    yield counter("decrypt_seconds", "Time spent decrypting.", cache.get("decrypt_seconds", 0.0))
    yield counter("readahead_issued", "Chunks decrypted ahead of sequential reads.",
                  cache.get("readahead_issued", 0))
    yield counter("readahead_hits", "Read-ahead chunks that a later read used.", cache.get("readahead_hits", 0))
    yield counter("readahead_dropped", "Read-ahead requests dropped (queue full or locked).",
                  cache.get("readahead_dropped", 0))
    yield counter("integrity_failures", "Reads refused because a tag or digest did not match.",
                  status.get("integrity_failures", 0))
    fuse = status.get("fuse")
    if fuse:  # present once the mount serves
        yield counter("fuse_read_requests", "FUSE read requests served.", fuse.get("read_requests", 0))
        yield counter("fuse_direct_replies", "FUSE read replies written to /dev/fuse straight "
                      "from the chunk cache.", fuse.get("direct_replies", 0))
        yield counter("fuse_page_cache_stored_bytes", "Plaintext of chunks decrypted for random "
                      "reads handed to the kernel page cache (FUSE_NOTIFY_STORE) before it was "
                      "asked for.", fuse.get("page_cache_stored_bytes", 0))
        yield gauge("fuse_max_read_request_bytes", "Largest FUSE read request so far (1 MiB when "
                    "the kernel tuning took effect).", fuse.get("max_read_request", 0))
        if fuse.get("read_ahead_kb") is not None:
            yield gauge("fuse_read_ahead_bytes", "The mount's kernel read-ahead window.",
                        fuse["read_ahead_kb"] * 1024)
    o = status.get("object_store")
    if o:  # SRC is s3://...
        yield counter("s3_requests", "GET/HEAD/LIST attempts sent to the object store.", o.get("requests", 0))
        yield counter("s3_retries", "Attempts that failed and were retried (5xx, 429, resets, timeouts, "
                      "short bodies).", o.get("retries", 0))
        yield counter("s3_failures", "Requests given up on (EIO to the reader).", o.get("failures", 0))
        yield counter("s3_changed_objects", "GETs refused because the object changed since the mount "
                      "(If-Match failed).", o.get("changed", 0))
        yield counter("s3_bytes_fetched", "Object bytes fetched.", o.get("bytes_fetched", 0))
        yield gauge("s3_throughput_bytes_per_second", "Bytes fetched per second over the last 5 s.",
                    o.get("throughput_bps", 0.0))
        yield gauge("s3_in_flight_limit", "GETs allowed in flight now (adapts to throughput).",
                    o.get("in_flight_limit", 0))
        d = o.get("cache_dir")
        if d:
            yield gauge("cache_dir_bytes", "Ciphertext chunks held in the cache dir.", d.get("bytes", 0))
            yield gauge("cache_dir_limit_bytes", "Bound of the cache dir.", d.get("limit", 0))
            yield gauge("cache_dir_chunks", "Chunks in the cache dir.", d.get("chunks", 0))
            yield counter("cache_dir_hits", "Chunk reads served from the cache dir.", d.get("hits", 0))
            yield counter("cache_dir_misses", "Chunk reads the cache dir did not hold.", d.get("misses", 0))
            yield counter("cache_dir_bytes_read", "Bytes read from the cache dir.", d.get("bytes_read", 0))
            yield counter("cache_dir_bytes_written", "Bytes written to the cache dir.", d.get("bytes_written", 0))
            yield counter("cache_dir_evictions", "Chunks deleted to stay within the bound.", d.get("evictions", 0))
            yield counter("cache_dir_discarded", "Cached chunks deleted because they failed their "
                          "AEAD tag.", d.get("discarded", 0))


class MountCollector:
    """prometheus-client collector over a ``status()`` callable (``Mount.status``)."""

    def __init__(self, status: Callable[[], dict]):
        self._status = status
        self._warned = False

    def describe(self):
        return []  # nothing to collect at registration time

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        try:
            status = self._status()
        except Exception as e:  # noqa: BLE001 - a scrape must not take the daemon down
            if not self._warned:
                log.warning("metrics: status of the mount failed: %s", e)
                self._warned = True
            yield GaugeMetricFamily("ctfs_up", "1 while the mount answers status queries.", value=0.0)
            return
        yield from _families(status)


class MetricsServer:
    """An HTTP endpoint serving the collector of one mount; bound at construction."""

    def __init__(self, address: str):
        try:
            from prometheus_client import CollectorRegistry, make_wsgi_app
            from prometheus_client.exposition import ThreadingWSGIServer
        except ImportError:
            raise MetricsError("--metrics needs the prometheus-client package "
                               "(pip install 'ctfs[metrics]')") from None
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        class QuietHandler(WSGIRequestHandler):
            def log_message(self, format, *args):  # noqa: A002 - no access log on stderr
                pass
        self.host, self.port = parse_address(address)
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise MetricsError(f"metrics address {address!r}: {e.strerror}") from None
        family, _, _, _, sockaddr = infos[0]

        class Server(ThreadingWSGIServer):
            address_family = family

        self.registry = CollectorRegistry(auto_describe=False)
        self._status: Optional[Callable[[], dict]] = None
        self.registry.register(MountCollector(self._current_status))
        try:
            self.httpd = make_server(sockaddr[0], sockaddr[1], make_wsgi_app(self.registry), Server,
                                     handler_class=QuietHandler)
        except OSError as e:
            raise MetricsError(f"metrics address {address}: {e.strerror or e}") from None
        self.address = self.httpd.server_address[:2]
        self._thread: Optional[threading.Thread] = None

    def _current_status(self) -> dict:
        if self._status is None:
            raise RuntimeError("mount not ready")
        return self._status()

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"

    def start(self, status: Callable[[], dict]) -> None:
        """Serve scrapes of ``status()`` from a daemon thread."""
        self._status = status
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="ctfs-metrics", daemon=True)
        self._thread.start()
        log.info("metrics on %s", self.url)

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self.httpd.server_close()
