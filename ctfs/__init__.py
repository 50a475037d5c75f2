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
    "safe_open": "ctfs.api", "load_file": "ctfs.api", "KeySet": "ctfs.format.keys",
    "encrypt_path": "ctfs.format.modeldir", "EncryptOptions": "ctfs.format.writer",
    "CryptoFile": "ctfs.format.reader", "CtfsError": "ctfs.errors",
}
__all__ = sorted(_EXPORTS)


def _evaluate_policy(local_source: str, input_doc: dict | None):
    from .auth.policy import evaluate  # the Rego engine, started on first use
    return evaluate(local_source, input_doc)


# The composition root: the format layer cannot import the policy engine (it sits above it),
# so every reader in this process evaluates embedded policies through the engine wired here.
from .format import policyfield as _policyfield  # noqa: E402

_policyfield.set_evaluator(_evaluate_policy)


def __getattr__(name: str):
    """Lazy exports: ``import ctfs`` stays cheap for the CLI and the daemon."""
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ctfs' has no attribute {name!r}")
