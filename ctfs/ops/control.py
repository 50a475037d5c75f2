"""The control socket of a mount: how ``ctfs lock``, ``ctfs unlock`` and ``ctfs status``
talk to the daemon serving a mountpoint.

Where: ``<runtime>/<id>/control.sock`` with ``<id>`` the first 16 hex digits of the
SHA-256 of the absolute mountpoint and ``<runtime>`` ``/run/ctfs`` for root, else
``$XDG_RUNTIME_DIR/ctfs``, else ``/tmp/ctfs-<uid>`` (which must be ours and 0700). The
directories are 0700 and the socket 0600, so only the daemon's user (root: root only)
can reach it; the server also checks the peer (SO_PEERCRED): root or the daemon's uid.

Protocol: one JSON request line ``{"cmd": "status" | "lock" | "unlock"}``, one JSON
response line ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``; then the
server closes the connection.

* ``status`` -> ``{"ok": true, "status": {...}}`` (:meth:`Mount.status` plus
  ``decrypt_bytes_per_s`` and ``uptime``);
* ``lock`` -> ``{"ok": true, "locked": true, "invalidation": {...}}``: keys and cached
  plaintext dropped, kernel page cache of our files invalidated, opens/reads -> EACCES;
* ``unlock`` -> ``{"ok": true, "locked": false}``: re-authorised through the provider.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import stat
import struct
import threading
import time

from ..units import format_size
from ..errors import CtfsError
from ..mount.mountinfo import abs_mountpoint, find_mount

log = logging.getLogger("ctfs.control")

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 * 1024
COMMANDS = ("status", "lock", "unlock")
# unlock re-authorises through the provider, which retries an unreachable key service
CLIENT_TIMEOUT = {"status": 15.0, "lock": 60.0, "unlock": 300.0}


class ControlError(CtfsError):
    """The control socket could not be used, or the daemon refused the request."""


# --- where ----------------------------------------------------------------------------
def mount_id(mountpoint) -> str:
    return hashlib.sha256(os.fsencode(abs_mountpoint(mountpoint))).hexdigest()[:16]


def runtime_base(uid: int | None = None, *, env: dict | None = None) -> str:
    """The directory holding the per-mount runtime directories of ``uid`` (default: us)."""
    uid = os.geteuid() if uid is None else uid
    if uid == 0:
        return "/run/ctfs"
    env = os.environ if env is None else env
    xdg = env.get("XDG_RUNTIME_DIR")
    if uid == os.geteuid() and xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        return os.path.join(xdg, "ctfs")
    return f"/tmp/ctfs-{uid}"


def runtime_dir(mountpoint, uid: int | None = None) -> str:
    return os.path.join(runtime_base(uid), mount_id(mountpoint))


def socket_path(mountpoint, uid: int | None = None) -> str:
    return os.path.join(runtime_dir(mountpoint, uid), SOCKET_NAME)


def _private_dir(path: str) -> None:
    """Create ``path`` 0700 (or check an existing one: a directory, ours, 0700)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"{path}: exists and is not a directory")
    if st.st_uid != os.geteuid():
        raise ControlError(f"{path}: owned by uid {st.st_uid}, not by us ({os.geteuid()})")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def _make_runtime_dir(mountpoint) -> str:
    base = runtime_base()
    parent = os.path.dirname(base)
    if not os.path.isdir(parent):
        raise ControlError(f"{parent}: no such directory for the control socket")
    _private_dir(base)
    d = os.path.join(base, mount_id(mountpoint))
    _private_dir(d)
    return d


# --- mountinfo ------------------------------------------------------------------------
def _mount_entry(mp: str):
    """The topmost mount at ``mp`` (absolute), or None."""
    try:
        return find_mount(mp)
    except OSError:
        return None


