"""What a mount serves: a store's tree with every CryptoTensors file shown as plain safetensors.

Everything is decided when the tree is built (at mount time): each encrypted file is opened
with :class:`~ctfs.format.reader.CryptoFile`, which verifies its signature, evaluates its
policy and unwraps its data keys, so a read can only fail if the stored bytes change
afterwards. Bytes come only through the store (:mod:`ctfs.storage`). This module has no FUSE
dependency; :mod:`ctfs.mount.fuse_ops` calls it.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable

from ..errors import CtfsError, IntegrityError
from ..format.cryptometa import ENCRYPTION
from ..format.header import read_header_blob
from ..format.keys import KeySet
from ..format.modeldir import TENSOR_SUFFIXES
from ..format.reader import CryptoFile
from ..storage import Entry, Store, open_store
from .view import PlainView

log = logging.getLogger("ctfs.tree")


class MountRefused(CtfsError):
    """The source cannot be served; the message names the file and the reason."""


@dataclass
class Node:
    kind: str          # "dir" | "file"
    size: int = 0
    mtime: float = 0.0
    mode: int = 0o555
    real: str | None = None        # passthrough files: the entry in the store
    view: PlainView | None = None  # CryptoTensors files


def view_name(name: str) -> str:
    return name[: -len(".cryptotensors")] + ".safetensors" if name.endswith(".cryptotensors") else name


class MountTree:
    """The read-only tree of one mount.

    ``src``: a :class:`ctfs.storage.Store`, or a local directory. ``access(uid, gid) ->
    bool`` decides who may open files (None: everybody the kernel lets through).
    ``policy_input(file_name) -> dict`` gives the policy's input document.
    """

    def __init__(self, src: Store | str, keys: KeySet, cache, *, allow_plain: bool = False,
                 allow_unverified_plain: bool = False, source_io: str = "auto",
                 access: Callable[[int, int], bool] | None = None,
                 policy_input: Callable[[str], dict] | None = None,
                 progress: Callable[[str], None] | None = None):
        self.store = open_store(src) if isinstance(src, (str, os.PathLike)) else src
        self.src = self.store.url
        self.cache = cache
        self.access = access
        self._opts = dict(allow_plain=allow_plain, allow_unverified_plain=allow_unverified_plain,
                          source_io=source_io)
        self._policy_input = policy_input
        self._progress = progress
        self._nodes: dict[str, Node] = {}
        self._children: dict[str, list[str]] = {}
        self._handles: dict[int, tuple] = {}
        self._next_fh = itertools.count(1)
        self._lock = threading.Lock()
        self.locked = False
        self.integrity_failures = 0
        # set by the FUSE layer: drops the kernel's cached pages of the given paths
        self._kernel_invalidator: Callable[[list[str]], dict] | None = None
        self.last_invalidation: dict | None = None
        try:
            root = self.store.stat("")
        except OSError:
            root = None
        if root is None or root.kind != "dir":
            raise MountRefused(f"{src}: not a directory")
        self._build(keys)

    # --- building ------------------------------------------------------------------
    def _build(self, keys: KeySet) -> None:
        nodes: dict[str, Node] = {}
        children: dict[str, list[str]] = {}
        opened: list[CryptoFile] = []
        try:
            for e in self.store.walk():
                if not e.path:
                    nodes["/"], children["/"] = Node("dir", mtime=e.mtime), []
                    continue
                vdir, _, name = ("/" + e.path).rpartition("/")
                vdir = vdir or "/"
                if e.kind == "dir":
                    vp = _join(vdir, name)
                    nodes[vp], children[vp] = Node("dir", mtime=e.mtime), []
                    children[vdir].append(name)
                    continue
                node = self._file_node(e, keys, opened)
                if node is None:
                    continue
                name = view_name(name)
                vp = _join(vdir, name)
                if vp in nodes:
                    raise MountRefused(f"{self.store.locate(e.path)}: its view name {vp} collides "
                                       f"with another file")
                nodes[vp] = node
                children[vdir].append(name)
        except BaseException as e:
            for cf in opened:
                cf.close()
            if isinstance(e, OSError):  # the store could not list or stat an entry
                raise MountRefused(f"{e.filename or self.src}: {e.strerror or e}") from None
            raise
        self._nodes, self._children = nodes, children
        self.files = opened

    def _file_node(self, e: Entry, keys: KeySet, opened: list) -> Node | None:
        if e.kind != "file":
            return None  # sockets, fifos, devices: not served
        path = self.store.locate(e.path)
        if not path.endswith(TENSOR_SUFFIXES):
            return Node("file", e.size, e.mtime, 0o444, real=e.path)
        blob = None
        try:
            blob = self.store.open(e.path, self._opts["source_io"])
            hdr = read_header_blob(blob, named=False)
            if ENCRYPTION not in (hdr.metadata or {}):
                if not self._opts["allow_plain"]:
                    raise MountRefused(
                        f"{path}: a plain (unencrypted) safetensors file in an encrypted model "
                        f"directory; refusing to serve it (pass --allow-plain to serve it as is)")
                blob.close()
                return Node("file", e.size, e.mtime, 0o444, real=e.path)
            if self._progress:
                self._progress(path)
            policy_input = self._policy_input(path) if self._policy_input else None
            cf = CryptoFile(blob, keys, allow_unverified_plain=self._opts["allow_unverified_plain"],
                            policy_input=policy_input)
            blob = None  # the CryptoFile owns it now
        except MountRefused:
            raise
        except CtfsError as err:
            raise MountRefused(f"{path}: {err}") from None
        except OSError as err:
            raise MountRefused(f"{path}: {err.strerror or err}") from None
        finally:
            if blob is not None:
                blob.close()
        opened.append(cf)
        view = PlainView(cf)
        return Node("file", view.size, e.mtime, 0o444, view=view)

    # --- Tree protocol (called by the FUSE layer) ----------------------------------
    def lookup(self, path: str) -> Node | None:
        return self._nodes.get(path)

    def listdir(self, path: str) -> list[str]:
        if path not in self._children:
            raise OSError(errno.ENOTDIR if path in self._nodes else errno.ENOENT, path)
        return list(self._children[path])

    def open(self, path: str, uid: int, gid: int, pid: int) -> int:
        node = self._nodes.get(path)
        if node is None:
            raise OSError(errno.ENOENT, path)
        if node.kind != "file":
            raise OSError(errno.EISDIR, path)
        if self.locked:
            log.warning("open refused (mount locked): %s by uid=%d pid=%d", path, uid, pid)
            raise PermissionError(errno.EACCES, "mount is locked")
        if self.access is not None and not self.access(uid, gid):
            log.warning("open refused: %s by uid=%d gid=%d pid=%d not allowed", path, uid, gid, pid)
            raise PermissionError(errno.EACCES, "not allowed")
        fh = next(self._next_fh)
        if node.view is not None:
            self._handles[fh] = ("view", node.view, path)
        else:
            self._handles[fh] = ("real", self.store.open(node.real, "buffered"), path)
        return fh

    def _readable(self, fh: int) -> tuple[str, object, str]:
        try:
            entry = self._handles[fh]
        except KeyError:
            raise OSError(errno.EBADF, "bad file handle") from None
        if self.locked:
            raise PermissionError(errno.EACCES, "mount is locked")
        return entry

    @contextlib.contextmanager
    def _eio_on_integrity_failure(self):
        try:
            yield
        except IntegrityError as e:
            self.integrity_failures += 1
            log.error("integrity failure, returning EIO: file=%s tensor=%s chunk=%s: %s",
                      e.path, e.tensor, e.chunk, e)
            raise OSError(errno.EIO, "integrity failure") from None

    def read_into(self, fh: int, offset: int, out: memoryview) -> int:
        kind, obj, path = self._readable(fh)
        if kind == "real":
            return obj.pread_into(out, offset)
        view = self._nodes[path].view  # looked up per read: unlock installs fresh views
        with self._eio_on_integrity_failure():
            return view.read_into(offset, out, self.cache, id(view))

    def read_pinned(self, fh: int, offset: int, n: int, consume, rest=None):
        """Hand ``consume`` the plaintext of [offset, offset+n) as pinned views of the chunk
        cache (see ``ChunkCache.read_pinned``); None where that does not apply (pass-through
        files, the header, ranges over many chunks): use ``read_into`` then.
        ``rest(path, file_size, offset, views)``: plaintext of the file at ``offset``
        that the reader did not ask for (``ChunkCache.read_pinned``), true where it went
        to the page cache; never called once the mount is locked."""
        kind, obj, path = self._readable(fh)
        if kind == "real" or self.cache is None:
            return None
        view = self._nodes[path].view
        fill = None
        if rest is not None:
            def fill(off, views):
                return not self.locked and rest(path, view.size, off, views)
        with self._eio_on_integrity_failure():
            return view.read_pinned(offset, n, consume, self.cache, id(view), rest=fill)

    def release(self, fh: int) -> None:
        entry = self._handles.pop(fh, None)
        if entry and entry[0] == "real":
            entry[1].close()

    def statfs(self) -> dict | None:
        return None

    def open_handles(self) -> int:
        return len(self._handles)

    # --- lifecycle -----------------------------------------------------------------
    def set_kernel_invalidator(self, fn: Callable[[list[str]], dict] | None) -> None:
        """Called by the FUSE layer with a function dropping the kernel's page cache."""
        self._kernel_invalidator = fn

    def lock(self) -> None:
        """Refuse further opens/reads and drop every key and cached plaintext: our cache,
        the data keys, and the kernel's cached pages of our files (with keep_cache they
        would otherwise keep being served without a read ever reaching us)."""
        self.locked = True  # first: nothing read from now on can refill the page cache
        if self._kernel_invalidator is not None:
            paths = [p for p, n in self._nodes.items() if n.kind == "file"]
            try:
                self.last_invalidation = self._kernel_invalidator(paths)
            except Exception:  # noqa: BLE001 - locking must go on regardless
                log.exception("kernel page cache invalidation failed")
                self.last_invalidation = {"method": "error", "files": len(paths),
                                          "invalidated": 0, "not_cached": 0, "failed": len(paths)}
        self.cache.wipe()
        for cf in self.files:
            cf.close()

    def reauthorise(self, keys: KeySet) -> None:
        """Re-open every encrypted file with fresh keys (after a lock); the tree's shape
        must not have changed, otherwise the mount stays locked."""
        old = self._nodes
        self._build(keys)
        if {p: (n.kind, n.size) for p, n in old.items()} != \
                {p: (n.kind, n.size) for p, n in self._nodes.items()}:
            self.lock()
            raise MountRefused(f"{self.src}: the source changed while locked; remount it")
        self.locked = False

    def close(self) -> None:
        self.locked = True
        for kind, obj, _ in list(self._handles.values()):
            if kind == "real":
                obj.close()
        self._handles.clear()
        self.cache.wipe()
        for cf in self.files:
            cf.close()


def _join(d: str, name: str) -> str:
    return "/" + name if d == "/" else f"{d}/{name}"
