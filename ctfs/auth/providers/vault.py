"""``--key-provider vault``: the JWK set from HashiCorp Vault or OpenBao (through hvac).

Storage, one of:

* **KV v2**: ``--vault-kv-path secret/ctfs/model-a`` (first segment: the KV mount, unless
  ``--vault-kv-mount`` names it); the JWK set JSON is in field ``--vault-kv-field``
  (default ``jwks``), or is the secret's data itself.
* **Transit**: ``--vault-transit-key NAME``; the JWK set is Transit ciphertext, in a file
  (``--vault-transit-file PATH``, written by ``ctfs vault-wrap``) or in a KV v2 field
  (``--vault-kv-path``, default field ``ciphertext``), and Transit decrypts it at every
  mount/re-check: the master key never rests in plaintext and every unlock is audited.

Auth: a token (``$VAULT_TOKEN``/``$BAO_TOKEN``, ``--vault-token-file`` as Vault Agent
writes it, re-read at every renewal/re-check, or ``--vault-token-credential`` from
``$CREDENTIALS_DIRECTORY``), or AppRole (``--vault-role-id`` with the secret id from
``--vault-secret-id-file``, ``--vault-secret-id-credential`` or ``$VAULT_SECRET_ID`` -- never
argv). Secret variables are removed from the environment (and scrubbed from the process's
initial environment block) as soon as they are read. Renewable tokens are renewed in a
background thread at ~2/3 of their TTL.

Errors: a definite "no" (403, revoked token, refused AppRole login, transit decrypt refused,
secret gone) is :class:`ProviderDenied`; connection errors, 5xx and a sealed server are
:class:`ProviderUnavailable` -- unless the token's lease has already ended, which is a "no".
"""
from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import time
from typing import Any
from urllib.parse import urlparse

from ...format.keys import KeySet, write_private_file
from . import ProviderDenied, ProviderError, ProviderUnavailable, forget_env

log = logging.getLogger("ctfs.providers.vault")

WRAPPED_TYPE = "ctfs-vault-transit-jwks"
_SECRET_VARS = ("VAULT_TOKEN", "BAO_TOKEN", "VAULT_SECRET_ID", "BAO_SECRET_ID")
_MIN_RENEW_DELAY = 1.0


def _env(name: str) -> str | None:
    """``VAULT_<name>``, else ``BAO_<name>``; empty counts as unset."""
    return os.environ.get(f"VAULT_{name}") or os.environ.get(f"BAO_{name}") or None


def credential_file(name: str) -> str:
    from .systemd_creds import credential_path
    return credential_path(name)


def _read_secret_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read(1 << 16).strip()
    except OSError as e:
        raise ProviderError(f"cannot read the {what} file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ProviderError(f"the {what} file {path} is not text") from None
    if not value:
        raise ProviderError(f"the {what} file {path} is empty")
    return value


def parse_wrapped(text: str, source: str) -> tuple[str, str | None, str | None]:
    """A wrapped key set -> (ciphertext, transit key or None, transit mount or None).

    Accepts the JSON document ``ctfs vault-wrap`` writes or a bare ``vault:vN:...``."""
    text = text.strip()
    if text.startswith("vault:"):
        return text, None, None
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("ciphertext"), str) \
            or not doc["ciphertext"].startswith("vault:"):
        raise ProviderError(f"{source}: not Transit ciphertext (expected the output of "
                            f"`ctfs vault-wrap` or a vault:v1:... string)")
    return doc["ciphertext"], doc.get("key"), doc.get("mount")


