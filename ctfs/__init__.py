"""ctfs: the CryptoTensors filesystem.

Public API (everything else is private):

* :func:`safe_open` / :func:`load_file` read CryptoTensors files without a mount.
* :class:`KeySet` holds the JWK set that unlocks and verifies files.
* :func:`encrypt_path` writes CryptoTensors files (one file or a model directory).
* :mod:`ctfs.errors` holds every documented exception.
"""
from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "safe_open": "ctfs.api", "load_file": "ctfs.api", "KeySet": "ctfs.keys",
    "encrypt_path": "ctfs.modeldir", "EncryptOptions": "ctfs.writer", "CryptoFile": "ctfs.reader",
    "CtfsError": "ctfs.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Lazy exports: ``import ctfs`` stays cheap for the CLI and the daemon."""
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ctfs' has no attribute {name!r}")
