"""The CryptoTensors file format and nothing else: the container header, the crypto
metadata, AEAD and chunk maths, JWK keys, signing, the embedded policy field, the reader,
the writer, key rotation, and model directories. No FUSE, no threads of its own, no
storage beyond :mod:`ctfs.format.blob` (read these bytes at this offset). Imports nothing
from ctfs but :mod:`ctfs.errors`."""
