"""Which S3 client for ctfs's object-storage reads: obstore against boto3, measured.

``python -m benchmarks.s3_clients [SIZE_MIB]`` starts a SeaweedFS server on 127.0.0.1
(``benchmarks.seaweed``), uploads one object of SIZE_MIB (default 1024) random bytes, and
reads it whole with ranged GETs into reused buffers, for each client, request size (2 and
8 MiB) and number in flight (4 and 8), twice, interleaved. Prints GB/s and the client
process's CPU-seconds per GB. boto3 reads each body with ``readinto`` (no extra copy);
obstore copies each answer once into the buffer. The results and the choice are in
``benchmarks/README.md``.
"""
from __future__ import annotations

import io
import os
import resource
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .seaweed import KEY_ID, REGION, SECRET, SeaweedFS


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _obstore(endpoint, size, req, inflight, bucket="clients", key="blob"):
    import obstore
    from obstore.store import S3Store
    st = S3Store(bucket, endpoint=endpoint, access_key_id=KEY_ID, secret_access_key=SECRET,
                 region=REGION, virtual_hosted_style_request=False,
                 client_options={"allow_http": True}, retry_config={"max_retries": 0})
    bufs, lock = [bytearray(req) for _ in range(inflight)], threading.Lock()

    def one(off):
        b = obstore.get_range(st, key, start=off, end=min(off + req, size))
        with lock:
            buf = bufs.pop()
        memoryview(buf)[:len(b)] = memoryview(b)
        with lock:
            bufs.append(buf)
        return len(b)
    with ThreadPoolExecutor(inflight) as ex:
        return sum(ex.map(one, range(0, size, req)))


def _boto3(endpoint, size, req, inflight):
    import boto3
    from botocore.config import Config
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                      region_name=REGION, config=Config(s3={"addressing_style": "path"},
                                                        max_pool_connections=inflight + 2,
                                                        retries={"max_attempts": 1}))
    bufs, lock = [bytearray(req) for _ in range(inflight)], threading.Lock()

    def one(off):
        r = s3.get_object(Bucket="clients", Key="blob", Range=f"bytes={off}-{min(off + req, size) - 1}")
        with lock:
            buf = bufs.pop()
        mv, got, raw = memoryview(buf), 0, r["Body"]._raw_stream
        while True:
            k = raw.readinto(mv[got:])
            if not k:
                break
            got += k
        with lock:
            bufs.append(buf)
        return got
    with ThreadPoolExecutor(inflight) as ex:
        return sum(ex.map(one, range(0, size, req)))


def raw_gets(endpoint: str, bucket: str, key: str, size: int) -> None:
    """The ``raw_gets`` method of ``--only s3``: 8 GETs of 8 MiB in flight into memory;
    prints bytes, seconds and this process's CPU-seconds."""
    t = time.perf_counter()
    n = _obstore(endpoint, size, 8 << 20, 8, bucket, key)
    dt = time.perf_counter() - t
    print(n, dt, _cpu())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["raw"]:  # raw ENDPOINT BUCKET KEY SIZE
        raw_gets(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    size = int(argv[0] if argv else 1024) << 20
    with tempfile.TemporaryDirectory(prefix="ctfs-s3-clients-") as d:
        server = SeaweedFS(d).start()
        try:
            server.bucket("clients")
            server.client().upload_fileobj(io.BytesIO(os.urandom(size)), "clients", "blob")
            res: dict = {}
            for _ in range(2):
                for fn in (_obstore, _boto3):
                    for req in (2 << 20, 8 << 20):
                        for inflight in (4, 8):
                            c, t = _cpu(), time.perf_counter()
                            assert fn(server.endpoint, size, req, inflight) == size
                            dt, dc = time.perf_counter() - t, _cpu() - c
                            res.setdefault((fn.__name__[1:], req >> 20, inflight), []).append(
                                (size / dt / 1e9, dc / (size / 1e9)))
            print("client  request  in-flight  GB/s (runs)  client CPU-s/GB (runs)")
            for (name, req, n), v in res.items():
                print(f"{name:7s} {req:4d} MiB  {n:6d}     " + " ".join(f"{a:.2f}" for a, _ in v)
                      + "     " + " ".join(f"{b:.2f}" for _, b in v))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
