"""Thin mfusepy ``Operations`` serving a read-only tree (libfuse3 high-level API).

The tree (see the protocol below) owns everything interesting: what exists, who may open
it and how bytes are produced. This module only translates FUSE callbacks:

* every error becomes an errno via :class:`mfusepy.FuseOSError`; ``PermissionError`` ->
  EACCES, ``OSError`` -> its errno, anything unexpected -> EIO (logged on
  ``ctfs.fuse``); the daemon never dies of a callback;
* the file system is read-only: every mutating call -> EROFS (the mount is also ``ro``);
* ``read`` answers from the tree's memory where it can: with ``Tree.read_pinned``
  (optional) the tree hands over views of its decrypted chunks, and
  :class:`ctfs.mount.fuse_reply.DirectReplier` writes the reply to ``/dev/fuse`` from them
  (``fuse_reply="auto"``); otherwise, and for ``fuse_reply="copy"``, :class:`CtfsFUSE`
  hands ``Tree.read_into`` a ``memoryview`` over libfuse's reply buffer
  (``PyMemoryView_FromMemory``), so no bytes object is allocated per request;
* ``open`` sets ``fi.keep_cache`` (page cache kept between opens, mmap works) or, in
  ``direct_io`` mode, ``fi.direct_io`` (MAP_PRIVATE still works; MAP_SHARED needs
  FUSE_DIRECT_IO_ALLOW_MMAP, which libfuse 3.14 cannot negotiate -> ENODEV);
* :meth:`CtfsOperations.invalidate_kernel_cache` drops the kernel's cached pages of
  files (used when a mount is locked: with keep_cache, cached pages would otherwise keep
  being served without ever reaching the daemon). It calls libfuse's
  ``fuse_invalidate_path`` (FUSE_NOTIFY_INVAL_INODE for the whole file: page cache
  *and* mmapped pages, which are unmapped and fault back in through the daemon) with
  the ``struct fuse *`` captured during ``init``. Fallback, when that is unusable: the
  daemon opens each file through the mount itself and ``open`` answers without
  FOPEN_KEEP_CACHE, which makes the kernel run ``invalidate_inode_pages2`` on the file,
  then ``posix_fadvise(DONTNEED)``; this needs the daemon to reach its mountpoint.
  Either way mapped pages are unmapped too (a later touch faults, the read is refused:
  SIGBUS). Not recallable: bytes a process already copied into its own memory
  (including written-to MAP_PRIVATE copies). fadvise alone would not drop mapped pages.

Tree protocol (implemented by the core)::

    class Node:  kind: "dir" | "file"; size: int; mtime: float; mode: int
    class Tree(Protocol):
        def lookup(self, path) -> Node | None
        def listdir(self, path) -> list[str]
        def open(self, path, uid, gid, pid) -> int
        def read_into(self, fh, offset, out: memoryview) -> int
        def read_pinned(self, fh, offset, size, consume) -> Any   # optional
        def release(self, fh) -> None
        def statfs(self) -> dict | None          # optional

No state is kept in ``threading.local``: libfuse calls back on its own threads and each
callback gets a fresh Python thread state.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import stat
import sys
import threading
from typing import Any, Callable, Optional

from .mountinfo import find_mount

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _takes(fn, name: str) -> bool:
    import inspect
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False

log = logging.getLogger("ctfs.fuse")


#: mfusepy releases whose glue ctfs builds on (``FUSE.read``'s arguments, ``init_with_config``);
#: pyproject.toml pins the same range.
MFUSEPY_RANGE = ((3, 0), (4, 0))


def _load_mfusepy():
    """Import mfusepy bound to libfuse3 (it would pick libfuse2 first, capped at 128 KiB);
    (the module, the libfuse3 library name it loaded)."""
    lib = os.environ.get("FUSE_LIBRARY_PATH") or ctypes.util.find_library("fuse3") or "libfuse3.so.3"
    if "mfusepy" not in sys.modules and not os.environ.get("FUSE_LIBRARY_PATH"):
        os.environ["FUSE_LIBRARY_PATH"] = lib
        try:
            import mfusepy as m
        finally:
            os.environ.pop("FUSE_LIBRARY_PATH", None)
    else:
        import mfusepy as m
    if m.fuse_version_major != 3:
        raise ImportError(
            f"ctfs needs libfuse3 but mfusepy loaded libfuse {m.fuse_version_major}."
            f"{m.fuse_version_minor}; import ctfs.mount.fuse_ops before mfusepy or set "
            "FUSE_LIBRARY_PATH=libfuse3.so.3"
        )
    check_mfusepy(m)
    return m, lib


def check_mfusepy(m) -> None:
    """ImportError naming the fix unless mfusepy is a release ctfs was built against."""
    import importlib.metadata as md
    import inspect
    try:
        version = md.version("mfusepy")
    except md.PackageNotFoundError:
        version = getattr(m, "__version__", "unknown")
    lo, hi = MFUSEPY_RANGE
    try:
        parts = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        parts = None
    params = list(inspect.signature(m.FUSE.read).parameters) if hasattr(m, "FUSE") else []
    if parts is None or not lo <= parts < hi or params != ["self", "path", "buf", "size", "offset", "fip"] \
            or not hasattr(m.Operations, "init_with_config"):
        raise ImportError(
            f"ctfs needs mfusepy >={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]} (found {version}, whose FUSE.read "
            f"takes {params}); install it with: pip install 'mfusepy>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}'")


mfusepy, LIBFUSE_NAME = _load_mfusepy()
#: our own handle on the libfuse3 mfusepy loaded (dlopen gives the same library; our
#: argtypes/restypes do not touch mfusepy's)
LIBFUSE = ctypes.CDLL(LIBFUSE_NAME)
LIBFUSE.fuse_get_context.restype, LIBFUSE.fuse_get_context.argtypes = ctypes.c_void_p, ()
FuseOSError = mfusepy.FuseOSError
_FUSE_CAP_AUTO_INVAL_DATA = 1 << 12  # fuse_common.h
FUSE_VERSION = (mfusepy.fuse_version_major, mfusepy.fuse_version_minor)

# -- libfuse's own messages -> logging ("ctfs.fuse") -------------------------------------

_LOG_FUNC_T = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_log_func_ref = None  # keeps the ctypes callback alive
last_libfuse_error: Optional[str] = None
# libfuse 3.14's fuse_main_real passes an unset max_threads and complains; harmless.
_LIBFUSE_NOISE = ("Ignoring invalid max threads value",)


def install_libfuse_logger() -> bool:
    """Route libfuse's fuse_log() messages (normally raw stderr) to ``ctfs.fuse``."""
    global _log_func_ref
    if _log_func_ref is not None:
        return True
    try:
        libfuse = LIBFUSE
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        vsnprintf = libc.vsnprintf
        vsnprintf.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p)
        vsnprintf.restype = ctypes.c_int
        set_log_func = libfuse.fuse_set_log_func
        set_log_func.argtypes = (_LOG_FUNC_T,)
        set_log_func.restype = None
    except (AttributeError, OSError):
        return False

    def log_func(level, fmt, ap):  # va_list arrives as a pointer on x86-64 and arm64
        global last_libfuse_error
        try:
            buf = ctypes.create_string_buffer(1024)
            vsnprintf(buf, len(buf), fmt, ap)
            msg = buf.value.decode("utf-8", "replace").strip()
            if not msg:
                return
            if msg.startswith(_LIBFUSE_NOISE):
                log.debug("libfuse: %s", msg)
            elif level <= 3:  # EMERG..ERR
                last_libfuse_error = msg
                log.error("libfuse: %s", msg)
            elif level == 4:
                log.warning("libfuse: %s", msg)
            else:
                log.debug("libfuse: %s", msg)
        except Exception:  # noqa: BLE001 - never raise into C
            pass

    _log_func_ref = _LOG_FUNC_T(log_func)
    set_log_func(_log_func_ref)
    return True