def _candidates(mp: str) -> tuple[list[str], int | None]:
    """Socket paths to try for ``mp`` and the uid of the daemon (from mountinfo)."""
    ent = _mount_entry(mp)
    owner = None
    if ent:
        for opt in ent.options.split(","):
            if opt.startswith("user_id="):
                try:
                    owner = int(opt[len("user_id="):])
                except ValueError:
                    pass
    mid = mount_id(mp)
    paths = [os.path.join(runtime_base(), mid, SOCKET_NAME)]
    if os.geteuid() == 0 and owner not in (None, 0):  # root controlling a user's mount
        paths += [os.path.join(f"/run/user/{owner}", "ctfs", mid, SOCKET_NAME),
                  os.path.join(f"/tmp/ctfs-{owner}", mid, SOCKET_NAME)]
    elif owner is not None and owner != os.geteuid():
        paths.append(os.path.join(runtime_base(owner), mid, SOCKET_NAME))
    return list(dict.fromkeys(paths)), owner


# --- client ---------------------------------------------------------------------------
def request(mountpoint, cmd: str, *, timeout: float | None = None, check: bool = True) -> dict:
    """Send ``cmd`` to the daemon serving ``mountpoint``; return its JSON response.

    Raises :class:`ControlError` with a one-line reason when no daemon serves it, the
    socket cannot be used, or (``check``) the daemon answers ``ok: false``.
    """
    if cmd not in COMMANDS:
        raise ControlError(f"unknown control command {cmd!r} (one of {', '.join(COMMANDS)})")
    mp = abs_mountpoint(mountpoint)
    ent = _mount_entry(mp)
    if ent is None:
        raise ControlError(f"{mp} is not mounted")
    if not (ent.fstype == "fuse.ctfs" or ent.source.startswith("ctfs:")):
        raise ControlError(f"{mp} is not a ctfs mount (type {ent.fstype})")
    paths, owner = _candidates(mp)
    last: OSError | None = None
    for path in paths:
        try:
            resp = _exchange(path, {"cmd": cmd}, timeout or CLIENT_TIMEOUT[cmd])
        except FileNotFoundError as e:
            last = last or e
            continue
        except PermissionError:
            who = "root" if owner == 0 else (f"uid {owner}" if owner is not None else "its user")
            raise ControlError(f"permission denied on the control socket of {mp}: the daemon "
                               f"runs as {who}; only root or that user may control it") from None
        except ConnectionRefusedError:
            raise ControlError(f"the daemon of {mp} does not answer on {path} "
                               f"(stale socket: the daemon died?)") from None
        except socket.timeout:
            raise ControlError(f"the daemon of {mp} did not answer {cmd!r} in time") from None
        except OSError as e:
            raise ControlError(f"control socket {path}: {e.strerror or e}") from None
        if check and not resp.get("ok"):
            raise ControlError(f"{cmd} {mp}: {resp.get('error') or 'refused by the daemon'}")
        return resp
    if owner not in (None, os.geteuid()) and os.geteuid() != 0:
        raise ControlError(f"{mp} is served by a daemon of uid {owner}; only root or that "
                           f"user may control it")
    raise ControlError(f"no ctfs daemon with a control socket serves {mp} "
                       f"(looked for {paths[0]})")


def _exchange(path: str, req: dict, timeout: float) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        data = _read_line(s)
    if not data:
        raise ControlError(f"the daemon closed the control connection ({path}) without an answer")
    try:
        resp = json.loads(data)
    except ValueError:
        raise ControlError(f"malformed answer on {path}: {data[:80]!r}") from None
    if not isinstance(resp, dict):
        raise ControlError(f"malformed answer on {path}: not an object")
    return resp


def _read_line(s: socket.socket, limit: int = 16 << 20) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            raise ControlError("control message too long")
    return buf.split(b"\n", 1)[0]


# --- server ---------------------------------------------------------------------------
def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    fmt = "3i"
    data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt))
    return struct.unpack(fmt, data)


