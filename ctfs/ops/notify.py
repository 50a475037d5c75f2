"""sd_notify(3) without libsystemd: readiness and status for ``Type=notify`` units.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) to the
service; the service sends datagrams of newline-separated ``KEY=VALUE`` assignments:
``READY=1`` once it serves, ``STATUS=...`` for ``systemctl status``, ``STOPPING=1`` when
it begins to shut down. :meth:`Notifier.from_env` reads the variable and removes it from
the environment, so that child processes (fusermount3, a provider's helper) can never
send messages in the daemon's name. Without ``NOTIFY_SOCKET`` every call is a no-op.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Optional

log = logging.getLogger("ctfs.notify")

ENV = "NOTIFY_SOCKET"


def socket_address(value: str) -> Optional[str]:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value, None if unusable.

    ``/path`` is a filesystem socket; ``@name`` is ``\\0name`` in the abstract namespace.
    Other forms (``vsock:...``) are not supported here.
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def _clean(text: str) -> str:
    """One line: a newline inside a STATUS value would start a new assignment."""
    return " ".join(str(text).split())


class Notifier:
    """Sends sd_notify messages to one socket; every method is a no-op without one."""

    def __init__(self, address: Optional[str] = None):
        self.address = address
        self._sock: Optional[socket.socket] = None
        self._lock = threading.Lock()
        self._failed = False
        self.ready_sent = False
        self.stopping_sent = False

    @classmethod
    def from_env(cls, environ=None) -> "Notifier":
        """Read ``NOTIFY_SOCKET`` and remove it from ``environ`` (default: os.environ)."""
        env = os.environ if environ is None else environ
        value = env.pop(ENV, None)
        if value is None:
            return cls(None)
        addr = socket_address(value)
        if addr is None:
            log.warning("unsupported %s=%r; not notifying the service manager", ENV, value)
        return cls(addr)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False when nothing was sent."""
        if self.address is None or not assignments:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self.address)
                return True
            except OSError as e:
                if not self._failed:  # say it once; the mount itself is unaffected
                    log.warning("sd_notify to %s failed: %s", self.address.replace("\0", "@"), e)
                    self._failed = True
                return False

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_clean(text)}")

    def ready(self, status: Optional[str] = None) -> bool:
        self.ready_sent = True
        lines = ["READY=1"] + ([f"STATUS={_clean(status)}"] if status else [])
        return self.send(*lines)

    def stopping(self, status: Optional[str] = None) -> bool:
        if self.stopping_sent:
            return False
        self.stopping_sent = True
        lines = ["STOPPING=1"] + ([f"STATUS={_clean(status)}"] if status else [])
        return self.send(*lines)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


# --- what a mount tells the service manager -------------------------------------------
def count_tensor_files(src: str) -> int:
    """How many files authorisation will look at (for the STATUS line); 0 when unknown."""
    try:
        from ..format.modeldir import tensor_files
        return len(tensor_files(src))
    except Exception:  # noqa: BLE001 - the real error comes from authorisation itself
        return 0


def serving_status(mount, metrics=None) -> str:
    n = len(mount.tree.files)
    text = f"serving {n} file(s) from {mount.cfg.src} at {mount.cfg.mountpoint}"
    if metrics is not None:
        text += f"; metrics on {metrics.url}"
    return text


class LockWatcher:
    """Sends ``STATUS=locked: REASON`` / ``STATUS=serving ...`` when the lock state changes.

    Polls ``mount.locked``, so every way of locking (``ctfs lock``, a provider's denial on
    re-check) shows in ``systemctl status`` without hooks in each of them."""

    def __init__(self, notifier: Notifier, mount, metrics=None, interval: float = 0.5):
        self.notifier, self.mount, self.metrics, self.interval = notifier, mount, metrics, interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        if not self.notifier.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="ctfs-notify", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        was = bool(self.mount.locked)
        while not self._stop.wait(self.interval):
            try:
                now = bool(self.mount.locked)
            except Exception:  # noqa: BLE001 - mount closing
                return
            if now != was:
                was = now
                if now:
                    reason = getattr(self.mount, "locked_reason", None) or "locked"
                    self.notifier.status(f"locked: {reason}; reads refused until `ctfs unlock "
                                         f"{self.mount.cfg.mountpoint}`")
                else:
                    self.notifier.status(serving_status(self.mount, self.metrics))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2)
