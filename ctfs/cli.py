"""The ``ctfs`` command line (click). Every documented error becomes one line on stderr and
a non-zero exit; only bugs show a traceback (and ``--debug`` shows it for everything)."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys

import click

from . import __version__
from .errors import CtfsError
from .mount.fuse_reply import MODES as FUSE_REPLY_MODES
from .storage.direct import MODES as SOURCE_IO_MODES
from .units import parse_duration, parse_size

log = logging.getLogger("ctfs")

class Size(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class Duration(click.ParamType):
    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class _Progress:
    """A byte progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, total: int, label: str):
        self.bar = None
        if sys.stderr.isatty() and total:
            self.bar = click.progressbar(length=total, label=label, file=sys.stderr,
                                         show_pos=False, show_percent=True, show_eta=True)
            self.bar.__enter__()

    def __call__(self, n: int) -> None:
        if self.bar:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar:
            self.bar.__exit__(None, None, None)


def _load_keys(key_file: str | None, insecure_perms: bool = False):
    from .format.keys import KeySet
    if not key_file:
        raise click.UsageError("--key-file is required")
    return KeySet.load(key_file, insecure_perms=insecure_perms)


def _sigterm_as_interrupt() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ctfs")
@click.option("--debug", is_flag=True, hidden=True, help="Show tracebacks.")
@click.pass_context
def cli(ctx, debug):
    """ctfs: encrypt safetensors models and serve them decrypted through FUSE."""
    ctx.obj = {"debug": debug}


# --- keygen --------------------------------------------------------------------------
@cli.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--alg", type=click.Choice(["aes256gcm", "aes128gcm", "chacha20poly1305"]),
              default="aes256gcm", show_default=True, help="Master key algorithm.")
@click.option("--name", help="kid prefix (default: random); kids are NAME-enc and NAME-sign.")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
def keygen(out, alg, name, force):
    """Write a new JWK set (master key + Ed25519 signing key) to OUT, mode 0600."""
    from .format.keys import KeySet, write_private_file
    ks = KeySet.generate(alg, name=name)
    try:
        write_private_file(out, (json.dumps(ks.to_jwks(), indent=2) + "\n").encode(), force=force)
    except FileExistsError:
        raise CtfsError(f"{out} exists (use --force to overwrite it)") from None
    click.echo(f"wrote {out}: master key {ks.master[0].kid} ({alg}), signing key {ks.signing[0].kid}",
               err=True)


# --- encrypt -------------------------------------------------------------------------
@cli.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--key-file", required=True, type=click.Path(), help="JWK set with the master and signing keys.")
@click.option("--insecure-perms", is_flag=True, help="Accept a key file readable by group/others.")
@click.option("--format-version", type=click.Choice(["1", "2"]), default="2", show_default=True)
@click.option("--chunk-size", type=Size(), default="2MiB", show_default=True, help="v2 chunk size.")
@click.option("--alg", help="Use the master key of this algorithm from the key set.")
@click.option("--kid", help="Use the master key with this kid.")
@click.option("--include", multiple=True, help="Encrypt only tensors matching this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Leave tensors matching this glob unencrypted (repeatable).")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False), help="Rego policy to embed.")
@click.option("--no-plain-digests", is_flag=True,
              help="Do not record signed digests of unencrypted tensors (reference-only readers).")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--quiet", "-q", is_flag=True)