class ControlServer:
    """Serves the control socket of ``mount`` (a :class:`ctfs.service.Mount`) on a daemon
    thread; :meth:`start` once the mount serves, :meth:`stop` at exit (removes the socket
    and its directory). ``directory`` overrides the runtime directory (tests)."""

    def __init__(self, mount, mountpoint: str | None = None, *, directory: str | None = None):
        self.mount = mount
        self.mountpoint = abs_mountpoint(mountpoint or mount.cfg.mountpoint)
        self._directory = directory
        self.dir: str | None = None
        self.path: str | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._op_lock = threading.Lock()  # lock/unlock one at a time
        self._ino: tuple[int, int] | None = None

    # lifecycle
    def start(self) -> str:
        if self._directory:
            _private_dir(self._directory)
            self.dir = self._directory
        else:
            self.dir = _make_runtime_dir(self.mountpoint)
        self.path = os.path.join(self.dir, SOCKET_NAME)
        self._clear_stale(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(self.path)  # the 0700 directory guards the moment before the chmod
            os.chmod(self.path, 0o600)
            s.listen(16)
            s.settimeout(0.5)
            st = os.lstat(self.path)
            self._ino = (st.st_dev, st.st_ino)
        except BaseException:
            s.close()
            raise
        self._sock = s
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="ctfs-control", daemon=True)
        self._thread.start()
        log.info("control socket %s", self.path)
        return self.path

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self.path:
            try:  # wake accept() now rather than at its next timeout
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(0.5)
                    s.connect(self.path)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.path:
            try:  # only our own socket (a new daemon may already have replaced it)
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._ino:
                    os.unlink(self.path)
            except OSError:
                pass
            try:
                os.rmdir(self.dir)
            except OSError:
                pass

    @staticmethod
    def _clear_stale(path: str) -> None:
        """Remove what is left at ``path``: the socket of a daemon that died, or of one
        still exiting after its unmount (this mountpoint is ours now: mounting checked
        that nothing was mounted there). An exiting daemon only removes its own socket."""
        try:
            os.lstat(path)
        except FileNotFoundError:
            return
        log.info("replacing a stale control socket %s", path)
        os.unlink(path)

    # serving
    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError as e:
                if self._stop.is_set():
                    return
                log.warning("control socket accept: %s", e)
                time.sleep(0.1)
                continue
            if self._stop.is_set():
                conn.close()
                return
            threading.Thread(target=self._handle, args=(conn,), name="ctfs-control-conn",
                             daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(10)
                pid, uid, gid = peer_credentials(conn)
                line = _read_line(conn, MAX_REQUEST)  # read before answering, whoever asks
                if uid not in (0, os.geteuid()):
                    log.warning("control request refused: pid=%d uid=%d is neither root nor "
                                "the daemon's user", pid, uid)
                    resp = {"ok": False, "error": "permission denied: only root or the "
                                                  "daemon's user may control this mount"}
                else:
                    resp = self._dispatch(line, pid, uid)
            except Exception as e:  # noqa: BLE001 - answer, never kill the thread loudly
                log.exception("control request failed")
                resp = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            try:
                conn.sendall(json.dumps(resp, default=str).encode() + b"\n")
            except OSError:
                pass

    def _dispatch(self, line: bytes, pid: int, uid: int) -> dict:
        try:
            req = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "malformed request (one JSON object per line)"}
        cmd = req.get("cmd") if isinstance(req, dict) else None
        if cmd not in COMMANDS:
            return {"ok": False, "error": f"unknown command {cmd!r} (one of {', '.join(COMMANDS)})"}
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        log.info("control: %s requested by pid=%d uid=%d", cmd, pid, uid)
        m = self.mount
        with self._op_lock:
            if cmd == "lock":
                if m.locked:
                    return {"ok": True, "locked": True, "already": True}
                m.lock(f"locked by request (pid {pid}, uid {uid})")
                return {"ok": True, "locked": True, "already": False,
                        "invalidation": getattr(m.tree, "last_invalidation", None)}
            if not m.locked:
                return {"ok": True, "locked": False, "already": True}
            try:
                m.unlock()
            except CtfsError as e:
                log.error("unlock of %s failed: %s", self.mountpoint, e)
                return {"ok": False, "error": str(e), "locked": m.locked}
            return {"ok": True, "locked": m.locked, "already": False}

    def status(self) -> dict:
        st = self.mount.status()
        cache = st.get("cache") or {}
        secs = float(cache.get("decrypt_seconds") or 0.0)
        st["decrypt_bytes_per_s"] = (cache.get("bytes_decrypted", 0) / secs) if secs > 0 else 0.0
        st["uptime"] = max(0.0, time.time() - st.get("started", time.time()))
        st["control_socket"] = self.path
        return st


