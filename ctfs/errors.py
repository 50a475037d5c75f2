"""The documented exceptions of ctfs.

Every failure the library reports on bad input is one of these; anything else escaping
is a bug. The CLI turns them into a one-line message and a non-zero exit.

    CtfsError
    ├── FormatError                 the safetensors container is malformed
    │   ├── HeaderTooSmallError
    │   ├── HeaderTooLargeError
    │   ├── InvalidHeaderError      not UTF-8 / not JSON / wrong shapes of values
    │   ├── InvalidTensorInfoError  unknown dtype, offsets that do not add up
    │   └── FileLengthError         file shorter or longer than the header says
    ├── CryptoMetadataError         __crypto_keys__ / __encryption__ / __policy__ malformed
    │   ├── UnsupportedVersionError
    │   └── UnknownAlgorithmError
    ├── NotEncryptedError           caller expected an encrypted file, got a plain one
    ├── UnverifiedPlaintextError    plain tensors no signed digest covers (opt-in only)
    ├── KeyMaterialError            KeyNotFoundError (names the kid), WrongKeyError, KeyFileError
    ├── SignatureError              Ed25519 signature missing or wrong
    ├── PolicyError                 the embedded policy denied or could not be evaluated
    └── IntegrityError              AEAD tag or plain-tensor digest mismatch (bytes never returned)
"""
from __future__ import annotations


class CtfsError(Exception):
    """Base class of every error ctfs raises on purpose."""


class FormatError(CtfsError):
    """The file is not a valid safetensors container."""


class HeaderTooSmallError(FormatError):
    pass


class HeaderTooLargeError(FormatError):
    pass


class InvalidHeaderError(FormatError):
    pass


class InvalidTensorInfoError(FormatError):
    pass


class FileLengthError(FormatError):
    pass


class CryptoMetadataError(CtfsError):
    """The crypto metadata inside __metadata__ is malformed."""


class UnsupportedVersionError(CryptoMetadataError):
    pass


class UnknownAlgorithmError(CryptoMetadataError):
    pass


class NotEncryptedError(CtfsError):
    """The file carries no __encryption__ although the caller expects an encrypted file."""


class UnverifiedPlaintextError(CtfsError):
    """Unencrypted tensors carry no signed digest, so their bytes cannot be authenticated."""


class KeyMaterialError(CtfsError):
    """Base class of key problems."""


class KeyNotFoundError(KeyMaterialError):
    """No key with the kid the file names; ``kid`` holds it."""

    def __init__(self, message: str, kid: str | None = None):
        super().__init__(message)
        self.kid = kid


class WrongKeyError(KeyMaterialError):
    """A key with the right kid did not unwrap the data keys (wrong master key)."""


class KeyFileError(KeyMaterialError):
    """A key file or JWK set is unreadable, malformed or has unsafe permissions."""


class SignatureError(CtfsError):
    """The header signature is missing or does not verify."""


class PolicyError(CtfsError):
    """The embedded access policy denied access or could not be evaluated."""


class IntegrityError(CtfsError):
    """Authenticated decryption or a plain-tensor digest failed: the bytes are not served.

    ``path``, ``tensor`` and ``chunk`` say where.
    """

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None,
                 chunk: int | None = None):
        super().__init__(message)
        self.path = path
        self.tensor = tensor
        self.chunk = chunk