class VaultProvider:
    """Keys from Vault/OpenBao KV v2 or Transit; see the module docstring."""

    name = "vault"

    def __init__(self, vault_addr: str | None = None, vault_namespace: str | None = None,
                 vault_cacert: str | None = None, vault_skip_verify: bool = False,
                 vault_token_file: str | None = None, vault_token_credential: str | None = None,
                 vault_role_id: str | None = None, vault_secret_id_file: str | None = None,
                 vault_secret_id_credential: str | None = None,
                 vault_approle_mount: str = "approle",
                 vault_kv_path: str | None = None, vault_kv_mount: str | None = None,
                 vault_kv_field: str | None = None,
                 vault_transit_key: str | None = None, vault_transit_file: str | None = None,
                 vault_transit_mount: str | None = None,
                 vault_timeout: float = 10.0, require_storage: bool = True, **_: Any):
        # secrets first: whatever else fails, they leave the environment now
        env_secrets = forget_env(*_SECRET_VARS)
        self._token: str | None = None
        self._secret_id: str | None = None
        self.addr = vault_addr or _env("ADDR")
        if not self.addr:
            raise ProviderError("the vault key provider needs --vault-addr or $VAULT_ADDR/$BAO_ADDR")
        u = urlparse(self.addr)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ProviderError(f"--vault-addr {self.addr!r} is not an http(s):// URL")
        self._loopback = u.hostname in ("127.0.0.1", "::1", "localhost")
        if u.scheme == "http" and not self._loopback:
            log.warning("Vault address %s is plain http: tokens and keys cross the network "
                        "unencrypted", self.addr)
        self.namespace = vault_namespace or _env("NAMESPACE")
        cacert = vault_cacert or _env("CACERT")
        if vault_skip_verify:
            log.warning("--vault-skip-verify: NOT verifying the Vault server's TLS certificate")
            self.verify: bool | str = False
        else:
            self.verify = cacert or True
            if _env("SKIP_VERIFY"):
                log.warning("$VAULT_SKIP_VERIFY is ignored; TLS verification stays on "
                            "(use --vault-skip-verify to turn it off explicitly)")
        self.timeout = vault_timeout

        # --- auth ---
        self.token_file = vault_token_file and os.path.abspath(vault_token_file)
        if vault_token_credential:
            self.token_file = credential_file(vault_token_credential)
        self.role_id = vault_role_id
        self.approle_mount = vault_approle_mount or "approle"
        secret_id_file = vault_secret_id_file and os.path.abspath(vault_secret_id_file)
        if vault_secret_id_credential:
            secret_id_file = credential_file(vault_secret_id_credential)
        if self.role_id:
            if secret_id_file:
                self._secret_id = _read_secret_file(secret_id_file, "AppRole secret id")
            else:
                self._secret_id = env_secrets.get("VAULT_SECRET_ID") or env_secrets.get("BAO_SECRET_ID")
            if not self._secret_id:
                raise ProviderError("AppRole login needs a secret id: --vault-secret-id-file, "
                                    "--vault-secret-id-credential or $VAULT_SECRET_ID")
            self.auth = "approle"
        elif self.token_file:
            self._token = _read_secret_file(self.token_file, "Vault token")
            self.auth = "token-file"
        else:
            self._token = env_secrets.get("VAULT_TOKEN") or env_secrets.get("BAO_TOKEN")
            if not self._token:
                raise ProviderError("no Vault credentials: set $VAULT_TOKEN, or pass "
                                    "--vault-token-file, --vault-token-credential or --vault-role-id")
            self.auth = "token"

        # --- storage ---
        self.transit_key = vault_transit_key
        self.transit_mount = vault_transit_mount
        self.transit_file = vault_transit_file and os.path.abspath(vault_transit_file)
        self.kv_mount, self.kv_path = None, None
        if vault_kv_path:
            p = vault_kv_path.strip("/")
            if vault_kv_mount:
                self.kv_mount, self.kv_path = vault_kv_mount.strip("/"), p
            else:
                self.kv_mount, _, self.kv_path = p.partition("/")
            if not self.kv_mount or not self.kv_path:
                raise ProviderError(f"--vault-kv-path {vault_kv_path!r} must be MOUNT/PATH "
                                    f"(e.g. secret/ctfs/model-a)")
        self.transit = bool(self.transit_key or self.transit_file)
        self.kv_field = vault_kv_field or ("ciphertext" if self.transit else "jwks")
        if self.transit_file and self.kv_path:
            raise ProviderError("give either --vault-transit-file or --vault-kv-path for the "
                                "wrapped key set, not both")
        if require_storage and not (self.transit_file or self.kv_path):
            raise ProviderError("the vault key provider needs --vault-kv-path (KV v2) or "
                                "--vault-transit-file/--vault-transit-key (Transit)")
        self._ciphertext: str | None = None
        if self.transit_file:
            self._read_transit_file()

        self._lock = threading.RLock()
        self._client = None
        self._expires: float | None = None      # monotonic end of the token's lease
        self._ttl_full: float | None = None
        self._renewable = False
        self._renew_at: float | None = None
        self._relogin = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        where = (f"transit key {self.transit_key!r}" if self.transit else "kv") + \
            (f" file {self.transit_file}" if self.transit_file else
             f" {self.kv_mount}/{self.kv_path}#{self.kv_field}" if self.kv_path else "")
        return f"VaultProvider(addr={self.addr!r}, auth={self.auth!r}, {where})"

    # --- helpers ------------------------------------------------------------------------
    def _scrub(self, text: object) -> str:
        s = str(text)
        for secret in (self._token, self._secret_id):
            if secret and len(secret) >= 4 and secret in s:  # shorter: would mangle words
                s = s.replace(secret, "***")
        return s

    def _read_transit_file(self) -> None:
        try:
            with open(self.transit_file, encoding="utf-8") as f:
                text = f.read(1 << 22)
        except OSError as e:
            raise ProviderError(f"cannot read the wrapped key file {self.transit_file}: "
                                f"{e.strerror}") from None
        ct, key, mount = parse_wrapped(text, self.transit_file)
        self._ciphertext = ct
        self.transit_key = self.transit_key or key
        self.transit_mount = self.transit_mount or mount
        if not self.transit_key:
            raise ProviderError(f"{self.transit_file} does not name its Transit key; "
                                f"pass --vault-transit-key NAME")

    def _make_client(self, token: str | None):
        import hvac
        import requests
        session = requests.Session()
        # hvac takes a given session's own ``verify`` (True by default) over its argument:
        # without this, --vault-cacert/$VAULT_CACERT and --vault-skip-verify were ignored
        session.verify = self.verify
        if self._loopback:
            session.trust_env = False  # never send 127.0.0.1 through a proxy
        return hvac.Client(url=self.addr, token=token or "", verify=self.verify,
                           timeout=self.timeout, namespace=self.namespace, session=session)

    def _call(self, what: str, fn, *args, **kwargs):
        """Run one Vault request, mapping failures onto the provider's error classes."""
        import hvac.exceptions as hx
        import requests
        try:
            return fn(*args, **kwargs)
        except (hx.Forbidden, hx.Unauthorized) as e:
            raise ProviderDenied(f"Vault {what}: permission denied"
                                 f"{self._detail(e, 'permission denied')}") from None
        except hx.InvalidPath as e:
            raise ProviderDenied(f"Vault {what}: not found{self._detail(e)}") from None
        except hx.InvalidRequest as e:
            raise ProviderDenied(f"Vault {what}: refused{self._detail(e)}") from None
        except (hx.VaultDown, hx.VaultNotInitialized) as e:
            raise ProviderUnavailable(f"Vault {what}: server sealed or not ready"
                                      f"{self._detail(e)}") from None
        except (hx.InternalServerError, hx.BadGateway, hx.RateLimitExceeded) as e:
            raise ProviderUnavailable(f"Vault {what}: server error{self._detail(e)}") from None
        except hx.VaultError as e:
            raise ProviderError(f"Vault {what}: {type(e).__name__}{self._detail(e)}") from None
        except requests.exceptions.SSLError as e:
            raise ProviderError(f"Vault {what}: TLS verification of {self.addr} failed "
                                f"({self._scrub(_root_cause(e))}); use --vault-cacert") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            raise ProviderUnavailable(f"Vault {what}: {self.addr} unreachable "
                                      f"({self._scrub(_root_cause(e))})") from None
        except requests.exceptions.RequestException as e:
            raise ProviderUnavailable(f"Vault {what}: {self._scrub(_root_cause(e))}") from None

    def _detail(self, e, skip: str | None = None) -> str:
        errors = [str(x) for x in (getattr(e, "errors", None) or []) if str(x) != skip]
        return f" ({self._scrub('; '.join(errors))})" if errors else ""

    # --- auth -------------------------------------------------------------------------------
    def _reload_token_file(self) -> None:
        """Vault Agent rotates the sink file: follow it."""
        if self.auth != "token-file":
            return
        token = _read_secret_file(self.token_file, "Vault token")
        if token != self._token:
            log.info("Vault token file %s changed; using the new token", self.token_file)
            self._token = token
            self._client = None

    def _login(self) -> None:
        c = self._make_client(None)
        resp = self._call("AppRole login", c.auth.approle.login, role_id=self.role_id,
                          secret_id=self._secret_id, mount_point=self.approle_mount,
                          use_token=False)
        auth = resp["auth"]
        self._token = auth["client_token"]
        self._client = None
        log.info("logged in to Vault through AppRole (token ttl %ss, renewable=%s)",
                 auth.get("lease_duration"), auth.get("renewable"))

    def _ensure_client(self):
        self._reload_token_file()
        if self.auth == "approle" and (self._token is None or self._lease_ended()):
            self._login()
        if self._client is None:
            self._client = self._make_client(self._token)
        return self._client

    def _lookup_self(self) -> dict:
        c = self._ensure_client()
        data = self._call("token lookup", c.auth.token.lookup_self)["data"]
        ttl: float | None = _seconds_until(data.get("expire_time"))
        if ttl is None and data.get("expire_time"):
            ttl = max(float(data.get("ttl") or 0), 0.001)
        self._set_lease(ttl, bool(data.get("renewable")),
                        data.get("creation_ttl") or data.get("ttl") or 0)
        return data

    def _set_lease(self, ttl: float | None, renewable: bool, full: float | None = None) -> None:
        now = time.monotonic()
        self._renewable = renewable
        if ttl is None:   # root and other tokens without expiry
            self._expires = self._renew_at = None
            return
        self._expires = now + ttl
        if full:
            self._ttl_full = float(full)
        self._renew_at = now + max(_MIN_RENEW_DELAY, ttl * 2 / 3)

    def _lease_ended(self) -> bool:
        return self._expires is not None and time.monotonic() >= self._expires

    def lease_remaining(self) -> float | None:
        """Seconds left on the token's lease (None: no expiry known)."""
        return None if self._expires is None else self._expires - time.monotonic()

    def _renew(self) -> None:
        with self._lock:
            if self.auth == "token-file":
                old = self._token
                self._reload_token_file()
                if self._token != old:
                    self._lookup_self()
                    return
            if self.auth == "approle" and (not self._renewable or self._relogin):
                # cannot renew, or renewal is capped by the max TTL: a fresh login before
                # the lease ends, as Vault Agent does
                self._relogin = False
                self._login()
                self._lookup_self()
                return
            if not self._renewable:
                self._renew_at = None
                return
            c = self._ensure_client()
            try:
                auth = self._call("token renewal", c.auth.token.renew_self)["auth"]
            except ProviderUnavailable as e:
                if "max TTL" not in str(e):
                    raise
                if self.auth == "approle":   # "past the max TTL, cannot renew" (HTTP 500)
                    self._login()
                    self._lookup_self()
                else:
                    self._renew_at = None
                    log.warning("the Vault token reached its max TTL and cannot be renewed; "
                                "it expires in %.0fs", self.lease_remaining() or 0)
                return
            log.debug("Vault token renewed (lease %ss)", auth.get("lease_duration"))
            self._lookup_self()         # the precise new expiry (lease_duration is rounded)
            left = self.lease_remaining()
            if self.auth == "approle" and self._ttl_full and left is not None \
                    and left < 0.9 * self._ttl_full:
                self._relogin = True    # capped by the max TTL: log in at the next turn

    def _renew_loop(self) -> None:
        while True:
            at = self._renew_at
            delay = 3600.0 if at is None else max(0.0, at - time.monotonic())
            if self._stop.wait(delay):
                return
            if self._renew_at is None or time.monotonic() < self._renew_at:
                continue
            try:
                self._renew()
            except ProviderError as e:
                left = self.lease_remaining()
                retry = _MIN_RENEW_DELAY if left is None else min(30.0, max(_MIN_RENEW_DELAY, left / 3))
                self._renew_at = time.monotonic() + retry
                log.warning("Vault token renewal failed (%s); retrying in %.0fs", e, retry)
            except Exception:  # noqa: BLE001 - the renewer must not die silently
                log.exception("Vault token renewal failed")
                self._renew_at = time.monotonic() + 30

    def _start_renewer(self) -> None:
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._renew_loop, name="ctfs-vault-renew",
                                            daemon=True)
            self._thread.start()

    # --- fetching -------------------------------------------------------------------------
    def _kv_read(self) -> dict:
        c = self._ensure_client()
        resp = self._call(f"read of {self.kv_mount}/{self.kv_path}",
                          c.secrets.kv.v2.read_secret_version, path=self.kv_path,
                          mount_point=self.kv_mount, raise_on_deleted_version=True)
        return resp["data"]["data"] or {}

    def _kv_value(self):
        data = self._kv_read()
        where = f"{self.kv_mount}/{self.kv_path}"
        if self.kv_field in data:
            return data[self.kv_field]
        if not self.transit and "keys" in data:
            return data  # the secret's data is the JWK set itself
        raise ProviderError(f"Vault secret {where} has no field {self.kv_field!r} "
                            f"(fields: {', '.join(sorted(data)) or 'none'}); use --vault-kv-field")

    def _decrypt(self) -> bytes:
        if self.transit_file:
            ct = self._ciphertext
        else:
            value = self._kv_value()
            if not isinstance(value, str):
                raise ProviderError(f"Vault secret {self.kv_mount}/{self.kv_path} field "
                                    f"{self.kv_field!r} is not Transit ciphertext")
            ct, key, mount = parse_wrapped(value, f"{self.kv_mount}/{self.kv_path}")
            self.transit_key = self.transit_key or key
            self.transit_mount = self.transit_mount or mount
        if not self.transit_key:
            raise ProviderError("Transit mode needs --vault-transit-key NAME")
        c = self._ensure_client()
        resp = self._call(f"transit decrypt with key {self.transit_key!r}",
                          c.secrets.transit.decrypt_data, name=self.transit_key, ciphertext=ct,
                          mount_point=self.transit_mount or "transit")
        try:
            return base64.b64decode(resp["data"]["plaintext"], validate=True)
        except (KeyError, TypeError, ValueError):
            raise ProviderError("Vault transit decrypt returned no plaintext") from None

    def _fetch(self) -> KeySet:
        try:
            self._lookup_self()
        except ProviderDenied as e:
            # a token without the default policy may not look itself up: the read below
            # decides (a revoked token fails it too); its expiry is then not tracked
            log.debug("%s; relying on the secret read", e)
        if self.transit:
            raw = bytearray(self._decrypt())
            try:
                return KeySet.from_json(bytes(raw), source=f"vault transit:{self.transit_key}")
            finally:
                raw[:] = bytes(len(raw))
        value = self._kv_value()
        source = f"vault kv:{self.kv_mount}/{self.kv_path}"
        if isinstance(value, str):
            return KeySet.from_json(value, source=source)
        return KeySet.from_jwks(value, source=source)

    # --- provider protocol --------------------------------------------------------------
    def load(self) -> KeySet:
        with self._lock:
            ks = self._fetch()
        self._start_renewer()
        log.info("keys from Vault %s (%s auth, %s): %d master key(s)", self.addr, self.auth,
                 "transit" if self.transit else "kv v2", len(ks.master))
        return ks

    def check(self) -> None:
        """Re-check authorisation (token, then the secret / a transit decrypt)."""
        with self._lock:
            try:
                if self.transit_file:
                    try:
                        self._read_transit_file()   # follow a re-wrapped file
                    except ProviderError as e:
                        log.debug("keeping the wrapped key set read at mount: %s", e)
                self._fetch().wipe()
            except ProviderUnavailable as e:
                if self._lease_ended():
                    raise ProviderDenied(f"the Vault token's lease has ended and it could not "
                                         f"be renewed ({e})") from None
                raise

    def wrap(self, jwks: bytes, transit_key: str | None = None, mount: str | None = None) -> str:
        """Transit-encrypt ``jwks``; returns the ``vault-wrap`` JSON document."""
        key = transit_key or self.transit_key
        if not key:
            raise ProviderError("--transit-key NAME is required")
        mount = mount or self.transit_mount or "transit"
        KeySet.from_json(jwks, source="key set").wipe()  # refuse to wrap garbage
        with self._lock:
            self._lookup_self()
            c = self._ensure_client()
            resp = self._call(f"transit encrypt with key {key!r}", c.secrets.transit.encrypt_data,
                              name=key, plaintext=base64.b64encode(jwks).decode("ascii"),
                              mount_point=mount)
        ct = resp["data"]["ciphertext"]
        return json.dumps({"type": WRAPPED_TYPE, "mount": mount, "key": key, "ciphertext": ct},
                          indent=2) + "\n"

    def store_kv(self, value: str, kv_path: str, field: str = "ciphertext",
                 kv_mount: str | None = None) -> None:
        """Write ``{field: value}`` to the KV v2 secret ``kv_path``."""
        p = kv_path.strip("/")
        mount, path = (kv_mount.strip("/"), p) if kv_mount else p.partition("/")[::2]
        with self._lock:
            c = self._ensure_client()
            self._call(f"write of {mount}/{path}", c.secrets.kv.v2.create_or_update_secret,
                       path=path, secret={field: value}, mount_point=mount)

    def close(self) -> None:
        self._stop.set()
        t, self._thread = self._thread, None
        if t is not None and t is not threading.current_thread():
            t.join(2)
        self._client = None


