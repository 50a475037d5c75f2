"""Fixtures for object-storage tests: one real SeaweedFS server per session, models in it.

Nothing is mocked: ``weed mini`` (``benchmarks.seaweed``) serves S3 on 127.0.0.1, in its
own temporary data directory, and is stopped by PID at the end of the session.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import uuid

import pytest
import torch
from safetensors.torch import save_file

from benchmarks.seaweed import SeaweedFS
from ctfs.format.keys import KeySet
from ctfs.format.modeldir import encrypt_path
from ctfs.format.writer import EncryptOptions
from mounting import write_keys

ROOT = pathlib.Path(__file__).resolve().parent.parent
E2E = ROOT / "tests" / "e2e"


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    server = SeaweedFS(str(tmp_path_factory.mktemp("seaweed"))).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def big(tmp_path_factory, seaweed):
    """A 24 MiB one-file model in 2 MiB chunks, uploaded to a fresh prefix."""
    m = make_big(tmp_path_factory.mktemp("big"))
    m["url"] = upload(seaweed, m["enc"])
    return m


@pytest.fixture(scope="session")
def lm(tmp_path_factory, seaweed):
    """A tiny sharded causal LM in 64 KiB chunks, uploaded to a fresh prefix."""
    m = make_lm(tmp_path_factory.mktemp("lm"))
    m["url"] = upload(seaweed, m["enc"])
    return m


def s3_env(server, endpoint: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(server.env)
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    return env


def make_lm(d: pathlib.Path, chunk_size: int = 64 * 1024) -> dict:
    """A tiny sharded causal LM (tests/e2e/make_tiny_lm.py), plain and encrypted."""
    spec = importlib.util.spec_from_file_location("make_tiny_lm", E2E / "make_tiny_lm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    plain, enc = d / "plain", d / "enc"
    mod.make_tiny_causal_lm(str(plain), seed=7)
    keys = KeySet.generate()
    key_file = write_keys(keys, d / "keys.jwk")
    encrypt_path(str(plain), str(enc), keys, EncryptOptions(chunk_size=chunk_size))
    return {"dir": d, "plain": plain, "enc": enc, "keys": keys, "key_file": key_file}


def make_big(d: pathlib.Path, mib: int = 24) -> dict:
    """One file of MIB MiB of float32 in 2 MiB chunks (the default), plus a config."""
    plain, enc = d / "plain", d / "enc"
    plain.mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    n = mib * (1 << 20) // 4
    save_file({"w": torch.randn(n // 1024 - 3, 1024, generator=g), "b": torch.randn(3 * 1024 + 5, generator=g)},
              str(plain / "model.safetensors"), metadata={"format": "pt"})
    (plain / "config.json").write_text('{"model_type": "test"}\n')
    keys = KeySet.generate()
    key_file = write_keys(keys, d / "keys.jwk")
    encrypt_path(str(plain), str(enc), keys, EncryptOptions())
    return {"dir": d, "plain": plain, "enc": enc, "keys": keys, "key_file": key_file}


def upload(server, local, bucket="models", prefix=None) -> str:
    """LOCAL to a fresh prefix of BUCKET; returns its s3:// URL."""
    server.bucket(bucket)
    prefix = prefix or f"m-{uuid.uuid4().hex[:10]}"
    server.upload_dir(str(local), bucket, prefix)
    return f"s3://{bucket}/{prefix}"