_PyBUF_WRITE = 0x200
_memview_from_memory = ctypes.pythonapi.PyMemoryView_FromMemory
_memview_from_memory.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_memview_from_memory.restype = ctypes.py_object

_ACCMODE = os.O_ACCMODE
_WRITE_FLAGS = os.O_TRUNC | os.O_CREAT | getattr(os, "O_APPEND", 0)
# st_blksize reported for files: Python's open() sizes its buffer from it; 1 MiB matches
# the largest FUSE read request.
_BLKSIZE = 1 << 20


def _fh_of(fi: Any) -> int:
    """``fi`` is a fuse_file_info (raw_fi=True) or already the fh integer."""
    return fi if isinstance(fi, int) else fi.fh


def _guard(fn: Callable) -> Callable:
    """Map every exception of a callback to a FuseOSError (EIO for the unexpected)."""

    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(self, *args):
        try:
            return fn(self, *args)
        except FuseOSError:
            raise
        except PermissionError:
            raise FuseOSError(errno.EACCES) from None
        except OSError as e:
            if isinstance(e.errno, int) and e.errno > 0:
                raise FuseOSError(e.errno) from None
            log.error("%s%r raised OSError without errno: %r -> EIO", name, args[:1], e)
            raise FuseOSError(errno.EIO) from None
        except Exception:  # noqa: BLE001 - the daemon must survive any tree bug
            log.exception("unexpected error in FUSE %s%r -> EIO", name, args[:1])
            raise FuseOSError(errno.EIO) from None

    return wrapper