def encrypt(src, dst, key_file, insecure_perms, format_version, chunk_size, alg, kid, include,
            exclude, policy_file, no_plain_digests, force, quiet):
    """Encrypt SRC (a .safetensors file or a model directory) into DST.

    Every safetensors file is encrypted under the same name; other files are copied."""
    from .format.modeldir import encrypt_path, plan_size
    from .format.writer import EncryptOptions
    keys = _load_keys(key_file, insecure_perms)
    policy = None
    if policy_file:
        with open(policy_file, encoding="utf-8") as f:
            policy = f.read()
    opts = EncryptOptions(version=int(format_version), chunk_size=chunk_size, alg=alg, kid=kid,
                          include=include or ("*",), exclude=exclude, policy=policy,
                          plain_digests=not no_plain_digests)
    if not os.path.exists(src):
        raise CtfsError(f"{src}: no such file or directory")
    _sigterm_as_interrupt()
    bar = _Progress(plan_size(src), "encrypting")
    try:
        results = encrypt_path(src, dst, keys, opts, force=force, progress=bar)
    finally:
        bar.close()
    if not quiet:
        total = sum(r["bytes"] for r in results)
        click.echo(f"encrypted {len(results)} file(s), {total} tensor bytes, into {dst} "
                   f"(v{format_version}, {results[0]['alg']}, key {results[0]['enc_kid']})", err=True)


# --- inspect / verify ----------------------------------------------------------------
@cli.command()
@click.argument("path", type=click.Path())
@click.option("--key-file", type=click.Path(), help="Check the signature with these keys.")
@click.option("--insecure-perms", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path, key_file, insecure_perms, as_json):
    """Show tensors, crypto parameters, key ids, policy and signature status."""
    from .format.modeldir import inspect_file, tensor_files
    keys = _load_keys(key_file, insecure_perms) if key_file else None
    infos = [inspect_file(f, keys) for f in tensor_files(path)]
    if as_json:
        click.echo(json.dumps(infos if os.path.isdir(path) else infos[0], indent=2))
        return
    for info in infos:
        click.echo(f"{info['file']}  ({info['size']} bytes, header {info['header_len']})")
        if info["encrypted"]:
            click.echo(f"  CryptoTensors v{info.get('version')}  {info.get('algorithm')}  "
                       f"chunk_size={info.get('chunk_size')}")
            click.echo(f"  keys: enc kid={info.get('enc_kid')!r}  sign kid={info.get('sign_kid')!r}")
            if info.get("jku_ignored"):
                click.echo(f"  jku in header (ignored by ctfs): {', '.join(info['jku_ignored'])}")
            click.echo(f"  signature: {info['signature']}")
            click.echo(f"  plain-tensor digests: {'yes' if info['plain_digests'] else 'no'}")
            pol = info.get("policy")
            if isinstance(pol, dict):
                click.echo("  policy (local):")
                for line in pol["local"].splitlines():
                    click.echo(f"    {line}")
            else:
                click.echo(f"  policy: {pol}")
        else:
            click.echo("  plain safetensors (not encrypted)")
        if info["metadata"]:
            click.echo(f"  metadata: {json.dumps(info['metadata'], ensure_ascii=False)}")
        click.echo(f"  tensors ({len(info['tensors'])}):")
        for t in info["tensors"]:
            flag = "enc" if t["encrypted"] else "PLAIN"
            click.echo(f"    {flag:5} {t['dtype']:7} {str(t['shape']):20} {t['name']}")


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--key-file", required=True, type=click.Path())
@click.option("--insecure-perms", is_flag=True)
@click.option("--allow-unverified-plain", is_flag=True,
              help="Accept unencrypted tensors that no signed digest covers.")
def verify(path, key_file, insecure_perms, allow_unverified_plain):
    """Check the signature and every AEAD tag of every file (exit 0 when all are good)."""
    from .format.modeldir import plan_size, verify_path
    from .storage.local import open_blob
    keys = _load_keys(key_file, insecure_perms)
    bar = _Progress(plan_size(path), "verifying")
    try:
        files = verify_path(path, keys, allow_unverified_plain=allow_unverified_plain, progress=bar,
                            opener=open_blob)
    finally:
        bar.close()
    click.echo(f"ok: {len(files)} file(s) verified", err=True)


# --- mount / umount ------------------------------------------------------------------
def _ids(values, kind: str) -> list[int]:
    from .ops.config import resolve_ids
    what = "user" if kind == "uid" else "group"
    try:
        return resolve_ids([str(v) for v in values], what)
    except LookupError as e:
        raise click.BadParameter(f"no such {what}: {e.args[0]}") from None


