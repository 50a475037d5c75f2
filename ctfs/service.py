"""One mount, end to end: keys from a provider, authorisation of every file, the cache,
the FUSE loop. The CLI and the systemd unit call :func:`run`; nothing here parses argv."""
from __future__ import annotations

import ctypes
import grp
import logging
import os
import pwd
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .errors import CtfsError

log = logging.getLogger("ctfs.mount")
DEFAULT_CACHE = 1 << 30


@dataclass
class MountConfig:
    src: str
    mountpoint: str
    provider: str = "file"
    provider_options: dict = field(default_factory=dict)
    cache_size: int = DEFAULT_CACHE
    readahead: int = 3
    direct_io: bool = False
    source_io: str = "auto"        # how ciphertext is read (ctfs.storage.direct)
    fuse_reply: str = "auto"       # how reads are answered (ctfs.mount.fuse_reply)
    allow_plain: bool = False
    allow_unverified_plain: bool = False
    allow_uids: list[int] = field(default_factory=list)
    allow_gids: list[int] = field(default_factory=list)
    timeout: float = 30.0          # how long to retry an unreachable key service at mount
    recheck: float | None = None   # seconds between provider re-checks (vault)
    foreground: bool = False
    metrics: str | None = None     # HOST:PORT of the Prometheus endpoint (ctfs.ops.metrics)
    log_level: str = "info"
    # SRC = s3://BUCKET/PREFIX (ctfs.storage.s3)
    s3_endpoint: str | None = None
    s3_path_style: bool | None = None
    s3_region: str | None = None
    s3_timeout: float = 120.0      # a GET failing for this long becomes EIO
    s3_concurrency: int = 16
    s3_readahead: int = 128 << 20
    cache_dir: str | None = None   # ciphertext chunks fetched from object storage
    cache_dir_size: int = 50 << 30


def is_remote(src: str) -> bool:
    from .storage import is_url
    return is_url(src)


def s3_options(cfg: MountConfig):
    from .storage.s3 import SETTINGS, S3Options
    return S3Options.from_settings(**{k: getattr(cfg, k) for k in SETTINGS})


def relative_name(path: str, src: str) -> str:
    """PATH (a path or URL under SRC) relative to SRC, "/"-separated."""
    if is_remote(src):
        return path[len(src.rstrip("/")) + 1:] if path.startswith(src.rstrip("/") + "/") else path
    return os.path.relpath(path, src)


