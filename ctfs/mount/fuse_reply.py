"""Answer a FUSE read straight from the chunk cache, without copying the plaintext first.

libfuse's high-level API (the one mfusepy wraps) gives a ``read`` handler a buffer it has
just malloc'ed, copies nothing itself, and ``free()``s whatever a ``read_buf`` handler
returns, so every reply costs one user-space copy of the plaintext (chunk cache -> that
buffer) before the kernel's own copy into the page cache. This module removes ours: the
handler writes the reply (``struct fuse_out_header`` + the bytes, gathered from the pinned
chunks) to the ``/dev/fuse`` descriptor itself, and then returns 0 bytes to libfuse.
libfuse's own, now empty, reply names a request the kernel has already completed; the
kernel answers it with ENOENT, which libfuse treats as "interrupted" and ignores (request
ids are never reused within a connection, so it cannot complete another request). If the
kernel refuses *our* reply (ENOENT: the request was interrupted), the handler fills
libfuse's buffer as usual, so a reply is never lost to a wrong request id.

What this needs from libfuse, besides its public API:

* the request being served: ``fuse_get_context()`` returns the first member of libfuse's
  per-thread ``struct fuse_context_i {struct fuse_context ctx; fuse_req_t req;}``, so the
  request pointer sits right after the public ``struct fuse_context``;
* three fields of ``struct fuse_req``: ``se`` (first), ``unique`` (second) and ``ch``
  (right after ``ctx``; must be NULL: no ``clone_fd``).

Both layouts are checked before any reply is written, on every request against the
session we know (``req->se``) and the caller's uid/gid/pid (which ``fuse_get_context()`` and
``req->ctx`` must agree on) and, the first time, against the public ``fuse_req_ctx(req)``
(must point into the request at the expected offset). No private pointer is dereferenced
before it is verified: the request pointer and the request are read with
``process_vm_readv(2)`` on this process, which fails with EFAULT on an address that is not
mapped instead of crashing the daemon, and the pointer must be aligned. If a check fails (or
the kernel refuses ``process_vm_readv``), direct replies are switched off with one warning
and every read takes the copying path, which needs nothing private. ``--fuse-reply copy``
(config ``fuse_reply``) does that from the start.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import threading
from typing import Callable, Optional, Sequence

log = logging.getLogger("ctfs.fuse")

MODES = ("auto", "copy")

_OUT_HEADER = struct.Struct("<IiQ")  # struct fuse_out_header: len, error, unique
_STORE_OUT = struct.Struct("<QQII")  # struct fuse_notify_store_out: nodeid, offset, size, padding
FUSE_NOTIFY_STORE = 4  # enum fuse_notify_code
_PTR = ctypes.sizeof(ctypes.c_void_p)


class _FuseContext(ctypes.Structure):  # public struct fuse_context (fuse.h)
    _fields_ = [("fuse", ctypes.c_void_p), ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32),
                ("pid", ctypes.c_int32), ("private_data", ctypes.c_void_p), ("umask", ctypes.c_uint32)]


class _FuseCtx(ctypes.Structure):  # public struct fuse_ctx (fuse_lowlevel.h)
    _fields_ = [("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("pid", ctypes.c_int32),
                ("umask", ctypes.c_uint32)]


#: offset of ``req`` in libfuse's struct fuse_context_i
REQ_IN_CONTEXT = ctypes.sizeof(_FuseContext)
#: struct fuse_req {se; unique; int ctr; pthread_mutex_t lock; struct fuse_ctx ctx; ch; ...}
SE_IN_REQ = 0
UNIQUE_IN_REQ = _PTR
_MUTEX = 40 if _PTR == 8 else 24  # sizeof(pthread_mutex_t), glibc
CTX_IN_REQ = (UNIQUE_IN_REQ + 8 + 4 + (_PTR - 1)) // _PTR * _PTR + _MUTEX
CH_IN_REQ = CTX_IN_REQ + ctypes.sizeof(_FuseCtx)


_CONTEXT_I_SIZE = REQ_IN_CONTEXT + _PTR
_REQ_SIZE = CH_IN_REQ + _PTR


class LayoutError(RuntimeError):
    pass


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_vm_readv = _libc.process_vm_readv
_vm_readv.restype = ctypes.c_ssize_t
_vm_readv.argtypes = (ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.POINTER(_IOVec),
                      ctypes.c_ulong, ctypes.c_ulong)


def peek(address: int, size: int, what: str = "memory") -> bytes:
    """``size`` bytes at ``address`` of this process, read with ``process_vm_readv(2)``: an
    address that is not mapped gives LayoutError (EFAULT), never a crash."""
    buf = ctypes.create_string_buffer(size)
    local, remote = _IOVec(ctypes.addressof(buf), size), _IOVec(address, size)
    n = _vm_readv(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n != size:
        err = ctypes.get_errno() if n < 0 else 0
        raise LayoutError(f"{what} at {address:#x} is not readable"
                          f" ({os.strerror(err) if err else f'{n} of {size} bytes'})")
    return buf.raw



class DirectReplier:
    """Writes read replies for one FUSE session, from any libfuse worker thread while it
    serves a read. Build it with :meth:`for_fuse` in ``init`` (it needs the ``struct fuse *``).

    ``get_context() -> address`` is libfuse's ``fuse_get_context``, ``req_ctx(req) ->
    address`` its ``fuse_req_ctx``; ``session`` the ``struct fuse_session *`` and ``fd`` its
    ``/dev/fuse`` descriptor (tests pass stand-ins for all of them)."""

    def __init__(self, get_context: Callable[[], Optional[int]],
                 req_ctx: Callable[[int], Optional[int]], fuse_ptr: int, session: int,
                 fd: int) -> None:
        if not fuse_ptr or not session:
            raise LayoutError("no FUSE handle or session")
        if fd < 0:
            raise LayoutError(f"bad /dev/fuse descriptor {fd}")
        self._get_context, self._req_ctx = get_context, req_ctx
        self.fuse_ptr, self.session, self.fd = fuse_ptr, session, fd
        self.enabled = True
        self.why_off: Optional[str] = None
        self._checked = False
        self._check_lock = threading.Lock()
        self.replies = 0  # diagnostics (racy increments are fine)
        self.unknown = 0  # replies the kernel did not take: ENOENT
        self.stores = self.stored_bytes = 0  # FUSE_NOTIFY_STORE messages taken, and their bytes

    @classmethod
    def for_fuse(cls, lib: ctypes.CDLL, fuse_ptr: int) -> "DirectReplier":
        """``lib``: ctfs's own handle on libfuse3 (``ctfs.mount.fuse_ops.LIBFUSE``, whose
        ``fuse_get_context`` returns an address), not mfusepy's: restypes set here stay ours."""
        get_context = lib.fuse_get_context
        req_ctx = lib.fuse_req_ctx
        req_ctx.restype, req_ctx.argtypes = ctypes.c_void_p, (ctypes.c_void_p,)
        get_session = lib.fuse_get_session
        get_session.restype, get_session.argtypes = ctypes.c_void_p, (ctypes.c_void_p,)
        session_fd = lib.fuse_session_fd
        session_fd.restype, session_fd.argtypes = ctypes.c_int, (ctypes.c_void_p,)
        session = get_session(fuse_ptr)
        return cls(get_context, req_ctx, fuse_ptr, session or 0, session_fd(session) if session else -1)

    def disable(self, why: str) -> None:
        if self.enabled:
            self.enabled, self.why_off = False, why
            log.warning("direct FUSE replies off, reads copy through libfuse's buffer: %s", why)

    def close(self) -> None:
        """The session ended (FUSE destroy): never write to its descriptor again."""
        self.enabled = False

    def _request(self) -> bytes:
        """The bytes of the ``struct fuse_req`` this thread is serving (verified, copied
        out); LayoutError if the structures are not what this module expects."""
        ctx = self._get_context()  # public API: a valid struct fuse_context *, or NULL
        if not ctx:
            raise LayoutError("no FUSE context on this thread")
        raw = peek(ctx, _CONTEXT_I_SIZE, "fuse_context_i")
        c = _FuseContext.from_buffer_copy(raw)
        if c.fuse != self.fuse_ptr:
            raise LayoutError("fuse_context.fuse is not this mount's")
        req = ctypes.c_void_p.from_buffer_copy(raw, REQ_IN_CONTEXT).value
        if not req or req % _PTR:
            raise LayoutError(f"fuse_context_i.req {req or 0:#x} is not a request pointer")
        r = peek(req, _REQ_SIZE, "fuse_context_i.req")  # LayoutError if req is not mapped
        if ctypes.c_void_p.from_buffer_copy(r, SE_IN_REQ).value != self.session:
            raise LayoutError("fuse_context_i.req->se is not this mount's session")
        rctx = _FuseCtx.from_buffer_copy(r, CTX_IN_REQ)
        if (rctx.uid, rctx.gid, rctx.pid) != (c.uid, c.gid, c.pid):
            raise LayoutError("req->ctx disagrees with fuse_get_context()")
        if ctypes.c_void_p.from_buffer_copy(r, CH_IN_REQ).value:
            raise LayoutError("request came on a cloned channel (clone_fd)")
        if not self._checked:
            with self._check_lock:
                rc = self._req_ctx(req)
                if rc != req + CTX_IN_REQ:
                    raise LayoutError(f"fuse_req_ctx(req) at +{(rc or 0) - req}, expected +{CTX_IN_REQ}")
                self._checked = True
        return r

    def unique(self) -> Optional[int]:
        """The kernel's id of the request being served, or None (direct replies off)."""
        if not self.enabled:
            return None
        try:
            req = self._request()
        except LayoutError as e:
            self.disable(str(e))
            return None
        u = ctypes.c_uint64.from_buffer_copy(req, UNIQUE_IN_REQ).value
        if u == 0 or u & 1:  # the kernel's ids are even (bit 0 marks interrupts)
            self.disable(f"implausible request id {u:#x}")
            return None
        return u

    def send(self, unique: int, views: Sequence[memoryview]) -> bool:
        """Write the reply to request ``unique``: its bytes are ``views`` in order.
        True if the request is answered; False if it was not and the caller must reply the
        usual way (through libfuse's buffer)."""
        n = sum(len(v) for v in views)
        hdr = _OUT_HEADER.pack(_OUT_HEADER.size + n, 0, unique)
        try:
            written = os.writev(self.fd, [hdr, *views])
        except OSError as e:
            if e.errno == errno.ENOENT:
                # No such request: it was interrupted (then libfuse's reply is refused the
                # same way) or, were the id wrong, libfuse's reply must carry the bytes.
                self.unknown += 1
                return False
            self.disable(f"writing a reply to /dev/fuse failed: {e}")
            return False
        if written != _OUT_HEADER.size + n:  # /dev/fuse takes a reply whole or not at all
            self.disable(f"short write of a reply ({written} of {_OUT_HEADER.size + n} bytes)")
            return False
        self.replies += 1
        return True

    def store(self, nodeid: int, offset: int, views: Sequence[memoryview]) -> bool:
        """Put bytes into the kernel's page cache of inode ``nodeid`` at ``offset``
        (``FUSE_NOTIFY_STORE``, what libfuse's ``fuse_lowlevel_notify_store`` sends): pages
        the reader has not asked for yet, so it will find them cached. ``offset`` and the
        length should be page-aligned (the kernel marks only whole pages valid). False if
        the kernel refused (ENOENT: it has forgotten that inode)."""
        if not self.enabled:
            return False
        n = sum(len(v) for v in views)
        hdr = _OUT_HEADER.pack(_OUT_HEADER.size + _STORE_OUT.size + n, FUSE_NOTIFY_STORE, 0)
        try:
            written = os.writev(self.fd, [hdr, _STORE_OUT.pack(nodeid, offset, n, 0), *views])
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.debug("FUSE_NOTIFY_STORE of %d bytes at %d refused: %s", n, offset, e)
            return False
        if written == _OUT_HEADER.size + _STORE_OUT.size + n:
            self.stores += 1
            self.stored_bytes += n
            return True
        return False