def _stderr_is_journal() -> bool:
    """True when stderr is the journald stream systemd connected ($JOURNAL_STREAM = dev:ino)."""
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return os.environ.get("JOURNAL_STREAM", "") == f"{st.st_dev}:{st.st_ino}"


class LogFormatter(logging.Formatter):
    """One line per event: newlines folded, an exception as ``: Type: message`` (the
    traceback only at debug level); under journald a ``<N>`` syslog priority prefix, which
    journald strips and uses as the entry's priority (SyslogLevelPrefix=, on by default)."""

    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                 logging.CRITICAL: 2}

    def __init__(self, fmt: str, *, tracebacks: bool, priority_prefix: bool):
        super().__init__(fmt)
        self.tracebacks = tracebacks
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        if self.tracebacks:
            lines = super().format(record).splitlines() or [""]
        else:
            msg = record.getMessage()
            exc = record.exc_info[1] if record.exc_info else None
            if exc is not None:
                msg = f"{msg}: {type(exc).__name__}: {exc}" if str(exc) else f"{msg}: {type(exc).__name__}"
            rec = logging.makeLogRecord({**record.__dict__, "msg": msg, "args": None,
                                         "exc_info": None, "exc_text": None, "stack_info": None})
            lines = [" | ".join(ln.strip() for ln in super().format(rec).splitlines() if ln.strip())]
        if self.priority_prefix:
            prio = self._PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
            lines = [f"<{prio}>{ln}" for ln in lines]
        return "\n".join(lines)


def setup_logging(level: str) -> None:
    """One line per event; no timestamp under systemd (journald adds its own)."""
    under_journal = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journal else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormatter(fmt, tracebacks=level.lower() == "debug",
                                       priority_prefix=_stderr_is_journal()))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


_VAULT_AUTH_OPTIONS = [
    click.option("--vault-addr", help="Vault/OpenBao URL (default $VAULT_ADDR, $BAO_ADDR)."),
    click.option("--vault-namespace", help="Vault namespace (default $VAULT_NAMESPACE, $BAO_NAMESPACE)."),
    click.option("--vault-cacert", type=click.Path(dir_okay=False),
                 help="CA bundle for the Vault server's TLS certificate (default $VAULT_CACERT)."),
    click.option("--vault-skip-verify", is_flag=True,
                 help="Do NOT verify the Vault server's TLS certificate (insecure; warned)."),
    click.option("--vault-token-file", type=click.Path(dir_okay=False),
                 help="Token file (Vault Agent sink), re-read at renewal/re-check; else $VAULT_TOKEN."),
    click.option("--vault-token-credential", metavar="NAME",
                 help="Vault token from systemd credential NAME ($CREDENTIALS_DIRECTORY)."),
    click.option("--vault-role-id", help="AppRole role id (secret id from a file, credential or $VAULT_SECRET_ID)."),
    click.option("--vault-secret-id-file", type=click.Path(dir_okay=False), help="AppRole secret id file."),
    click.option("--vault-secret-id-credential", metavar="NAME",
                 help="AppRole secret id from systemd credential NAME."),
    click.option("--vault-approle-mount", help="AppRole auth mount path (default approle)."),
]
_VAULT_STORAGE_OPTIONS = [
    click.option("--vault-kv-path", help="KV v2 secret holding the JWK set (or its Transit "
                 "ciphertext), MOUNT/PATH, e.g. secret/ctfs/model-a."),
    click.option("--vault-kv-mount", help="KV v2 mount, when --vault-kv-path is relative to it."),
    click.option("--vault-kv-field", help="Field of the KV secret (default jwks; ciphertext for Transit)."),
    click.option("--vault-transit-key", help="Transit key that decrypts the wrapped JWK set."),
    click.option("--vault-transit-file", type=click.Path(dir_okay=False),
                 help="Transit-wrapped JWK set written by `ctfs vault-wrap`."),
    click.option("--vault-transit-mount", help="Transit mount path (default transit)."),
]


