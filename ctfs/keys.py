"""Import path kept for users: the JWK key set lives in :mod:`ctfs.format.keys`."""
from .format.keys import KeySet, MasterKey, SigningKey, write_private_file  # noqa: F401

__all__ = ["KeySet", "MasterKey", "SigningKey", "write_private_file"]
