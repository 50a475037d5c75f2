"""Mounting s3://BUCKET/PREFIX from a real SeaweedFS server: a fleet of mounts loading one
model through unmodified transformers and vLLM, the cache dir across mounts and
``ctfs prefetch``, an object overwritten after the mount, a server stopped mid-load, a
faulty link, and refusals."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from benchmarks.netproxy import NetProxy
from benchmarks.seaweed import SeaweedFS
from mounting import ctfs, foreground_daemon, is_mounted, mounted
from s3fixtures import s3_env, upload
from test_frameworks import LM_INPUT_IDS, VLLM_PROMPTS, check_load_file, lm_logits, vllm_generate
from test_frameworks import vllm_python  # noqa: F401 (the fixture)


LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.tensor(json.loads(sys.argv[3]))).logits, sys.argv[2])
"""


HASH = """
import hashlib, sys
from safetensors.torch import load_file
t = load_file(sys.argv[1])
h = hashlib.sha256()
for k in sorted(t):
    h.update(k.encode()); h.update(t[k].numpy().tobytes())
print(h.hexdigest())
"""


def tensor_digest(path) -> str:
    return subprocess.run([sys.executable, "-c", HASH, str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def status(mnt) -> dict:
    return json.loads(ctfs("status", mnt, "--json").stdout)


def header_bytes(enc_dir) -> int:
    n = 0
    for f in os.listdir(enc_dir):
        if f.endswith(".safetensors"):
            with open(os.path.join(enc_dir, f), "rb") as fh:
                n += 8 + int.from_bytes(fh.read(8), "little")
    return n


@pytest.mark.slow
def test_a_fleet_of_three_mounts_loads_one_model_concurrently(lm, seaweed, tmp_path):
    want = lm_logits(lm["plain"])
    env = s3_env(seaweed)
    mnts = [tmp_path / f"host{i}" for i in range(3)]
    import contextlib
    with contextlib.ExitStack() as stack:
        for i, m in enumerate(mnts):
            stack.enter_context(mounted(lm["url"], m, lm["key_file"], "--cache-dir",
                                        tmp_path / f"cache{i}", env=env))
        # three processes, as three hosts' model servers, all loading at once
        procs = [subprocess.Popen([sys.executable, "-c", LOAD, str(m), str(tmp_path / f"out{i}.pt"),
                                   json.dumps(LM_INPUT_IDS)], stderr=subprocess.PIPE, text=True)
                 for i, m in enumerate(mnts)]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
        for i in range(3):
            assert torch.equal(torch.load(tmp_path / f"out{i}.pt"), want)
        for m in mnts:
            assert sorted(os.listdir(m)) == sorted(os.listdir(lm["plain"]))
            for shard in [f for f in os.listdir(lm["plain"]) if f.endswith(".safetensors")]:
                check_load_file(str(m / shard), lm["plain"] / shard)
            st = status(m)["object_store"]
            assert st["url"] == lm["url"] and st["failures"] == 0 and st["bytes_fetched"] > 0
            assert st["cache_dir"]["bytes_written"] > 0


def test_second_mount_and_prefetch_fetch_nothing_but_headers(big, seaweed, tmp_path):
    env = s3_env(seaweed)
    plain = (big["plain"] / "model.safetensors").read_bytes()
    for how in ("remount", "prefetch"):
        cd = tmp_path / f"cd-{how}"
        if how == "remount":
            with mounted(big["url"], tmp_path / "m1", big["key_file"], "--cache-dir", cd, env=env) as m:
                check_load_file(str(m / "model.safetensors"), big["plain"] / "model.safetensors")
        else:
            p = ctfs("prefetch", big["url"], "--cache-dir", cd, env=env)
            assert "1 file(s)" in p.stdout and str(cd) in p.stdout, p.stdout
            again = ctfs("prefetch", big["url"], "--cache-dir", cd, env=env)
            assert "fetched 0 B" in again.stdout, again.stdout
        with mounted(big["url"], tmp_path / "m2", big["key_file"], "--cache-dir", cd, env=env) as m:
            check_load_file(str(m / "model.safetensors"), big["plain"] / "model.safetensors")
            st = status(m)["object_store"]
            text = ctfs("status", m).stdout
        # the headers (and the 23-byte config.json, which nothing read) are all it fetched
        assert st["bytes_fetched"] == header_bytes(big["enc"]), st
        assert st["cache_dir"]["misses"] == 0 and st["cache_dir"]["hits"] >= 12, st
        assert "cache dir" in text and "s3 " in text
        assert not any(plain[:4096] in open(os.path.join(d, f), "rb").read()
                       for d, _, fs in os.walk(cd) for f in fs)


def test_an_object_overwritten_after_mount_is_eio_for_that_file_only(lm, seaweed, tmp_path):
    url = upload(seaweed, lm["enc"])
    env = s3_env(seaweed)
    shards = sorted(f for f in os.listdir(lm["plain"]) if f.endswith(".safetensors"))
    log = tmp_path / "daemon.log"
    with foreground_daemon([url, tmp_path / "mnt", "--key-file", lm["key_file"]], log, env=env):
        mnt = tmp_path / "mnt"
        bucket, prefix = url[5:].split("/", 1)
        body = (lm["enc"] / shards[0]).read_bytes()
        seaweed.client().put_object(Bucket=bucket, Key=f"{prefix}/{shards[0]}",
                                    Body=body[:-1] + bytes([body[-1] ^ 1]))
        with pytest.raises(OSError) as ei:
            with open(mnt / shards[0], "rb") as f:
                f.seek(len(body) - 100)  # past the header: a chunk fetched now
                f.read(100)
        assert ei.value.errno == errno.EIO
        check_load_file(str(mnt / shards[1]), lm["plain"] / shards[1])
        assert is_mounted(mnt)
    text = log.read_text()
    assert f"{url}/{shards[0]}" in text and "changed since it was mounted" in text


@pytest.mark.slow
def test_server_stopped_mid_load_gives_eio_then_recovers(big, tmp_path):
    server = SeaweedFS(str(tmp_path / "sw")).start()
    try:
        url = upload(server, big["enc"])
        env = s3_env(server)
        log = tmp_path / "daemon.log"
        args = [url, tmp_path / "mnt", "--key-file", big["key_file"], "--s3-timeout", "3s",
                "--cache-size", "4MiB", "--readahead", "0", "--s3-readahead", "4MiB"]
        with foreground_daemon(args, log, env=env):
            view = tmp_path / "mnt" / "model.safetensors"
            with open(view, "rb") as f:
                f.read(1 << 20)
                server.stop()
                t = time.monotonic()
                with pytest.raises(OSError) as ei:
                    f.seek(20 << 20)
                    f.read(1 << 20)
                took = time.monotonic() - t
            assert ei.value.errno == errno.EIO and took < 3 + 30, took
            assert is_mounted(tmp_path / "mnt") and "model.safetensors" in os.listdir(tmp_path / "mnt")
            server.start()
            check_load_file(str(view), big["plain"] / "model.safetensors")
        assert "gave up after" in log.read_text()
    finally:
        server.stop()


def test_a_faulty_link_still_gives_exact_bytes_through_the_mount(big, seaweed, tmp_path):
    log = tmp_path / "daemon.log"
    with NetProxy(seaweed.port, p_delay=0.01, max_delay=0.1, p_truncate=0.01, p_reset=0.01,
                  seed=5) as proxy:
        env = s3_env(seaweed, endpoint=proxy.endpoint)
        with foreground_daemon([big["url"], tmp_path / "mnt", "--key-file", big["key_file"]], log,
                               env=env):
            # in a child: an EIO under mmap is a SIGBUS, which must fail this test, not end it
            p = subprocess.run([sys.executable, "-c", HASH, str(tmp_path / "mnt" / "model.safetensors")],
                               capture_output=True, text=True, timeout=240)
            st = status(tmp_path / "mnt")["object_store"]
        assert p.returncode == 0, (p.returncode, p.stderr[-2000:], log.read_text()[-4000:])
        assert p.stdout.strip() == tensor_digest(big["plain"] / "model.safetensors")
        assert proxy.stats["truncations"] + proxy.stats["resets"] > 0, proxy.stats
        assert st["retries"] > 0 and st["failures"] == 0, st


@pytest.mark.parametrize("case", ["wrong-credentials", "missing-bucket", "empty-prefix",
                                  "not-cryptotensors"])
def test_mount_refusals_are_one_line_naming_the_url(case, big, seaweed, tmp_path):
    env = s3_env(seaweed)
    url = big["url"]
    if case == "wrong-credentials":
        env["AWS_SECRET_ACCESS_KEY"] = "wrong"
        expect = "access denied (403)"
    elif case == "missing-bucket":
        url, expect = "s3://ctfs-missing-bucket/model", "no such bucket"
    elif case == "empty-prefix":
        url, expect = big["url"] + "/nothing", "no objects under this prefix"
    else:
        d = tmp_path / "bad"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header....")
        url, expect = upload(seaweed, d), "model.safetensors"
    os.makedirs(tmp_path / "mnt")
    p = ctfs("mount", url, tmp_path / "mnt", "--key-file", big["key_file"], check=False, env=env)
    assert p.returncode != 0 and not is_mounted(tmp_path / "mnt")
    line = p.stderr.strip().splitlines()[-1]
    assert url in line and expect in line, p.stderr


def test_config_file_takes_an_s3_source(big, seaweed, tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'source = "{big["url"]}"\nmountpoint = "mnt"\ncache_dir = "cache"\n'
                   f's3_timeout = "1m"\ns3_concurrency = 4\ns3_readahead = "32MiB"\n'
                   f'[provider]\nname = "file"\nkey_file = "{big["key_file"]}"\n')
    env = s3_env(seaweed)
    os.makedirs(tmp_path / "mnt")
    try:
        ctfs("mount", "--config", cfg, env=env)
        check_load_file(str(tmp_path / "mnt" / "model.safetensors"), big["plain"] / "model.safetensors")
        st = status(tmp_path / "mnt")
        assert st["source"] == big["url"]
        assert st["object_store"]["cache_dir"]["dir"] == str(tmp_path / "cache")
    finally:
        ctfs("umount", tmp_path / "mnt", check=False)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(3600)
def test_vllm_generates_same_tokens_from_an_s3_mount(vllm_python, lm, seaweed, tmp_path):
    want = vllm_generate(vllm_python, lm["plain"], tmp_path / "plain.json")
    assert len(want) == len(VLLM_PROMPTS)
    with mounted(lm["url"], tmp_path / "mnt", lm["key_file"], "--cache-dir", tmp_path / "cd",
                 env=s3_env(seaweed)) as mnt:
        got = vllm_generate(vllm_python, mnt, tmp_path / "mnt.json")
    assert got == want


def test_metrics_show_object_storage_and_cache_dir(big, seaweed, tmp_path):
    import socket

    from mounting import scrape_metrics
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = s3_env(seaweed)
    with mounted(big["url"], tmp_path / "mnt", big["key_file"], "--cache-dir", tmp_path / "cd",
                 "--metrics", f"127.0.0.1:{port}", env=env) as m:
        check_load_file(str(m / "model.safetensors"), big["plain"] / "model.safetensors")
        st = status(m)["object_store"]
        got = scrape_metrics(f"http://127.0.0.1:{port}/metrics")
    assert got["ctfs_s3_bytes_fetched_total"] == st["bytes_fetched"] >= 24 << 20
    assert got["ctfs_s3_requests_total"] == st["requests"] > 0
    assert got["ctfs_s3_failures_total"] == 0 and got["ctfs_s3_changed_objects_total"] == 0
    assert got["ctfs_cache_dir_bytes_written_total"] == st["cache_dir"]["bytes_written"] >= 24 << 20
    assert got["ctfs_cache_dir_limit_bytes"] == 50 << 30
    assert 2 <= got["ctfs_s3_in_flight_limit"] <= 16
    assert "ctfs_s3_throughput_bytes_per_second" in got