_S3_OPTIONS = [
    click.option("--s3-endpoint", metavar="URL",
                 help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, or AWS)."),
    click.option("--s3-path-style/--s3-virtual-hosted", "s3_path_style", default=None,
                 help="Addressing (default: path style when an endpoint is given)."),
    click.option("--s3-region", metavar="REGION", help="Region (default: the AWS chain's, else us-east-1)."),
    click.option("--s3-timeout", type=Duration(), default="2m", show_default=True,
                 help="A GET still failing after this long (retried meanwhile) becomes EIO."),
    click.option("--s3-concurrency", type=click.IntRange(1, 256), default=16, show_default=True,
                 help="Most GETs in flight (the number in flight adapts below it to the measured throughput)."),
    click.option("--s3-readahead", type=Size(), default="128MiB", show_default=True,
                 help="Largest readahead window per file (it adapts up to this)."),
    click.option("--cache-dir", type=click.Path(file_okay=False),
                 help="Keep fetched ciphertext chunks here (never plaintext); reused by later mounts."),
    click.option("--cache-dir-size", type=Size(), default="50GiB", show_default=True,
                 help="Bound of --cache-dir (least recently used chunks go first)."),
]


def _s3_fields(values: dict) -> dict:
    from .storage.s3 import SETTINGS
    return {k: values[k] for k in SETTINGS}


