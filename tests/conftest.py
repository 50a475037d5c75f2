"""Shared fixtures. The reference vectors (files the ``cryptotensors`` 0.2.3 wheel wrote) live
in the repository, in ``format/vectors/reference`` (its README says how they were made)."""
from __future__ import annotations

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks.seaweed / benchmarks.netproxy serve tests too
    sys.path.insert(0, str(ROOT))
VECTORS = ROOT / "format" / "vectors" / "reference"


@pytest.fixture(scope="session")
def ref_vectors() -> pathlib.Path:
    assert (VECTORS / "manifest.json").is_file(), f"reference vectors missing from {VECTORS}"
    return VECTORS


@pytest.fixture(scope="session")
def ref_manifest(ref_vectors) -> dict:
    return json.loads((ref_vectors / "manifest.json").read_text())


def ref_keys(ref_vectors, keys_file):
    from ctfs.format.keys import KeySet
    return KeySet.load(ref_vectors / keys_file, insecure_perms=True)  # test keys, 0644 in git


def jwk_pair(keyset):
    """(oct JWK, okp JWK) dicts of a KeySet, for the reference wheel's config."""
    keys = keyset.to_jwks()["keys"]
    return ([k for k in keys if k["kty"] == "oct"][0], [k for k in keys if k["kty"] == "okp"][0])


# The OpenBao fixtures live here so every module shares one session server.
from openbao import openbao_factory, openbao_server  # noqa: E402,F401
# ... and one SeaweedFS server
from s3fixtures import big, lm, seaweed  # noqa: E402,F401
