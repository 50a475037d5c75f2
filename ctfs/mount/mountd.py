"""Mount lifecycle of the ctfs FUSE daemon, independent of what the tree serves.

* :func:`serve` mounts a tree and blocks until unmounted or SIGTERM/SIGINT/SIGHUP (which
  unmount cleanly and return 0). ``foreground=False`` goes through
  :func:`spawn_background`.
* :func:`spawn_background` forks a detached daemon and returns 0 only once its mount
  serves (the child reports ``ready`` or its error text through a pipe).
* :func:`unmount` / :func:`is_mounted` manage mounts, including dead ones (ENOTCONN).

Readiness: libfuse runs in a worker thread; the ``init`` callback (sent by the kernel
right after mount(2)) sets an event, then the calling thread ``stat``s the mountpoint
(served by the FUSE loop, so it proves requests are answered) and checks that
``/proc/self/mountinfo`` lists a ``fuse*`` mount there with the same device. Only then
the bdi read-ahead is raised (1 MiB FUSE reads need ``read_ahead_kb=1024``) and
``on_ready`` runs.

Signals: the FUSE loop runs in a thread and the main thread waits in Python, so Python
handlers for SIGTERM/SIGINT/SIGHUP run promptly; they are installed before libfuse
starts (libfuse then leaves its own handlers out) and they unmount with
``fusermount3 -u`` (lazily when busy), which ends the loop. Signal handling needs
:func:`serve` to run in the main thread.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

from .mountinfo import MountEntry, abs_mountpoint, find_mount

log = logging.getLogger("ctfs.fuse")

READ_AHEAD_KB = 1024
FUSE_MAX_BACKGROUND = 64
FUSE_CONGESTION_THRESHOLD = 48


class MountError(Exception):
    """A mount could not be made, found or removed."""


def is_mounted(mountpoint) -> bool:
    """True when /proc/self/mountinfo lists a mount (of any type) at ``mountpoint``."""
    return find_mount(mountpoint) is not None


# --------------------------------------------------------------------------------------
# unmount


def _probe(mountpoint: str, timeout: float = 2.0) -> str:
    """'alive', 'dead' (ENOTCONN/ECONNABORTED) or 'hung' (stat did not return)."""
    res: dict = {}

    # A never-seen name is never in the dentry/attr caches, so its LOOKUP must reach the
    # daemon (a plain stat of the mountpoint may be answered from the attribute cache).
    probe = os.path.join(mountpoint, f".ctfs-probe-{os.urandom(8).hex()}")

    def run():
        try:
            os.stat(probe)
            res["s"] = "alive"
        except OSError as e:
            res["s"] = "dead" if e.errno in (errno.ENOTCONN, errno.ECONNABORTED) else "alive"

    t = threading.Thread(target=run, name="ctfs-probe", daemon=True)
    t.start()
    t.join(timeout)
    return res.get("s", "hung")


def _fusermount(args: list[str]) -> tuple[int, str]:
    exe = shutil.which("fusermount3") or shutil.which("fusermount")
    if exe is None:
        return 127, "fusermount3 not found"
    try:
        p = subprocess.run([exe, *args], capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return 124, f"{exe} timed out"
    return p.returncode, (p.stderr or p.stdout).strip()


def _umount2(mountpoint: str, flags: int) -> tuple[int, str]:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.umount2(os.fsencode(mountpoint), flags) == 0:
        return 0, ""
    e = ctypes.get_errno()
    return e, os.strerror(e)


_MNT_DETACH = 2


def _lazy_unmount(mp: str) -> tuple[bool, str]:
    msgs = []
    rc, msg = _fusermount(["-u", "-z", mp])
    if rc == 0 or not is_mounted(mp):
        return True, ""
    msgs.append(msg)
    if os.geteuid() == 0:
        rc, msg = _umount2(mp, _MNT_DETACH)
        if rc == 0 or not is_mounted(mp):
            return True, ""
        msgs.append(msg)
    return False, "; ".join(m for m in msgs if m)


def unmount(mountpoint: str, lazy_if_dead: bool = True) -> None:
    """Unmount a ctfs (FUSE) mount.

    A live mount is unmounted with ``fusermount3 -u`` (MountError if busy). A mount whose
    daemon died (stat -> ENOTCONN, or stat hangs and the plain unmount fails) is detached
    lazily when ``lazy_if_dead`` so that a new mount works. Raises :class:`MountError`
    when ``mountpoint`` is not a mount or not a FUSE mount.
    """
    mp = abs_mountpoint(mountpoint)
    ent = find_mount(mp)
    if ent is None:
        raise MountError(f"{mp} is not a mount point")
    if not ent.fstype.startswith("fuse"):
        raise MountError(f"{mp} is not a FUSE mount (type {ent.fstype})")
    state = _probe(mp)
    if state != "dead":
        rc, msg = _fusermount(["-u", mp])
        if rc == 0 or not is_mounted(mp):
            log.info("unmounted %s", mp)
            return
        if rc == 127 and os.geteuid() == 0:
            rc, msg = _umount2(mp, 0)
            if rc == 0 or not is_mounted(mp):
                log.info("unmounted %s", mp)
                return
        if state == "alive" and _probe(mp) == "alive":
            raise MountError(f"cannot unmount {mp}: {msg or 'unknown error'}")
        state = "dead"
    if not lazy_if_dead:
        raise MountError(f"{mp}: the FUSE daemon is gone (transport endpoint is not connected)")
    ok, msg = _lazy_unmount(mp)
    if not ok:
        raise MountError(f"cannot clear dead mount {mp}: {msg or 'unknown error'}")
    log.info("cleared dead mount %s", mp)


# --------------------------------------------------------------------------------------
# kernel tuning after mount


def write_sysfs(path: str, value: int) -> Optional[str]:
    try:
        with open(path, "w") as f:
            f.write(f"{value}\n")
        return None
    except OSError as e:
        return f"{path}: {e.strerror or e}"


def _tune_mount(ent: MountEntry, read_ahead_kb: int) -> dict:
    """Raise bdi read-ahead (and fusectl background limits when fusectl is mounted)."""
    done: dict = {}
    if read_ahead_kb:
        p = f"/sys/class/bdi/{ent.dev}/read_ahead_kb"
        err = write_sysfs(p, read_ahead_kb)
        if err:
            log.warning("could not raise read-ahead to %d KiB (%s); FUSE reads stay at the "
                        "default 128 KiB (run as root for 1 MiB requests)", read_ahead_kb, err)
        else:
            done["read_ahead_kb"] = read_ahead_kb
    conn = _fusectl_dir(ent)
    if os.path.isdir(conn):
        for name, val in (("max_background", FUSE_MAX_BACKGROUND),
                          ("congestion_threshold", FUSE_CONGESTION_THRESHOLD)):
            cur = read_sysfs_int(f"{conn}/{name}")
            if cur is None:
                continue
            if cur < val and write_sysfs(f"{conn}/{name}", val) is None:
                cur = val
            done[name] = cur
    return done


def _fusectl_dir(ent: MountEntry) -> str:
    """The mount's fusectl connection directory (named by its device minor)."""
    return f"/sys/fs/fuse/connections/{ent.dev.split(':')[1]}"