def _with_options(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return deco


def _set_options(values: dict) -> dict:
    """Only the options given on the command line (providers keep their own defaults)."""
    return {k: v for k, v in values.items() if v not in (None, False)}


@cli.command()
@click.argument("src", type=click.Path(), required=False)
@click.argument("mountpoint", required=False)
@click.option("--config", "config_file", metavar="FILE|NAME",
              help="Mount configuration (TOML; NAME means /etc/ctfs/NAME.toml); flags given "
                   "on the command line override it.")
@click.option("--metrics", metavar="HOST:PORT",
              help="Serve Prometheus metrics on this address only (needs prometheus-client).")
@click.option("--key-provider", default="file", show_default=True,
              help="file, env, vault, systemd-creds, or a site provider (entry point ctfs.key_providers).")
@click.option("--key-file", type=click.Path(), help="JWK set (file provider).")
@click.option("--insecure-perms", is_flag=True, help="Accept a key file readable by group/others.")
@click.option("--cache-size", type=Size(), default="1GiB", show_default=True,
              help="Bound of the decrypted-chunk cache.")
@click.option("--readahead", type=int, default=3, show_default=True, help="Chunks decrypted ahead of sequential reads.")
@click.option("--direct-io", is_flag=True, help="Keep plaintext out of the kernel page cache.")
@click.option("--source-io", type=click.Choice(SOURCE_IO_MODES), default="auto",
              show_default=True,
              help="How ciphertext is read: auto reads with O_DIRECT what the page cache does "
                   "not hold (no second copy of the model in memory); buffered always goes "
                   "through the page cache; direct never does.")
@click.option("--fuse-reply", type=click.Choice(FUSE_REPLY_MODES), default="auto",
              show_default=True,
              help="How reads are answered: auto writes the reply to /dev/fuse straight from "
                   "the decrypted-chunk cache (falls back to copy where libfuse is not as "
                   "expected); copy copies it into libfuse's reply buffer first.")
@click.option("--allow-plain", is_flag=True, help="Serve plain safetensors files found in SRC.")
@click.option("--allow-unverified-plain", is_flag=True,
              help="Serve unencrypted tensors that no signed digest covers (reference-written files).")
@click.option("--allow-uid", multiple=True, help="Users (names or uids) who may read the mount.")
@click.option("--allow-gid", multiple=True, help="Groups (names or gids) whose members may read the mount.")
@click.option("--timeout", type=Duration(), default="30s", show_default=True,
              help="How long to retry an unreachable key service.")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground (systemd).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.option("--recheck", type=Duration(), default=None,
              help="Re-check authorisation with the key provider this often (e.g. 60s); "
                   "a denial locks the mount.")
@click.option("--credential", metavar="NAME", help="systemd credential holding the JWK set "
              "(systemd-creds provider; default ctfs-keys).")
@_with_options(_VAULT_AUTH_OPTIONS + _VAULT_STORAGE_OPTIONS + _S3_OPTIONS)
def mount(src, mountpoint, key_provider, key_file, insecure_perms, cache_size, readahead, direct_io,
          source_io, fuse_reply, allow_plain, allow_unverified_plain, allow_uid, allow_gid, timeout, foreground, log_level,
          recheck=None, credential=None, config_file=None, metrics=None, **options):
    """Mount the CryptoTensors directory SRC at MOUNTPOINT as plain safetensors files.

    SRC is a directory or s3://BUCKET/PREFIX (credentials from the standard AWS chain).
    SRC and MOUNTPOINT may come from --config FILE instead. Returns once the mount is
    authorised and serving (or fails with the reason)."""
    import dataclasses

    from .storage import is_url
    s3 = _s3_fields(options)
    vault_options = {k: v for k, v in options.items() if k not in s3}

    from .mount import mountd
    from .ops.config import apply as apply_config
    from .ops.config import given_parameters, load as load_config
    from .service import MountConfig, run
    if (src is None) != (mountpoint is None):
        raise click.UsageError("give both SRC and MOUNTPOINT, or neither (then --config gives them)")
    cfg = MountConfig(src=src, mountpoint=mountpoint,
                      provider=key_provider,
                      provider_options={"key_file": key_file, "insecure_perms": insecure_perms,
                                        **_set_options({"credential": credential, **vault_options})},
                      cache_size=cache_size, readahead=readahead, direct_io=direct_io,
                      source_io=source_io, fuse_reply=fuse_reply,
                      allow_plain=allow_plain, allow_unverified_plain=allow_unverified_plain,
                      allow_uids=_ids(allow_uid, "uid"), allow_gids=_ids(allow_gid, "gid"),
                      timeout=timeout, recheck=recheck, foreground=foreground,
                      metrics=metrics, log_level=log_level, **s3)
    if config_file:
        cfg = apply_config(cfg, load_config(config_file), given_parameters(click.get_current_context()))
    if not cfg.src or not cfg.mountpoint:
        raise click.UsageError("SRC and MOUNTPOINT are required (on the command line or in --config FILE)")
    remote = is_url(cfg.src)
    cfg = dataclasses.replace(cfg, src=cfg.src if remote else os.path.abspath(cfg.src),
                              mountpoint=os.path.abspath(cfg.mountpoint),
                              cache_dir=cfg.cache_dir and os.path.abspath(cfg.cache_dir))
    if not remote and not os.path.isdir(cfg.src):
        raise CtfsError(f"{cfg.src}: not a directory")
    if cfg.cache_dir and not remote:
        raise click.UsageError("--cache-dir is for an s3:// SRC (a local SRC is read directly)")
    if cfg.metrics:
        from .ops.metrics import parse_address
        parse_address(cfg.metrics)
    setup_logging(cfg.log_level)

    def daemon() -> int:
        try:
            return run(cfg)
        except CtfsError as e:
            mountd.report_error(str(e))
            return 1

    rc = daemon() if cfg.foreground else mountd.spawn_background(daemon, cfg.mountpoint,
                                                                 timeout=cfg.timeout + 60)
    if rc:
        raise click.exceptions.Exit(rc)


@cli.command()
@click.argument("mountpoint", required=False)
@click.option("--config", "config_file", metavar="FILE|NAME",
              help="Unmount the mountpoint named in this mount configuration (systemd ExecStop=).")
def umount(mountpoint, config_file):
    """Unmount MOUNTPOINT (also clears the mount of a daemon that died)."""
    from .mount import mountd
    if mountpoint is None:
        if not config_file:
            raise click.UsageError("give MOUNTPOINT or --config FILE")
        from .ops.config import load as load_config
        mountpoint = load_config(config_file).values.get("mountpoint")
        if not mountpoint:
            raise CtfsError(f"{config_file}: no mountpoint in the configuration")
    try:
        mountd.unmount(mountpoint)
    except mountd.MountError as e:
        raise CtfsError(str(e)) from None


def _provider_keys(key_file, config_file, insecure_perms, which: str):
    """Keys from a JWK file, or from the key provider a mount config file names."""
    if bool(key_file) == bool(config_file):
        raise click.UsageError(f"give exactly one of --{which}key-file and --{which}key-config")
    if key_file:
        return _load_keys(key_file, insecure_perms)
    from .ops.config import load as load_config
    from .auth.providers import get_provider
    fc = load_config(config_file)
    provider = get_provider(fc.provider or "file", **fc.provider_options)
    try:
        return provider.load()
    finally:
        if hasattr(provider, "close"):
            provider.close()


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--key-file", type=click.Path(), help="The current JWK set.")
@click.option("--key-config", type=click.Path(), help="...or the mount config whose [provider] gives it (vault, systemd-creds…).")
@click.option("--new-key-file", type=click.Path(), help="The JWK set to rotate to.")
@click.option("--new-key-config", type=click.Path(), help="...or a config whose [provider] gives it.")
@click.option("--insecure-perms", is_flag=True)
@click.option("--kid", help="Use the new master key with this kid.")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False), help="Also replace the embedded policy.")
def rewrap(path, key_file, key_config, new_key_file, new_key_config, insecure_perms, kid, policy_file):
    """Rotate the master key of PATH (a file or model directory): re-wrap every data key and
    re-sign each header; tensor bytes are not rewritten."""
    from .format.rewrap import rewrap_path
    from .format.writer import EncryptOptions
    old = _provider_keys(key_file, key_config, insecure_perms, "")
    new = _provider_keys(new_key_file, new_key_config, insecure_perms, "new-")
    policy = open(policy_file, encoding="utf-8").read() if policy_file else None
    results = rewrap_path(path, old, new, opts=EncryptOptions(kid=kid), policy=policy)
    modes = {m: sum(r["mode"] == m for r in results) for m in ("in-place", "copied", "unchanged")}
    click.echo(f"rewrapped {len(results)} file(s) to key {new.master[0].kid if len(new.master) == 1 else kid}: "
               + ", ".join(f"{v} {k}" for k, v in modes.items() if v), err=True)