def _erofs(self, *args, **kwargs):
    raise FuseOSError(errno.EROFS)


class CtfsOperations(mfusepy.Operations):
    """Read-only FUSE operations over a ``Tree``.

    Meant for ``FUSE(ops, mountpoint, raw_fi=True, ...)``; :class:`CtfsFUSE` (used by
    ``ctfs.mount.mountd``) additionally routes ``read`` to :meth:`read_into_address`.
    """

    use_ns = True  # st_*time given as int nanoseconds

    def __init__(
        self,
        tree,
        *,
        direct_io: bool = False,
        keep_cache: bool = True,
        uid: Optional[int] = None,
        gid: Optional[int] = None,
        attr_timeout: Optional[float] = None,
        entry_timeout: Optional[float] = None,
        negative_timeout: Optional[float] = None,
        max_background: int = 64,
        congestion_threshold: int = 48,
        on_init: Optional[Callable[[], None]] = None,
        fuse_reply: str = "auto",
    ) -> None:
        self.tree = tree
        self.direct_io = bool(direct_io)
        self.keep_cache = bool(keep_cache)
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        # A tree with an access list (``--allow-uid/--allow-gid``: an allow_other mount)
        # has every lookup, stat and listing checked like an open, so the kernel must not
        # answer them from its caches: timeouts default to 0 there, to 60 s (1 s for
        # negative entries) otherwise.
        self._allowed = getattr(tree, "access", None)
        checked = self._allowed is not None
        self.attr_timeout = (0.0 if checked else 60.0) if attr_timeout is None else attr_timeout
        self.entry_timeout = (0.0 if checked else 60.0) if entry_timeout is None else entry_timeout
        self.negative_timeout = (0.0 if checked else 1.0) if negative_timeout is None else negative_timeout
        self._refused_uids: set[int] = set()
        self.max_background = max_background
        self.congestion_threshold = congestion_threshold
        self.on_init = on_init
        # Observability (racy increments are fine: diagnostics only).
        self.max_read_request = 0
        self.read_requests = 0
        self.conn_info: dict[str, int] = {}
        # Kernel page-cache invalidation (see invalidate_kernel_cache).
        self.mountpoint: Optional[str] = None   # set by mountd.serve (fallback needs it)
        self.fuse_ptr: Optional[int] = None     # struct fuse *, valid from init to destroy
        from .fuse_reply import MODES as reply_modes
        if fuse_reply not in reply_modes:
            raise ValueError(f"fuse_reply must be one of {', '.join(reply_modes)}, not {fuse_reply!r}")
        self.fuse_reply = fuse_reply            # "auto": direct replies (ctfs.mount.fuse_reply)
        self.replier = None                     # its DirectReplier, from init to destroy
        self._read_pinned = getattr(tree, "read_pinned", None)  # optional in the protocol
        self._pinned_rest = self._read_pinned is not None and _takes(self._read_pinned, "rest")
        # Page-cache fill (see _fill): tree path -> the kernel's node id of the file, learnt
        # by a stat through the mount (libfuse reports node ids as st_ino: use_ino off).
        self._fill_ok = False                   # use_ino is off (set in init) and not direct_io
        self._nodeids: dict[str, int] = {}
        self._resolving: set[str] = set()
        self._nodeid_lock = threading.Lock()
        self._mnt_dev: Optional[int] = None
        self._inval_lock = threading.Lock()
        self._inval_tids: set[int] = set()      # daemon threads opening for invalidation
        register = getattr(tree, "set_kernel_invalidator", None)
        if register is not None:
            register(self.invalidate_kernel_cache)

    # -- lifecycle -------------------------------------------------------------------

    def init_with_config(self, conn, config) -> None:
        # Must not raise: mfusepy re-raises exceptions from init into libfuse.
        try:
            if conn is not None:
                # The view's attributes never change while mounted (sizes and times are
                # fixed when the tree is built; ctfs drops the kernel's pages itself when
                # it must), so the kernel's auto_inval_data would only add a GETATTR round
                # trip to reads whenever attributes are stale: every read on access-list
                # mounts, whose attribute timeout is 0.
                conn.want = int(conn.want) & ~_FUSE_CAP_AUTO_INVAL_DATA
                if self.max_background:
                    conn.max_background = max(int(conn.max_background), self.max_background)
                if self.congestion_threshold:
                    conn.congestion_threshold = max(
                        int(conn.congestion_threshold), self.congestion_threshold
                    )
                self.conn_info = {
                    k: int(getattr(conn, k))
                    for k in (
                        "proto_major", "proto_minor", "max_write", "max_read", "max_readahead",
                        "capable", "want", "max_background", "congestion_threshold",
                    )
                    if hasattr(conn, k)
                }
                log.debug("FUSE init: %s", self.conn_info)
            if config is not None:
                config.attr_timeout = float(self.attr_timeout)
                config.entry_timeout = float(self.entry_timeout)
                config.negative_timeout = float(self.negative_timeout)
                config.use_ino = 0
                self._fill_ok = self.keep_cache and not self.direct_io
        except Exception:  # noqa: BLE001
            log.exception("FUSE init tuning failed (continuing with defaults)")
        ptr = None
        try:  # libfuse sets the context (with our struct fuse *) around init
            ctx = LIBFUSE.fuse_get_context()  # struct fuse_context *; .fuse comes first
            ptr = ctypes.c_void_p.from_address(ctx).value if ctx else None
        except Exception:  # noqa: BLE001
            log.exception("could not capture the libfuse handle (invalidation falls back, "
                          "reads copy through libfuse)")
        if os.environ.get("CTFS_KERNEL_INVALIDATE") != "open":  # "open": test the fallback
            with self._inval_lock:
                self.fuse_ptr = ptr
        if self.fuse_reply == "auto" and self.replier is None and not ptr:
            log.warning("direct FUSE replies unavailable (no struct fuse); reads copy through libfuse")
        elif self.fuse_reply == "auto" and self.replier is None:
            try:
                from .fuse_reply import DirectReplier
                self.replier = DirectReplier.for_fuse(LIBFUSE, ptr)
            except Exception as e:  # noqa: BLE001
                log.warning("direct FUSE replies unavailable (%s); reads copy through libfuse", e)
        if self.on_init is not None:
            try:
                self.on_init()
            except Exception:  # noqa: BLE001
                log.exception("on_init callback failed")

    def destroy(self, path: str) -> None:
        with self._inval_lock:  # struct fuse is freed after this returns
            self.fuse_ptr = None
        if self.replier is not None:
            self.replier.close()  # the session is gone; its counters stay readable
        log.debug("FUSE destroy (max read request %d bytes, %d reads)",
                  self.max_read_request, self.read_requests)

    def reply_stats(self) -> dict:
        """How reads are answered: ``fuse_reply`` "direct" (``ctfs.mount.fuse_reply``) or
        "copy", replies written directly so far, and why direct replies are off, if so."""
        r = self.replier
        out = {"fuse_reply": "direct" if r is not None and r.enabled else "copy",
               "direct_replies": r.replies if r is not None else 0,
               "page_cache_stores": r.stores if r is not None else 0,
               "page_cache_stored_bytes": r.stored_bytes if r is not None else 0}
        if r is not None and r.why_off:
            out["fuse_reply_off"] = r.why_off
        return out

    # -- metadata --------------------------------------------------------------------

    def _check_caller(self, what: str, path: str) -> None:
        """With an access list, a caller not on it gets EACCES for metadata too (stat,
        lookup, listing, access(2), statfs), as for open: not even names leak. The
        first refusal per uid is logged; opens are logged by the tree every time."""
        if self._allowed is None:
            return
        uid, gid, pid = mfusepy.fuse_get_context()
        if self._allowed(uid, gid):
            return
        if uid not in self._refused_uids:
            self._refused_uids.add(uid)
            log.warning("%s refused: %s by uid=%d gid=%d pid=%d not allowed (further metadata "
                        "refusals for this uid are not logged)", what, path, uid, gid, pid)
        raise FuseOSError(errno.EACCES)

    def _node(self, path: str):
        node = self.tree.lookup(path)
        if node is None:
            raise FuseOSError(errno.ENOENT)
        return node

    def _attrs(self, node) -> dict[str, Any]:
        ns = int(float(node.mtime) * 1e9)
        if node.kind == "dir":
            mode, nlink, size = stat.S_IFDIR | (node.mode & 0o7777), 2, 0
        else:
            mode, nlink, size = stat.S_IFREG | (node.mode & 0o7777), 1, int(node.size)
        return {
            "st_mode": mode,
            "st_nlink": nlink,
            "st_size": size,
            "st_blocks": (size + 511) // 512,
            "st_blksize": _BLKSIZE,
            "st_uid": self.uid,
            "st_gid": self.gid,
            "st_atime": ns,
            "st_mtime": ns,
            "st_ctime": ns,
        }

    @_guard
    def getattr(self, path: str, fh=None) -> dict[str, Any]:
        self._check_caller("stat", path)
        return self._attrs(self._node(path))

    @_guard
    def access(self, path: str, amode: int) -> int:
        self._check_caller("access", path)
        self._node(path)
        if amode & os.W_OK:
            raise FuseOSError(errno.EROFS)
        return 0

    @_guard
    def opendir(self, path: str) -> int:
        self._check_caller("opendir", path)
        if self._node(path).kind != "dir":
            raise FuseOSError(errno.ENOTDIR)
        return 0

    @_guard
    def readdir(self, path: str, fh) -> list:
        self._check_caller("readdir", path)
        if self._node(path).kind != "dir":
            raise FuseOSError(errno.ENOTDIR)
        out: list = [".", ".."]
        base = path.rstrip("/")
        for name in self.tree.listdir(path):
            child = self.tree.lookup(f"{base}/{name}")
            if child is None:
                continue
            out.append((name, {"st_mode": stat.S_IFDIR if child.kind == "dir" else stat.S_IFREG}, 0))
        return out

    @_guard
    def releasedir(self, path: str, fh) -> int:
        return 0

    @_guard
    def statfs(self, path: str) -> dict[str, int]:
        self._check_caller("statfs", path)
        res = None
        fn = getattr(self.tree, "statfs", None)
        if fn is not None:
            res = fn()
        out = {"f_bsize": _BLKSIZE, "f_frsize": 4096, "f_namemax": 255}
        if res:
            out.update(res)
        return out

    # -- files -----------------------------------------------------------------------

    @_guard
    def open(self, path: str, fi) -> int:
        raw = not isinstance(fi, int)
        flags = fi.flags if raw else fi
        if (flags & _ACCMODE) != os.O_RDONLY or flags & _WRITE_FLAGS:
            raise FuseOSError(errno.EROFS)
        node = self._node(path)
        if node.kind == "dir":
            raise FuseOSError(errno.EISDIR)
        uid, gid, pid = mfusepy.fuse_get_context()
        if raw and pid in self._inval_tids and uid == os.geteuid():
            # the daemon's own invalidation open (pid is the caller's thread id): no handle,
            # no FOPEN_KEEP_CACHE, so the kernel drops the file's cached pages
            fi.fh = 0
            fi.direct_io = 0
            fi.keep_cache = 0
            return 0
        fh = int(self.tree.open(path, uid, gid, pid))
        if self._fill_ok and path not in self._nodeids:
            self._resolve_nodeid(path)  # ready before the first random read, usually
        if not raw:
            return fh
        fi.fh = fh
        fi.direct_io = 1 if self.direct_io else 0
        fi.keep_cache = 1 if (self.keep_cache and not self.direct_io) else 0
        return 0

    def read_into_address(self, address: int, size: int, offset: int, fh: int) -> int:
        """Fill the C buffer at ``address`` (``size`` bytes) from the tree; return count."""
        if size <= 0:
            return 0
        self.read_requests += 1
        if size > self.max_read_request:
            self.max_read_request = size
            log.debug("largest FUSE read request so far: %d bytes", size)
        mv = _memview_from_memory(address, size, _PyBUF_WRITE)
        try:
            n = self._read_into(fh, offset, mv)
        finally:
            try:
                mv.release()
            except BufferError:  # tree kept an export of the C buffer: a tree bug
                log.error("Tree.read_into kept a reference to the FUSE buffer")
        return n

    @_guard
    def read_direct(self, fh: int, offset: int, size: int) -> Optional[bool]:
        """Answer the read being served by writing its reply from the chunk cache
        (``ctfs.mount.fuse_reply``). True: answered, libfuse must get 0 bytes; None: not
        applicable or direct replies are off, fill libfuse's buffer instead."""
        rep, pinned = self.replier, self._read_pinned
        if rep is None or pinned is None or size <= 0:
            return None
        unique = rep.unique()
        if unique is None:
            return None
        sent = pinned(fh, offset, size, lambda views: rep.send(unique, views),
                      **({"rest": self._fill} if self._fill_ok and self._pinned_rest else {}))
        if sent:
            self.read_requests += 1
            if size > self.max_read_request:
                self.max_read_request = size
            return True
        return None

    def _fill(self, path: str, size: int, offset: int, views: list) -> bool:
        """Hand plaintext the reader did not ask for (the rest of a chunk decrypted for a
        random read) to the kernel's page cache of ``path`` (``FUSE_NOTIFY_STORE``), whole
        pages only, so that the reader's next reads there need no request and the chunk is
        not decrypted again. The same bytes a read would return, into the same cache that
        ``keep_cache`` already fills (never with ``direct_io``); under the invalidation
        lock and only while the mount is unlocked, so a lock's invalidation cannot be
        overtaken by a store. True where the bytes went to the page cache."""
        rep = self.replier
        if rep is None or not rep.enabled:
            return False
        nodeid = self._nodeids.get(path)
        if nodeid is None:
            self._resolve_nodeid(path)
            return False
        start = -(-offset // _PAGE) * _PAGE
        end = offset + sum(len(v) for v in views)
        if end != size:  # a partial last page is valid only at the end of the file
            end = end // _PAGE * _PAGE
        end = min(end, size)
        if end <= start:
            return False
        parts, pos = [], offset
        for v in views:  # the views cut to [start, end)
            a, b = max(start, pos), min(end, pos + len(v))
            if a < b:
                parts.append(v[a - pos:b - pos])
            pos += len(v)
        with self._inval_lock:
            if getattr(self.tree, "locked", False) or not self.fuse_ptr:
                return False
            ok = rep.store(nodeid, start, parts)
        if not ok:  # the kernel forgot the inode: learn its node id again
            self._nodeids.pop(path, None)
        return bool(ok)

    def _resolve_nodeid(self, path: str) -> None:
        """Learn ``path``'s node id in a thread of its own (a stat through the mount may be a
        FUSE request, which another worker must serve)."""
        if self.mountpoint is None:
            return
        with self._nodeid_lock:
            if path in self._resolving:
                return
            self._resolving.add(path)
        threading.Thread(target=self._resolve, args=(path,), name="ctfs-nodeid", daemon=True).start()

    def _resolve(self, path: str) -> None:
        try:
            mnt = self.mountpoint
            if mnt is None:
                return
            if self._mnt_dev is None:
                self._mnt_dev = os.stat(mnt).st_dev
            st = os.stat(os.path.join(mnt, path.lstrip("/")))
            if st.st_dev == self._mnt_dev and stat.S_ISREG(st.st_mode):  # ours, still mounted
                self._nodeids[path] = st.st_ino
        except OSError as e:
            log.debug("node id of %s unknown: %s", path, e)
        finally:
            with self._nodeid_lock:
                self._resolving.discard(path)

    @_guard
    def _read_into(self, fh: int, offset: int, mv: memoryview) -> int:
        n = self.tree.read_into(fh, offset, mv)
        if n is None or not 0 <= n <= len(mv):
            log.error("Tree.read_into returned %r for a %d byte buffer -> EIO", n, len(mv))
            raise FuseOSError(errno.EIO)
        return n

    def read(self, path: str, size: int, offset: int, fh) -> bytes:
        """Fallback for plain ``mfusepy.FUSE`` (allocates); CtfsFUSE never calls it."""
        buf = bytearray(size)
        n = self._read_into(_fh_of(fh), offset, memoryview(buf))
        return bytes(buf[:n])

    @_guard
    def release(self, path: str, fh) -> int:
        if _fh_of(fh):
            self.tree.release(_fh_of(fh))
        return 0

    # -- kernel page cache -----------------------------------------------------------

    def invalidate_kernel_cache(self, paths: list[str]) -> dict:
        """Drop the kernel's cached pages (and mappings) of ``paths`` (tree paths).

        Returns ``{"method", "files", "invalidated", "not_cached", "failed"}``. Call it
        after the tree refuses reads, so that nothing can refill the cache.
        """
        res = {"method": "none", "files": len(paths), "invalidated": 0, "not_cached": 0,
               "failed": 0}
        left = list(paths)
        with self._inval_lock:
            fn = _invalidate_path_fn()
            # The loop may have ended (unmounted) with destroy still to come: libfuse
            # frees its node table first, so only touch struct fuse while mounted.
            if self.fuse_ptr and fn is not None and self._still_mounted():
                res["method"] = "fuse_invalidate_path"
                left = []
                for p in paths:
                    rc = fn(ctypes.c_void_p(self.fuse_ptr), os.fsencode(p))
                    if rc == 0:
                        res["invalidated"] += 1
                    elif rc == -errno.ENOENT:  # not known to the kernel: nothing cached
                        res["not_cached"] += 1
                    else:
                        log.warning("fuse_invalidate_path(%s): %s", p, os.strerror(-rc))
                        left.append(p)
        if left:
            if self.mountpoint is None:
                res["failed"] += len(left)
                log.error("cannot invalidate the kernel cache of %d file(s): no libfuse "
                          "handle and no mountpoint", len(left))
                return res
            if res["method"] == "none":
                res["method"] = "open"
            else:
                res["method"] += "+open"
            for p in left:
                ok = self._invalidate_by_open(p)
                res["invalidated" if ok else "failed"] += 1
        if res["failed"]:
            log.error("kernel page cache of %d file(s) may still hold plaintext", res["failed"])
        return res

    def _still_mounted(self) -> bool:
        if self.mountpoint is None:
            return True
        ent = find_mount(self.mountpoint)
        return ent is not None and ent.fstype.startswith("fuse")

    def _invalidate_by_open(self, path: str) -> bool:
        """Open ``path`` through the mount without keep_cache (the kernel invalidates the
        file's pages, mmapped ones included), then fadvise(DONTNEED) what is left."""
        full = os.path.join(self.mountpoint, path.lstrip("/"))
        tid = threading.get_native_id()
        self._inval_tids.add(tid)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            log.warning("invalidating %s by open failed: %s", full, e.strerror or e)
            return False
        finally:
            self._inval_tids.discard(tid)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
        return True

    # No flush/fsync: libfuse answers ENOSYS once and the kernel stops sending FLUSH on
    # every close().

    # -- read-only: everything that mutates -> EROFS ------------------------------------

    write = _erofs
    create = _erofs
    truncate = _erofs
    mkdir = _erofs
    mknod = _erofs
    rmdir = _erofs
    unlink = _erofs
    symlink = _erofs
    link = _erofs
    rename = _erofs
    chmod = _erofs
    chown = _erofs
    utimens = _erofs
    setxattr = _erofs
    removexattr = _erofs
    fallocate = _erofs


_INVALIDATE_PATH = []


def _invalidate_path_fn():
    """libfuse3's ``int fuse_invalidate_path(struct fuse *, const char *)`` or None."""
    if not _INVALIDATE_PATH:
        try:
            fn = LIBFUSE.fuse_invalidate_path
            fn.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
            fn.restype = ctypes.c_int
        except AttributeError:
            fn = None
        _INVALIDATE_PATH.append(fn)
    return _INVALIDATE_PATH[0]


class CtfsFUSE(mfusepy.FUSE):
    """mfusepy.FUSE whose ``read`` glue passes the libfuse reply buffer to the tree.

    mfusepy's stock ``read`` calls ``Operations.read`` and memmoves the returned bytes;
    libfuse (high-level API) has already malloc'ed the reply buffer it hands us, so we
    fill it in place instead. Requires ``raw_fi=True`` or not: both are handled.
    """

    def read(self, path, buf, size, offset, fip) -> int:  # noqa: D401 - libfuse glue
        fi = fip.contents
        fh = fi.fh
        if self.operations.replier is not None and self.operations.read_direct(fh, offset, size):
            return 0  # answered on /dev/fuse already; libfuse's empty reply is refused
        return self.operations.read_into_address(
            ctypes.cast(buf, ctypes.c_void_p).value, size, offset, fh
        )
