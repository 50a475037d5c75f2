"""Key providers: where a mount gets the JWK set that unlocks its files.

A provider is a small object with a ``name``, ``load() -> KeySet`` and optionally
``check() -> None`` (re-check authorisation; raise :class:`ProviderDenied` on a definite
"no", :class:`ProviderUnavailable` when it cannot tell) and ``close()``. Providers are
found through the Python entry-point group ``ctfs.key_providers`` (a site can add its own);
the built-in ones are registered there by ctfs's own package metadata and are also
available without installation metadata.
"""
from __future__ import annotations

import os
from importlib import metadata
from typing import Any, Protocol

from ...errors import CtfsError, KeyFileError
from ...format.keys import KeySet

ENTRY_POINT_GROUP = "ctfs.key_providers"


class ProviderError(CtfsError):
    """The provider could not deliver keys."""


class ProviderDenied(ProviderError):
    """The key service said no (revoked, forbidden): lock."""


class ProviderUnavailable(ProviderError):
    """The key service could not be reached: keep serving, retry later."""


def _scrub_initial_environ(names: set[str]) -> None:
    """Zero ``NAME=value`` entries of ``names`` in this process's initial environment block
    (what ``/proc/<pid>/environ`` shows: unsetenv() alone leaves the strings there)."""
    import ctypes
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50, 51)
        if not 0 < start < end or end - start > 1 << 24:
            return
        block = ctypes.string_at(start, end - start)
    except (OSError, ValueError, IndexError):
        return
    pos = 0
    for entry in block.split(b"\0"):
        name = entry.partition(b"=")[0]
        if b"=" in entry and name.decode("utf-8", "replace") in names:
            value_at = start + pos + len(name) + 1
            ctypes.memset(value_at, 0, len(entry) - len(name) - 1)
        pos += len(entry) + 1


def forget_env(*names: str) -> dict[str, str]:
    """Remove ``names`` from the environment (children never inherit them, and
    ``/proc/self/environ`` no longer shows them); returns the values that were set."""
    found = {n: os.environ.pop(n) for n in names if n in os.environ}
    _scrub_initial_environ(set(names))
    return found


class KeyProvider(Protocol):
    name: str

    def load(self) -> KeySet: ...


class FileProvider:
    """``--key-file PATH``: a JWK set file, refused when group/other may read it."""

    name = "file"

    def __init__(self, key_file: str | None = None, insecure_perms: bool = False, **_: Any):
        if not key_file:
            raise ProviderError("the file key provider needs --key-file PATH")
        self.key_file = key_file
        self.insecure_perms = insecure_perms

    def load(self) -> KeySet:
        return KeySet.load(self.key_file, insecure_perms=self.insecure_perms)


class EnvProvider:
    """The JWK set in ``CRYPTOTENSOR_KEYS`` (the reference's variable, same JSON).

    The variable is removed from the process environment once read, so child processes
    never inherit it.
    """

    name = "env"
    variable = "CRYPTOTENSOR_KEYS"

    def __init__(self, **_: Any):
        self._value = forget_env(self.variable).get(self.variable)

    def load(self) -> KeySet:
        if not self._value:
            raise KeyFileError(f"{self.variable} is not set")
        return KeySet.from_json(self._value, source=f"${self.variable}")


BUILTIN: dict[str, str] = {
    "file": "ctfs.auth.providers:FileProvider",
    "env": "ctfs.auth.providers:EnvProvider",
    "vault": "ctfs.auth.providers.vault:VaultProvider",
    "systemd-creds": "ctfs.auth.providers.systemd_creds:SystemdCredsProvider",
}


def available() -> dict[str, str]:
    """Provider name -> "module:attr", entry points first, then the built-ins. ctfs's own
    entry points are the built-ins: those are taken from this code, never from installed
    metadata that may describe another version of it."""
    found = dict(BUILTIN)
    try:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if getattr(ep.dist, "name", None) == "ctfs" and ep.name in BUILTIN:
                continue
            found[ep.name] = ep.value
    except Exception:  # broken metadata of some other package must not break mounting
        pass
    return found


def provider_class(name: str) -> type:
    """The class of provider ``name`` (entry point or built-in)."""
    target = available().get(name)
    if target is None:
        raise ProviderError(f"unknown key provider {name!r} (available: {', '.join(sorted(available()))})")
    module, _, attr = target.partition(":")
    import importlib
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ProviderError(f"key provider {name!r} cannot be loaded: {e}") from None


def get_provider(name: str, **options: Any):
    """Instantiate provider ``name`` with the given options."""
    return provider_class(name)(**options)
