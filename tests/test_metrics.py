"""The Prometheus endpoint: a collector over Mount.status(), bound to the given address
only, scraped over HTTP (in process, and from a real mount after reads)."""
from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request

import numpy as np
import psutil
import pytest
from safetensors.numpy import save_file

from ctfs.format.keys import KeySet
from ctfs.ops.metrics import MetricsError, MetricsServer, MountCollector, parse_address
from ctfs.format.modeldir import encrypt_path
from ctfs.format.writer import EncryptOptions
from mounting import ctfs, daemon_process, mounted, scrape_metrics, write_keys

STATUS = {
    "mountpoint": "/mnt/m", "source": "/srv/enc", "provider": "file", "pid": 1, "started": 1700000000.5,
    "locked": True, "locked_reason": "x", "files": ["a.safetensors", "b.safetensors"], "key_ids": [],
    "open_handles": 3, "integrity_failures": 2,
    "cache": {"bytes_cached": 100, "bytes_held": 150, "capacity": 1 << 20, "chunks": 4, "inflight": 0,
              "hits": 30, "misses": 10, "hit_ratio": 0.75, "evictions": 5, "bytes_decrypted": 4096,
              "decrypt_seconds": 0.25, "readahead_issued": 7, "readahead_hits": 6, "readahead_dropped": 1},
    "fuse": {"dev": "0:77", "direct_io": False, "keep_cache": True, "read_ahead_kb": 1024,
             "max_background": 64, "read_requests": 12, "max_read_request": 1 << 20},
}


@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:9101", ("127.0.0.1", 9101)), ("[::1]:9101", ("::1", 9101)),
    ("localhost:0", ("localhost", 0)), (":9101", ("127.0.0.1", 9101)), ("9101", ("127.0.0.1", 9101)),
])
def test_parse_address(text, want):
    assert parse_address(text) == want


@pytest.mark.parametrize("text", ["::1:9101", "host", "1.2.3.4:x", "1.2.3.4:70000", ""])
def test_parse_address_refuses(text):
    with pytest.raises(MetricsError):
        parse_address(text)


def test_endpoint_serves_status_values_on_the_given_address_only():
    srv = MetricsServer("127.0.0.1:0")
    try:
        assert srv.address[0] == "127.0.0.1" and srv.httpd.socket.getsockname()[0] == "127.0.0.1"
        srv.start(lambda: STATUS)
        m = scrape_metrics(srv.url)
    finally:
        srv.close()
    assert m["ctfs_up"] == 1 and m["ctfs_files"] == 2 and m["ctfs_locked"] == 1
    assert m["ctfs_cache_bytes"] == 100 and m["ctfs_cache_capacity_bytes"] == 1 << 20
    assert m["ctfs_cache_hit_ratio"] == 0.75
    assert (m["ctfs_cache_hits_total"], m["ctfs_cache_misses_total"], m["ctfs_cache_evictions_total"]) == (30, 10, 5)
    assert m["ctfs_bytes_decrypted_total"] == 4096 and m["ctfs_decrypt_seconds_total"] == 0.25
    assert (m["ctfs_readahead_issued_total"], m["ctfs_readahead_hits_total"]) == (7, 6)
    assert m["ctfs_open_handles"] == 3 and m["ctfs_integrity_failures_total"] == 2
    assert m["ctfs_fuse_read_requests_total"] == 12 and m["ctfs_fuse_max_read_request_bytes"] == 1 << 20
    assert m["ctfs_fuse_read_ahead_bytes"] == 1 << 20
    assert m['ctfs_mount_info{mountpoint="/mnt/m",provider="file",source="/srv/enc"}'] == 1
    with pytest.raises(urllib.error.URLError):  # closed with the mount
        urllib.request.urlopen(srv.url, timeout=2)


def test_failing_status_is_up_0_not_a_crash():
    def broken():
        raise RuntimeError("tree closed")
    families = list(MountCollector(broken).collect())
    assert [(f.name, f.samples[0].value) for f in families] == [("ctfs_up", 0.0)]


def test_taken_port_and_missing_package_are_clear_errors(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(MetricsError, match=f"127.0.0.1:{port}"):
            MetricsServer(f"127.0.0.1:{port}")
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(MetricsError, match="prometheus-client"):
        MetricsServer("127.0.0.1:0")


def test_mount_metrics_after_reads(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    rng = np.random.default_rng(1)
    save_file({"w": rng.standard_normal((1024, 640)).astype(np.float32)}, str(plain / "model.safetensors"))  # 2.5 MiB
    keys = KeySet.generate()
    kf = write_keys(keys, tmp_path / "k.jwk")
    encrypt_path(str(plain), str(tmp_path / "enc"), keys, EncryptOptions(chunk_size=64 * 1024))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/metrics"
    with mounted(tmp_path / "enc", tmp_path / "mnt", kf, "--metrics", f"127.0.0.1:{port}",
                 "--cache-size", "4MiB") as mnt:
        before = scrape_metrics(url)
        assert before["ctfs_bytes_decrypted_total"] == 0 and before["ctfs_files"] == 1
        with open(os.path.join(mnt, "model.safetensors"), "rb") as f:
            while f.read(1 << 20):
                pass
        m = scrape_metrics(url)
        assert m["ctfs_bytes_decrypted_total"] >= 1024 * 640 * 4
        assert m["ctfs_cache_misses_total"] > 0 and m["ctfs_decrypt_seconds_total"] > 0
        assert m["ctfs_cache_capacity_bytes"] == 4 << 20 and m["ctfs_locked"] == 0
        assert m["ctfs_integrity_failures_total"] == 0 and m["ctfs_up"] == 1
        assert m["ctfs_fuse_read_requests_total"] > before["ctfs_fuse_read_requests_total"]
        assert m["ctfs_fuse_max_read_request_bytes"] == 1 << 20  # read-ahead raised to 1 MiB
        assert m["ctfs_fuse_read_ahead_bytes"] == 1 << 20
        daemon = daemon_process(mnt)
        conns = getattr(daemon, "net_connections", daemon.connections)(kind="inet")
        listening = [c.laddr for c in conns if c.status == psutil.CONN_LISTEN]
        assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
    daemon.wait(10)  # unmounted: the daemon exits, and the endpoint with it
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


def test_bad_metrics_address_fails_before_mounting(tmp_path):
    (tmp_path / "enc").mkdir()
    (tmp_path / "mnt").mkdir()
    p = ctfs("mount", tmp_path / "enc", tmp_path / "mnt", "--key-file", tmp_path / "k", "--metrics",
             "everywhere", check=False)
    assert p.returncode != 0 and "not a metrics address" in p.stderr and "Traceback" not in p.stderr