@cli.command("vault-wrap")
@click.argument("keys", type=click.Path(dir_okay=False))
@click.argument("out", required=False, type=click.Path(dir_okay=False))
@click.option("--transit-key", "--vault-transit-key", "transit_key", required=True,
              help="Transit key to encrypt with.")
@click.option("--transit-mount", "--vault-transit-mount", "transit_mount", default="transit",
              show_default=True)
@click.option("--kv-path", help="Also/instead store the wrapped set in this KV v2 secret (MOUNT/PATH).")
@click.option("--kv-field", default="ciphertext", show_default=True, help="Field for --kv-path.")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
@_with_options(_VAULT_AUTH_OPTIONS)
def vault_wrap(keys, out, transit_key, transit_mount, kv_path, kv_field, force, **vault_options):
    """Encrypt the JWK set KEYS with a Vault/OpenBao Transit key into OUT (mode 0600).

    Mount it with --key-provider vault --vault-transit-file OUT --vault-transit-key NAME
    (or --vault-kv-path when stored with --kv-path): the master key then never rests in
    plaintext and every unlock is in Vault's audit log."""
    from .auth.providers.vault import VaultProvider, wrap_file
    if not out and not kv_path:
        raise click.UsageError("give OUT and/or --kv-path")
    if out and os.path.exists(out) and not force:
        raise CtfsError(f"{out} exists (use --force to overwrite it)")
    provider = VaultProvider(require_storage=False, **_set_options(vault_options))
    try:
        if out:
            doc = wrap_file(provider, keys, out, transit_key, transit_mount, force=force)
        else:
            from .format.keys import KeySet
            ks = KeySet.load(keys)
            try:
                doc = provider.wrap(json.dumps(ks.to_jwks()).encode(), transit_key, transit_mount)
            finally:
                ks.wipe()
        if kv_path:
            provider.store_kv(doc, kv_path, kv_field)
    finally:
        provider.close()
    click.echo(f"wrapped {keys} with Transit key {transit_key!r}"
               + (f" into {out}" if out else "") + (f" and {kv_path}#{kv_field}" if kv_path else ""),
               err=True)


