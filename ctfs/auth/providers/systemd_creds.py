"""``--key-provider systemd-creds``: the JWK set as a systemd credential.

A unit passes credentials with ``LoadCredential=ctfs-keys:/etc/ctfs/model.jwk`` or
``LoadCredentialEncrypted=ctfs-keys:/etc/credstore.encrypted/model.cred`` (sealed to the
TPM/host key with ``systemd-creds encrypt``); systemd decrypts it into a private, non-swappable
``$CREDENTIALS_DIRECTORY`` readable only by the service. ``--credential NAME`` (default
``ctfs-keys``) picks the credential. The same directory can hold a Vault token or AppRole
secret id for the vault provider (``--vault-token-credential`` /
``--vault-secret-id-credential``), see :func:`credential_path`.
"""
from __future__ import annotations

import os
import stat
from typing import Any

from ...format.keys import KeySet
from . import ProviderError

DEFAULT_CREDENTIAL = "ctfs-keys"
_MAX = 1 << 20


def credential_path(name: str) -> str:
    """Path of credential ``name`` in ``$CREDENTIALS_DIRECTORY``, with clear errors."""
    if not name or "/" in name or name in (".", ".."):
        raise ProviderError(f"invalid credential name {name!r}")
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise ProviderError(
            f"credential {name!r}: $CREDENTIALS_DIRECTORY is not set (run ctfs from a systemd "
            f"unit with LoadCredential={name}:PATH or LoadCredentialEncrypted={name}:PATH)")
    if not os.path.isdir(directory):
        raise ProviderError(f"credential {name!r}: $CREDENTIALS_DIRECTORY {directory} "
                            f"is not a directory")
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        try:
            have = sorted(os.listdir(directory))
        except OSError:
            have = []
        raise ProviderError(
            f"credential {name!r} not found in $CREDENTIALS_DIRECTORY {directory} "
            f"(available: {', '.join(have) or 'none'}); check the unit's "
            f"LoadCredential=/LoadCredentialEncrypted= lines")
    return path


def read_credential(name: str) -> bytes:
    path = credential_path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ProviderError(f"credential {name!r}: cannot open {path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ProviderError(f"credential {name!r}: {path} is not a regular file")
        data = os.read(fd, _MAX + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX:
        raise ProviderError(f"credential {name!r} is larger than 1 MiB")
    if not data.strip():
        raise ProviderError(f"credential {name!r} is empty")
    return data


class SystemdCredsProvider:
    """The JWK set in the systemd credential ``--credential NAME`` (default ctfs-keys)."""

    name = "systemd-creds"

    def __init__(self, credential: str | None = None, **_: Any):
        self.credential = credential or DEFAULT_CREDENTIAL

    def __repr__(self) -> str:
        return f"SystemdCredsProvider(credential={self.credential!r})"

    def load(self) -> KeySet:
        data = bytearray(read_credential(self.credential))
        try:
            return KeySet.from_json(bytes(data), source=f"credential {self.credential}")
        finally:
            data[:] = bytes(len(data))