def make_nondumpable() -> None:
    """No core dumps or ptrace by other users: plaintext and keys stay in this process."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_DUMPABLE = 4
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            log.warning("could not make the daemon non-dumpable (errno %d)", ctypes.get_errno())
    except OSError:
        log.warning("could not make the daemon non-dumpable (no libc)")


def access_checker(uids: list[int], gids: list[int]):
    """None: only the mounting user can reach the mount (FUSE default, no allow_other).
    Otherwise a callable admitting the mounting user, root, and the listed uids/gids."""
    if not uids and not gids:
        return None
    allowed_uids = set(uids) | {os.getuid(), 0}
    allowed_gids = set(gids)

    def check(uid: int, gid: int) -> bool:
        if uid in allowed_uids or gid in allowed_gids:
            return True
        if allowed_gids:
            try:
                name = pwd.getpwuid(uid).pw_name
                return any(name in grp.getgrgid(g).gr_mem for g in allowed_gids)
            except KeyError:
                return False
        return False
    return check


def policy_input_for(cfg: MountConfig):
    from .auth.policy import build_input

    def make(path: str) -> dict:
        return build_input(file_name=relative_name(path, cfg.src), mount_path=os.path.abspath(cfg.mountpoint),
                           provider=cfg.provider)
    return make


def load_keys(provider, timeout: float):
    """provider.load(), retried with backoff while the key service is unreachable."""
    from .auth.providers import ProviderUnavailable
    deadline = time.monotonic() + timeout
    delay = 0.5
    while True:
        try:
            return provider.load()
        except ProviderUnavailable as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CtfsError(f"key provider {provider.name!r} unreachable for {timeout:g}s: {e}") from None
            log.warning("key provider %s unreachable (%s); retrying in %.1fs", provider.name, e, min(delay, left))
            time.sleep(min(delay, left))
            delay = min(delay * 2, 10)


class Mount:
    """The daemon-side state of one mount (tree, cache, provider), lockable.

    ``lock()`` drops every key and plaintext at once; ``unlock()`` re-authorises through
    the provider; ``status()`` is what ``ctfs status`` and the metrics endpoint show.
    """

    def __init__(self, cfg: MountConfig):
        from .mount.cache import ChunkCache
        from .auth.providers import get_provider
        self.cfg = cfg
        from .storage import open_store
        self.provider = get_provider(cfg.provider, **cfg.provider_options)
        self.store = open_store(cfg.src, s3_options(cfg))
        # A recycled buffer is overwritten by the next chunk's plaintext at once (its unused
        # tail zeroed), so zeroing it first as well would only cost CPU.
        self.cache = ChunkCache(cfg.cache_size, readahead=cfg.readahead,
                                recycle_consumed=not cfg.direct_io, zero_reused=cfg.direct_io)
        self.tree = self._authorise()
        self.started = time.time()
        self.locked_reason: str | None = None
        self.kernel_stats: Callable[[], dict] | None = None  # set by mountd.serve once serving
        self._recheck_stop = threading.Event()
        self._recheck_thread: threading.Thread | None = None

    def _reserve_buffers(self, tree) -> None:
        """Fault in, before serving, the buffers a sequential reader cycles through (per
        chunk size: ciphertext buffers and chunk-cache buffers), so that the first reads do
        not pay for fresh memory: on a VM a fresh huge page can stall on the host
        (``ctfs.storage.hugemem``). A dozen or so buffers, within the cache bound."""
        from .storage.direct import READ_AHEAD
        done = set()
        for cf in tree.files:
            size = cf.max_segment_size
            if cf.crypto is None or size in done:
                continue
            done.add(size)
            cf.reserve_buffers(2 + 2 * READ_AHEAD)
            self.cache.reserve(size, self.cfg.readahead + 3)

    def _authorise(self, tree=None):
        """Fetch keys, verify and unwrap every file; the master key is not kept."""
        from .mount.tree import MountTree
        keys = load_keys(self.provider, self.cfg.timeout)
        try:
            if tree is None:
                tree = MountTree(self.store, keys, self.cache, allow_plain=self.cfg.allow_plain,
                                 allow_unverified_plain=self.cfg.allow_unverified_plain,
                                 source_io=self.cfg.source_io,
                                 access=access_checker(self.cfg.allow_uids, self.cfg.allow_gids),
                                 policy_input=policy_input_for(self.cfg))
            else:
                tree.reauthorise(keys)
        finally:
            keys.wipe()
        self.key_ids = sorted({(cf.crypto.enc.kid, cf.crypto.sign.kid) for cf in tree.files
                               if cf.crypto}, key=str)
        self._reserve_buffers(tree)
        log.info("authorised %d encrypted file(s) under %s", len(tree.files), self.cfg.src)
        return tree

    @property
    def locked(self) -> bool:
        return self.tree.locked

    def lock(self, reason: str = "locked by request") -> None:
        self.tree.lock()
        self.locked_reason = reason
        log.warning("mount %s locked: %s; keys and cached plaintext dropped", self.cfg.mountpoint, reason)

    def unlock(self) -> None:
        self._authorise(self.tree)
        self.locked_reason = None
        log.info("mount %s unlocked", self.cfg.mountpoint)

    def status(self) -> dict:
        return {
            "mountpoint": self.cfg.mountpoint, "source": self.cfg.src, "provider": self.cfg.provider,
            "pid": os.getpid(), "started": self.started, "locked": self.locked,
            "locked_reason": self.locked_reason,
            "files": sorted(relative_name(cf.path, self.cfg.src) for cf in self.tree.files),
            "key_ids": [{"enc": e, "sign": s} for e, s in self.key_ids],
            "open_handles": self.tree.open_handles(),
            "integrity_failures": self.tree.integrity_failures,
            "cache": self.cache.stats(),
            "fuse": self.kernel_stats() if self.kernel_stats is not None else None,
            "object_store": self.store.stats() if hasattr(self.store, "stats") else None,
        }

    def start_recheck(self) -> None:
        """Re-check authorisation every ``cfg.recheck`` seconds (providers with ``check``)."""
        if not self.cfg.recheck or not hasattr(self.provider, "check") or self._recheck_thread:
            return
        self._recheck_thread = threading.Thread(target=self._recheck_loop, name="ctfs-recheck",
                                                daemon=True)
        self._recheck_thread.start()

    def _recheck_loop(self) -> None:
        from .auth.providers import ProviderDenied, ProviderUnavailable
        interval = max(0.1, float(self.cfg.recheck))
        unreachable = False
        while not self._recheck_stop.wait(interval):
            if self.locked:
                continue  # nothing to protect; an explicit unlock re-authorises
            try:
                self.provider.check()
            except ProviderDenied as e:
                if not self._recheck_stop.is_set():
                    self.lock(f"key provider {self.provider.name} denied access: {e}")
            except ProviderUnavailable as e:
                # warn once per outage, then quietly keep trying
                log.log(logging.DEBUG if unreachable else logging.WARNING,
                        "key provider %s unreachable on re-check (%s); still serving",
                        self.provider.name, e)
                unreachable = True
            except Exception as e:  # noqa: BLE001 - keep re-checking
                log.warning("key provider %s re-check failed: %s", self.provider.name, e)
            else:
                if unreachable:
                    log.info("key provider %s reachable again; access re-confirmed", self.provider.name)
                unreachable = False

    def close(self) -> None:
        self._recheck_stop.set()
        if self._recheck_thread is not None and self._recheck_thread is not threading.current_thread():
            self._recheck_thread.join(5)
        self.tree.close()
        self.cache.close()
        close = getattr(self.provider, "close", None)
        if close:
            close()


def run(cfg: MountConfig, on_ready=None) -> int:
    """Authorise and serve ``cfg`` in the foreground of this process until unmounted."""
    from .mount import mountd
    from .ops.notify import LockWatcher, Notifier, count_tensor_files, serving_status
    notifier = Notifier.from_env()  # sd_notify (Type=notify units); NOTIFY_SOCKET leaves the env
    make_nondumpable()
    metrics = None
    if cfg.metrics:  # bound now, so a taken port fails the mount before any key is fetched
        from .ops.metrics import MetricsServer
        metrics = MetricsServer(cfg.metrics)
    count = "the" if is_remote(cfg.src) else count_tensor_files(cfg.src)
    notifier.status(f"authorising {count} file(s) in {cfg.src} (key provider {cfg.provider})...")
    try:
        m = Mount(cfg)
    except BaseException as e:
        notifier.status(f"failed: {e}")
        if metrics is not None:
            metrics.close()
        raise
    notifier.status(f"mounting {len(m.tree.files)} file(s) at {cfg.mountpoint}...")
    watcher = LockWatcher(notifier, m, metrics)
    from .ops.control import ControlServer
    control = ControlServer(m, cfg.mountpoint)

    def ready() -> None:
        try:  # ctfs lock/unlock/status; serving goes on without it (logged)
            control.start()
        except (OSError, CtfsError) as e:
            log.error("no control socket for %s (ctfs lock/unlock/status will not work): %s",
                      cfg.mountpoint, e)
        m.start_recheck()
        if metrics is not None:
            metrics.start(m.status)
        if on_ready is not None:
            on_ready()
        notifier.ready(serving_status(m, metrics))  # READY=1 only now: the mount serves
        watcher.start()

    def stopped() -> None:
        notifier.stopping(f"stopping: {cfg.mountpoint} unmounted")
    rc = 1
    try:
        rc = mountd.serve(m.tree, cfg.mountpoint, foreground=True, direct_io=cfg.direct_io,
                          fuse_reply=cfg.fuse_reply,
                          allow_other=bool(cfg.allow_uids or cfg.allow_gids),
                          fsname=f"ctfs:{cfg.src if is_remote(cfg.src) else os.path.abspath(cfg.src)}", on_ready=ready, on_stop=stopped,
                          on_kernel_stats=lambda fn: setattr(m, "kernel_stats", fn))
        return rc
    finally:
        watcher.stop()
        if notifier.ready_sent:
            notifier.stopping("stopping")
        elif rc:
            notifier.status(f"failed: {getattr(mountd, '_LAST_ERROR', None) or 'mount failed'}")
        if metrics is not None:
            metrics.close()
        control.stop()
        m.close()

