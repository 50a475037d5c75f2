"""The plaintext view a mount serves: each file's view, the tree, the chunk cache, the FUSE
operations, the direct-reply path and the daemon's lifecycle. Reads ciphertext only through
:mod:`ctfs.storage`."""
