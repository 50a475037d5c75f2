"""ctfs: the CryptoTensors filesystem.

Public API (everything else is private):

* :func:`safe_open` / :func:`load_file` read CryptoTensors files without a mount.
* :class:`KeySet` holds the JWK set that unlocks and verifies files.
* :func:`encrypt_path` writes CryptoTensors files (one file or a model directory).
* :mod:`ctfs.errors` holds every documented exception.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import CtfsError  # noqa: F401