# --- lock / unlock / status (through the daemon's control socket) -----------------------
@cli.command()
@click.argument("mountpoint")
def lock(mountpoint):
    """Drop every key and all plaintext of MOUNTPOINT now (cache, data keys, kernel page
    cache); opens and reads fail with EACCES until `ctfs unlock`."""
    from .ops.control import request
    resp = request(mountpoint, "lock")
    inv = resp.get("invalidation") or {}
    if resp.get("already"):
        click.echo(f"{mountpoint}: already locked", err=True)
    else:
        click.echo(f"{mountpoint}: locked; keys and plaintext dropped"
                   + (f" (kernel cache of {inv.get('files', 0)} file(s) invalidated via "
                      f"{inv.get('method')})" if inv else ""), err=True)
        if inv.get("failed"):
            raise CtfsError(f"{mountpoint}: locked, but the kernel page cache of "
                            f"{inv['failed']} file(s) could not be invalidated")


@cli.command()
@click.argument("mountpoint")
def unlock(mountpoint):
    """Re-authorise MOUNTPOINT through its key provider after `ctfs lock`."""
    from .ops.control import request
    resp = request(mountpoint, "unlock")
    click.echo(f"{mountpoint}: {'not locked' if resp.get('already') else 'unlocked'}", err=True)


@cli.command()
@click.argument("src")
@_with_options(_S3_OPTIONS)
def prefetch(src, **options):
    """Fill --cache-dir with the ciphertext of the model at s3://BUCKET/PREFIX (no key needed),
    so that a later mount on this host reads it from local disk."""
    from .storage import is_url
    from .storage.prefetch import prefetch as run_prefetch
    from .storage.s3 import S3Options, S3Store
    from .units import format_size
    o = _s3_fields(options)
    if not is_url(src):
        raise click.UsageError(f"{src}: prefetch takes an s3://BUCKET/PREFIX URL")
    if not o["cache_dir"]:
        raise click.UsageError("--cache-dir is required (where the chunks go)")
    store = S3Store(src, S3Options.from_settings(**{**o, "cache_dir": os.path.abspath(o["cache_dir"])}))
    bar: list[_Progress] = []
    try:
        result = run_prefetch(store, progress=lambda n: bar[0](n),
                              on_total=lambda t: bar.append(_Progress(t, "prefetching")))
    finally:
        if bar:
            bar[0].close()
    cd = result["cache_dir"]
    click.echo(f"{store.url}: {result['files']} file(s); fetched {format_size(result['bytes_fetched'])}; "
               f"cache dir {cd['dir']} holds {format_size(cd['bytes'])} in {cd['chunks']} chunk(s)")


@cli.command()
@click.argument("mountpoint")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(mountpoint, as_json):
    """Files, key ids, lock state, cache and decryption statistics of MOUNTPOINT."""
    from .ops.control import format_status, request
    st = request(mountpoint, "status")["status"]
    click.echo(json.dumps(st, indent=2) if as_json else format_status(st))


def main(argv=None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        rv = cli.main(args=argv, prog_name="ctfs", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("ctfs: interrupted; nothing was left half-written", err=True)
        return 130
    except CtfsError as e:
        if debug:
            raise
        click.echo(f"ctfs: error: {e}", err=True)
        return 1
    except OSError as e:
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"ctfs: error: {where}{e.strerror or e}", err=True)
        return 1


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