def wrap_file(provider: VaultProvider, keys_path: str, out: str, transit_key: str,
              mount: str | None = None, *, force: bool = False) -> str:
    """Read the JWK set at ``keys_path``, Transit-encrypt it, write ``out`` mode 0600."""
    ks = KeySet.load(keys_path)
    try:
        data = json.dumps(ks.to_jwks()).encode()
    finally:
        ks.wipe()
    doc = provider.wrap(data, transit_key, mount)
    write_private_file(out, doc.encode(), force=force)
    return doc


def _seconds_until(stamp) -> float | None:
    """RFC 3339 ``expire_time`` (nanoseconds allowed) -> seconds from now; None if absent."""
    if not isinstance(stamp, str) or not stamp:
        return None
    from datetime import datetime, timezone
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", stamp.strip())
    if not m:
        return None
    frac = (m.group(2) or ".0")[:7]
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    try:
        when = datetime.fromisoformat(m.group(1) + frac + tz)
    except ValueError:
        return None
    return max((when - datetime.now(timezone.utc)).total_seconds(), 0.001)


def _root_cause(e: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error, without object reprs and URLs."""
    seen: BaseException = e
    for _ in range(10):
        nxt = getattr(seen, "reason", None)
        if not isinstance(nxt, BaseException):
            nxt = seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None
        if nxt is None:
            break
        seen = nxt
    text = str(seen)
    # "<HTTPConnection object at 0x..>: Failed ..." / "HTTPConnection(host=.., port=..): Failed ..."
    return re.sub(r"^(<[^>]*>|\w+\([^)]*\)): ", "", text)