def read_sysfs_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _kernel_stats(ent: MountEntry, ops, direct_io: bool, keep_cache: bool) -> dict:
    """What the kernel does with this mount now: its bdi read-ahead and fusectl limits
    (read live, None where unreadable), and the FUSE read requests served so far."""
    conn = _fusectl_dir(ent)
    return {"dev": ent.dev, "direct_io": bool(direct_io),
            "keep_cache": bool(keep_cache and not direct_io),
            "read_ahead_kb": read_sysfs_int(f"/sys/class/bdi/{ent.dev}/read_ahead_kb"),
            "max_background": read_sysfs_int(f"{conn}/max_background"),
            "read_requests": ops.read_requests, "max_read_request": ops.max_read_request,
            **ops.reply_stats()}


# --------------------------------------------------------------------------------------
# background spawning


class _BackgroundChild:
    """State of a daemon child created by spawn_background (lives in the child only)."""

    def __init__(self, wfd: int, keep_stderr: bool, errfile) -> None:
        self.wfd = wfd
        self.keep_stderr = keep_stderr
        self.errfile = errfile
        self.done = False

    def _send(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        while data:
            try:
                n = os.write(self.wfd, data)
            except OSError:
                return
            data = data[n:]

    def _close(self) -> None:
        self.done = True
        try:
            os.close(self.wfd)
        except OSError:
            pass

    def ready(self) -> None:
        if self.done:
            return
        # warnings logged while starting (e.g. --vault-skip-verify, mlock refused) would
        # die with the captured stderr: the parent prints them before it returns
        warned = [ln for ln in self.captured_stderr().splitlines() if _WARNING_LINE.search(ln)]
        self._send("".join(f"warn {ln}\n" for ln in warned) + "ready\n")
        self._close()
        if not self.keep_stderr:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        if self.errfile is not None:
            self.errfile.close()
            self.errfile = None
        try:
            os.chdir("/")
        except OSError:
            pass

    def captured_stderr(self) -> str:
        if self.errfile is None:
            return ""
        try:
            sys.stderr.flush()
            self.errfile.seek(0)
            return self.errfile.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def fail(self, rc: int, message: str) -> None:
        if self.done:
            return
        self._send(f"error {rc}\n{message}")
        self._close()


_WARNING_LINE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b")
_BG_CHILD: Optional[_BackgroundChild] = None
_LAST_ERROR: Optional[str] = None


def _set_error(msg: str) -> None:
    global _LAST_ERROR
    _LAST_ERROR = msg
    log.error("%s", msg)


def report_error(message: str) -> None:
    """Record (and log) why the daemon could not start.

    In a :func:`spawn_background` child the parent prints this message when ``run()``
    returns before the mount is ready; call it for failures that happen before
    :func:`serve` (configuration, keys, policy).
    """
    _set_error(str(message))


def _read_report(rfd: int, deadline: float) -> tuple[Optional[str], bytes]:
    """Read the child's report until EOF or deadline -> (status, data)."""
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout", data
        r, _, _ = select.select([rfd], [], [], left)
        if not r:
            continue
        chunk = os.read(rfd, 65536)
        if not chunk:
            return "eof", data
        data += chunk
        if data.startswith(b"pid ") and b"\nready\n" in data:
            return "ready", data


def spawn_background(run: Callable[[], int], mountpoint, timeout: float = 30,
                     *, keep_stderr: Optional[bool] = None) -> int:
    """Run ``run()`` (which must call :func:`serve` in foreground) in a detached daemon.

    Returns 0 once the daemon's mount serves; otherwise prints the daemon's error to
    stderr and returns non-zero. The daemon is double-forked (reparented to init), calls
    setsid, has stdin/stdout on /dev/null and stderr captured until ready (to report
    libfuse's own messages; warnings logged while starting are printed by the parent on
    success), then on /dev/null unless ``keep_stderr`` (default: keep when stderr is a
    TTY). Logging handlers writing to files keep working. Build the tree inside ``run`` if
    it starts threads: only the forking thread survives fork().
    """
    global _BG_CHILD
    mp = abs_mountpoint(mountpoint)
    if keep_stderr is None:
        try:
            keep_stderr = os.isatty(2)
        except OSError:
            keep_stderr = False
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # intermediate child
        rc = 1
        try:
            os.close(rfd)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            # daemon (grandchild)
            os.write(wfd, f"pid {os.getpid()}\n".encode())
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.close(devnull)
            errfile = None
            if not keep_stderr:
                errfile = tempfile.TemporaryFile()
                os.dup2(errfile.fileno(), 2)
            _BG_CHILD = _BackgroundChild(wfd, keep_stderr, errfile)
            try:
                res = run()
                rc = res if isinstance(res, int) else 0
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException as e:  # noqa: BLE001
                log.exception("daemon failed")
                _BG_CHILD.fail(1, f"{type(e).__name__}: {e}")
                rc = 1
            if not _BG_CHILD.done:
                msg = _LAST_ERROR or _BG_CHILD.captured_stderr() or (
                    f"daemon exited with status {rc} before the mount was ready")
                if _LAST_ERROR:  # add libfuse/fusermount output not already in the message
                    extra = "\n".join(
                        ln for ln in _BG_CHILD.captured_stderr().splitlines()
                        if ln.strip() and _LAST_ERROR not in ln)
                    if extra:
                        msg = f"{msg}\n{extra}"
                _BG_CHILD.fail(rc or 1, msg)
        except BaseException:  # noqa: BLE001
            rc = 1
        finally:
            try:
                logging.shutdown()
            finally:
                os._exit(rc if isinstance(rc, int) and 0 <= rc < 256 else 1)

    # parent
    os.close(wfd)
    try:
        os.waitpid(pid, 0)  # the intermediate child exits right after forking
    except ChildProcessError:
        pass
    try:
        status, data = _read_report(rfd, time.monotonic() + timeout)
    finally:
        os.close(rfd)
    text = data.decode("utf-8", "replace")
    daemon_pid = None
    if text.startswith("pid "):
        line, _, text = text.partition("\n")
        try:
            daemon_pid = int(line.split()[1])
        except (IndexError, ValueError):
            pass
    if status == "ready":
        for ln in text.splitlines():
            if ln.startswith("warn "):
                print(ln[5:], file=sys.stderr)
        if not is_mounted(mp):
            print(f"ctfs: daemon reported ready but {mp} is not mounted", file=sys.stderr)
            return 1
        log.info("daemon %s serving %s", daemon_pid, mp)
        return 0
    if status == "timeout":
        print(f"ctfs: mount of {mp} not ready after {timeout:g}s; stopping daemon",
              file=sys.stderr)
        if daemon_pid:
            try:
                os.kill(daemon_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        return 1
    # eof: error report (or a crash without one)
    rc = 1
    if text.startswith("error "):
        line, _, text = text.partition("\n")
        try:
            rc = int(line.split()[1]) or 1
        except (IndexError, ValueError):
            rc = 1
    msg = text.strip() or "daemon exited before the mount was ready"
    print(f"ctfs: mount of {mp} failed: {msg}", file=sys.stderr)
    return rc


# --------------------------------------------------------------------------------------
# serve


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _preflight(mp: str) -> Optional[str]:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (is the fuse kernel module loaded?)"
    try:
        st = os.stat(mp)
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            return (f"{mp} is a dead FUSE mount (transport endpoint is not connected); "
                    "unmount it first")
        return f"mountpoint {mp}: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"mountpoint {mp} is not a directory"
    if is_mounted(mp):
        return f"{mp} is already mounted"
    return None


def _opt_escape(value: str) -> str:
    """Escape a -o option value for libfuse's option parser (',' separates options)."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def serve(tree, mountpoint: str, *, foreground: bool, direct_io: bool = False,
          allow_other: bool = False, fsname: str = "ctfs",
          on_ready: Optional[Callable[[], None]] = None,
          on_stop: Optional[Callable[[], None]] = None,
          keep_cache: bool = True, read_ahead_kb: int = READ_AHEAD_KB,
          ready_timeout: float = 30.0,
          on_kernel_stats: Optional[Callable[[Callable[[], dict]], None]] = None,
          fuse_reply: str = "auto") -> int:
    """Mount ``tree`` read-only at ``mountpoint`` and serve it; returns an exit status.

    Foreground: blocks until unmounted (0) or SIGTERM/SIGINT/SIGHUP (unmounts, 0); 1 when
    the mount fails. ``on_ready()`` runs once the mount serves (after read-ahead tuning),
    ``on_stop()`` once serving ended. ``on_kernel_stats(fn)`` is handed, before
    ``on_ready``, a function returning the live FUSE figures (device, kernel tuning applied,
    read requests so far and the largest one). Background (``foreground=False``): forks a daemon
    via :func:`spawn_background` and returns once it serves; the callbacks then run in
    the daemon.
    """
    if not foreground:
        return spawn_background(
            lambda: serve(tree, mountpoint, foreground=True, direct_io=direct_io,
                          allow_other=allow_other, fsname=fsname, on_ready=on_ready,
                          on_stop=on_stop, keep_cache=keep_cache,
                          read_ahead_kb=read_ahead_kb, ready_timeout=ready_timeout,
                          on_kernel_stats=on_kernel_stats, fuse_reply=fuse_reply),
            mountpoint, timeout=ready_timeout + 5)

    from . import fuse_ops
    from .fuse_ops import CtfsFUSE, CtfsOperations

    fuse_ops.install_libfuse_logger()
    fuse_ops.last_libfuse_error = None

    mp = abs_mountpoint(mountpoint)
    err = _preflight(mp)
    if err:
        _set_error(err)
        return 1

    init_evt = threading.Event()
    ops = CtfsOperations(tree, direct_io=direct_io, keep_cache=keep_cache,
                         max_background=FUSE_MAX_BACKGROUND,
                         congestion_threshold=FUSE_CONGESTION_THRESHOLD,
                         on_init=init_evt.set, fuse_reply=fuse_reply)
    ops.mountpoint = mp  # kernel page-cache invalidation checks / falls back through it
    result: dict = {}

    def fuse_loop() -> None:
        try:
            CtfsFUSE(ops, mp, raw_fi=True, foreground=True, fsname=_opt_escape(fsname),
                     subtype="ctfs", ro=True, allow_other=allow_other)
            result["rc"] = 0
        except BaseException as e:  # noqa: BLE001
            result["exc"] = e

    stop = {"requested": 0, "signum": None}

    def on_signal(signum, frame):
        stop["requested"] += 1
        stop["signum"] = signum

    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for s in _STOP_SIGNALS:
            old_handlers[s] = signal.signal(s, on_signal)
    else:
        log.warning("serve() not in the main thread: SIGTERM/SIGINT are not handled")

    thread = threading.Thread(target=fuse_loop, name="ctfs-fuse-loop", daemon=True)
    ready = False
    try:
        thread.start()
        ent = _wait_ready(mp, init_evt, thread, ready_timeout)
        if ent is None:
            if thread.is_alive():  # mounted but not serving in time: tear down
                _set_error(f"mount at {mp} did not become ready within {ready_timeout:g}s")
                _stop_mount(mp, force=True)
                thread.join(5)
            else:
                detail = fuse_ops.last_libfuse_error or result.get("exc")
                _set_error(f"mounting {mp} failed" + (f": {detail}" if detail else ""))
            return 1
        ready = True
        tuned = _tune_mount(ent, read_ahead_kb)
        log.info("serving %s (dev %s, direct_io=%s, %s)", mp, ent.dev, direct_io,
                 ", ".join(f"{k}={v}" for k, v in tuned.items()) or "untuned")
        if on_kernel_stats is not None:
            on_kernel_stats(lambda: _kernel_stats(ent, ops, direct_io, keep_cache))
        if on_ready is not None:
            on_ready()
        if _BG_CHILD is not None:
            _BG_CHILD.ready()

        handled = 0
        while thread.is_alive():
            if stop["requested"] > handled:
                handled = stop["requested"]
                log.info("signal %s: unmounting %s", stop["signum"], mp)
                _stop_mount(mp, force=handled > 1)
            thread.join(0.2)
        log.info("stopped serving %s (max FUSE read request %d bytes, %d reads, %d replied "
                 "from the chunk cache)", mp, ops.max_read_request, ops.read_requests,
                 ops.reply_stats()["direct_replies"])
        exc = result.get("exc")
        if exc is not None and not stop["requested"]:
            log.error("FUSE loop of %s ended abnormally: %r", mp, exc)
            return 1
        return 0
    except BaseException:
        if thread.is_alive():
            log.exception("serve failed; unmounting %s", mp)
            _stop_mount(mp, force=True)
            thread.join(5)
        raise
    finally:
        for s, h in old_handlers.items():
            try:
                signal.signal(s, h)
            except (ValueError, TypeError):
                pass
        if ready and on_stop is not None:
            try:
                on_stop()
            except Exception:  # noqa: BLE001
                log.exception("on_stop callback failed")


def _wait_ready(mp: str, init_evt: threading.Event, thread: threading.Thread,
                timeout: float) -> Optional[MountEntry]:
    deadline = time.monotonic() + timeout
    while not init_evt.wait(0.01):
        if not thread.is_alive() or time.monotonic() > deadline:
            return None
    # init ran on the FUSE loop thread; its reply goes out when it returns. A stat from
    # this thread is answered by the loop, so success means the mount serves requests.
    while time.monotonic() < deadline:
        if not thread.is_alive():
            return None
        ent = find_mount(mp)
        if ent is not None and ent.fstype.startswith("fuse"):
            try:
                st = os.stat(mp)
            except OSError as e:
                log.debug("stat %s during startup: %s", mp, e)
            else:
                if f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}" == ent.dev:
                    return ent
        time.sleep(0.01)
    return None


def _stop_mount(mp: str, force: bool = False) -> None:
    """Unmount our own live mount so the FUSE loop ends; lazily when busy.

    ``force`` (second signal, failed startup) also aborts the FUSE connection through
    fusectl when it is mounted, so the loop ends even with files still open.
    """
    ent = find_mount(mp)
    if ent is None or not ent.fstype.startswith("fuse"):
        return
    abort = f"/sys/fs/fuse/connections/{ent.dev.split(':')[1]}/abort"
    rc, msg = _fusermount(["-u", mp])
    if rc == 0 or not is_mounted(mp):
        return
    if rc == 127 and os.geteuid() == 0:
        rc, msg = _umount2(mp, 0)
        if rc == 0 or not is_mounted(mp):
            return
    log.warning("unmount of %s failed (%s); detaching lazily, the daemon exits once the "
                "last open file is closed", mp, msg)
    ok, msg = _lazy_unmount(mp)
    if not ok:
        log.error("lazy unmount of %s failed: %s", mp, msg)
    if force and os.path.exists(abort):
        write_sysfs(abort, 1)
