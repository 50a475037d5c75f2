"""Shared fixtures. The reference vectors live in ../shared beside the repository (CI
clones the repo with shared/ next to it); CTFS_SHARED overrides the location."""
from __future__ import annotations

import json
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("CTFS_SHARED", ROOT.parent / "shared"))
VECTORS = SHARED / "vectors" / "reference"


@pytest.fixture(scope="session")
def ref_vectors() -> pathlib.Path:
    assert VECTORS.is_dir(), f"reference vectors not found at {VECTORS} (set CTFS_SHARED)"
    return VECTORS


@pytest.fixture(scope="session")
def ref_manifest(ref_vectors) -> dict:
    return json.loads((ref_vectors / "manifest.json").read_text())


def ref_keys(ref_vectors, keys_file):
    from ctfs.keys import KeySet
    return KeySet.load(ref_vectors / keys_file, insecure_perms=True)  # shared vectors are 0444


def jwk_pair(keyset):
    """(oct JWK, okp JWK) dicts of a KeySet, for the reference wheel's config."""
    keys = keyset.to_jwks()["keys"]
    return ([k for k in keys if k["kty"] == "oct"][0], [k for k in keys if k["kty"] == "okp"][0])


# The OpenBao fixtures live here so every module shares one session server.
from openbao import openbao_factory, openbao_server  # noqa: E402,F401