# --- human output ---------------------------------------------------------------------
_size = format_size


def format_status(st: dict) -> str:
    c = st.get("cache") or {}
    state = f"LOCKED ({st.get('locked_reason') or 'locked'})" if st.get("locked") else "unlocked"
    keys = ", ".join(f"enc={k.get('enc')} sign={k.get('sign')}" for k in st.get("key_ids", [])) or "-"
    files = st.get("files", [])
    lines = [
        f"mount       {st.get('mountpoint')}  (source {st.get('source')}, provider "
        f"{st.get('provider')}, pid {st.get('pid')}, up {st.get('uptime', 0):.0f}s)",
        f"state       {state}",
        f"files       {len(files)} encrypted" + (": " + ", ".join(files) if files else ""),
        f"key ids     {keys}",
        f"handles     {st.get('open_handles', 0)} open",
        f"cache       {_size(c.get('bytes_cached', 0))} of {_size(c.get('capacity', 0))} in "
        f"{c.get('chunks', 0)} chunk(s); hit ratio {100 * c.get('hit_ratio', 0.0):.1f}% "
        f"({c.get('hits', 0)} hits, {c.get('misses', 0)} misses); "
        f"{c.get('evictions', 0)} evictions",
        f"decrypted   {_size(c.get('bytes_decrypted', 0))} in {c.get('decrypt_seconds', 0.0):.3f}s "
        f"({_size(st.get('decrypt_bytes_per_s', 0.0))}/s)",
        f"readahead   {c.get('readahead_hits', 0)} hits of {c.get('readahead_issued', 0)} issued "
        f"({c.get('readahead_dropped', 0)} dropped)",
        f"integrity   {st.get('integrity_failures', 0)} AEAD failure(s)",
    ]
    k = st.get("fuse")
    if k:
        ra = k.get("read_ahead_kb")
        mode = "direct_io" if k.get("direct_io") else ("page cache kept" if k.get("keep_cache")
                                                      else "page cache dropped on open")
        lines.append(f"kernel      dev {k.get('dev')}, {mode}, read-ahead "
                     f"{'?' if ra is None else f'{ra} KiB'}; {k.get('read_requests', 0)} read "
                     f"requests, largest {_size(k.get('max_read_request', 0))}")
        off = k.get("fuse_reply_off")
        lines.append(f"replies     {k.get('direct_replies', 0)} written from the chunk cache"
                     + (f"; direct replies off: {off}" if off else
                        "" if k.get("fuse_reply") == "direct" else "; copying (--fuse-reply copy)")
                     + (f"; {_size(k['page_cache_stored_bytes'])} of chunks handed to the page cache "
                        f"ahead of random reads" if k.get("page_cache_stores") else ""))
    o = st.get("object_store")
    if o:
        lines.append(f"s3          {o.get('requests', 0)} request(s), {o.get('retries', 0)} retried, "
                     f"{o.get('failures', 0)} failed, {o.get('changed', 0)} changed object(s); "
                     f"{_size(o.get('bytes_fetched', 0))} fetched, "
                     f"{_size(o.get('throughput_bps', 0.0))}/s over the last 5s")
        d = o.get("cache_dir")
        if d:
            lines.append(f"cache dir   {d.get('dir')}: {_size(d.get('bytes', 0))} of "
                         f"{_size(d.get('limit', 0))} in {d.get('chunks', 0)} chunk(s); "
                         f"{d.get('hits', 0)} hits, {d.get('misses', 0)} misses, "
                         f"{_size(d.get('bytes_read', 0))} read, {_size(d.get('bytes_written', 0))} "
                         f"written, {d.get('evictions', 0)} evictions, "
                         f"{d.get('discarded', 0)} discarded (failed their tag)")
    return "\n".join(lines)


__all__ = ["ControlError", "ControlServer", "request", "socket_path", "runtime_dir",
           "mount_id", "format_status", "peer_credentials"]
