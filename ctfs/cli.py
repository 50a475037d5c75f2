"""The ``ctfs`` command line (click). Every documented error becomes one line on stderr and
a non-zero exit; only bugs show a traceback (and ``--debug`` shows it for everything)."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys

import click

from . import __version__
from .errors import CtfsError

log = logging.getLogger("ctfs")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
          "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str) -> int:
    """'2MiB' -> 2097152; '1G' -> 10**9; plain integers are bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise click.BadParameter(f"not a size: {text!r} (examples: 2MiB, 1GiB, 65536)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class Size(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        return value if isinstance(value, int) else parse_size(value)


class Duration(click.ParamType):
    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", str(value))
        if not m:
            self.fail(f"not a duration: {value!r} (examples: 30s, 5m)", param, ctx)
        return float(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]


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
    from .keys import KeySet
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
    from .keys import KeySet, write_private_file
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
    from .modeldir import encrypt_path, plan_size
    from .writer import EncryptOptions
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
    from .modeldir import inspect_file, tensor_files
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
    from .modeldir import plan_size, verify_path
    keys = _load_keys(key_file, insecure_perms)
    bar = _Progress(plan_size(path), "verifying")
    try:
        files = verify_path(path, keys, allow_unverified_plain=allow_unverified_plain, progress=bar)
    finally:
        bar.close()
    click.echo(f"ok: {len(files)} file(s) verified", err=True)


# --- mount / umount ------------------------------------------------------------------
def _ids(values, kind: str) -> list[int]:
    import grp
    import pwd
    out = []
    for v in values:
        for item in str(v).split(","):
            item = item.strip()
            if not item:
                continue
            if item.isdigit():
                out.append(int(item))
                continue
            try:
                out.append(pwd.getpwnam(item).pw_uid if kind == "uid" else grp.getgrnam(item).gr_gid)
            except KeyError:
                raise click.BadParameter(f"no such {'user' if kind == 'uid' else 'group'}: {item}") from None
    return out


def setup_logging(level: str) -> None:
    """One line per event; no timestamp under systemd (journald adds its own)."""
    under_journal = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journal else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper()), format=fmt, force=True)


@cli.command()
@click.argument("src", type=click.Path())
@click.argument("mountpoint")
@click.option("--key-provider", default="file", show_default=True,
              help="file, env, vault, systemd-creds, or a site provider (entry point ctfs.key_providers).")
@click.option("--key-file", type=click.Path(), help="JWK set (file provider).")
@click.option("--insecure-perms", is_flag=True, help="Accept a key file readable by group/others.")
@click.option("--cache-size", type=Size(), default="1GiB", show_default=True,
              help="Bound of the decrypted-chunk cache.")
@click.option("--readahead", type=int, default=3, show_default=True, help="Chunks decrypted ahead of sequential reads.")
@click.option("--direct-io", is_flag=True, help="Keep plaintext out of the kernel page cache.")
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
def mount(src, mountpoint, key_provider, key_file, insecure_perms, cache_size, readahead, direct_io,
          allow_plain, allow_unverified_plain, allow_uid, allow_gid, timeout, foreground, log_level):
    """Mount the CryptoTensors directory SRC at MOUNTPOINT as plain safetensors files.

    Returns once the mount is authorised and serving (or fails with the reason)."""
    from . import mountd
    from .mount import MountConfig, run
    if not os.path.isdir(src):
        raise CtfsError(f"{src}: not a directory")
    cfg = MountConfig(src=os.path.abspath(src), mountpoint=os.path.abspath(mountpoint),
                      provider=key_provider,
                      provider_options={"key_file": key_file, "insecure_perms": insecure_perms},
                      cache_size=cache_size, readahead=readahead, direct_io=direct_io,
                      allow_plain=allow_plain, allow_unverified_plain=allow_unverified_plain,
                      allow_uids=_ids(allow_uid, "uid"), allow_gids=_ids(allow_gid, "gid"),
                      timeout=timeout, foreground=foreground)
    setup_logging(log_level)

    def daemon() -> int:
        try:
            return run(cfg)
        except CtfsError as e:
            mountd.report_error(str(e))
            return 1

    rc = daemon() if foreground else mountd.spawn_background(daemon, cfg.mountpoint, timeout=timeout + 60)
    if rc:
        raise click.exceptions.Exit(rc)


@cli.command()
@click.argument("mountpoint")
def umount(mountpoint):
    """Unmount MOUNTPOINT (also clears the mount of a daemon that died)."""
    from . import mountd
    try:
        mountd.unmount(mountpoint)
    except mountd.MountError as e:
        raise CtfsError(str(e)) from None


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--key-file", required=True, type=click.Path(), help="The current JWK set.")
@click.option("--new-key-file", required=True, type=click.Path(), help="The JWK set to rotate to.")
@click.option("--insecure-perms", is_flag=True)
@click.option("--kid", help="Use the new master key with this kid.")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False), help="Also replace the embedded policy.")
def rewrap(path, key_file, new_key_file, insecure_perms, kid, policy_file):
    """Rotate the master key of PATH (a file or model directory): re-wrap every data key and
    re-sign each header; tensor bytes are not rewritten."""
    from .rewrap import rewrap_path
    from .writer import EncryptOptions
    old = _load_keys(key_file, insecure_perms)
    new = _load_keys(new_key_file, insecure_perms)
    policy = open(policy_file, encoding="utf-8").read() if policy_file else None
    results = rewrap_path(path, old, new, opts=EncryptOptions(kid=kid), policy=policy)
    modes = {m: sum(r["mode"] == m for r in results) for m in ("in-place", "copied", "unchanged")}
    click.echo(f"rewrapped {len(results)} file(s) to key {new.master[0].kid if len(new.master) == 1 else kid}: "
               + ", ".join(f"{v} {k}" for k, v in modes.items() if v), err=True)


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
