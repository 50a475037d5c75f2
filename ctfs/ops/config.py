"""Mount configuration files: ``/etc/ctfs/NAME.toml`` (``ctfs mount --config``).

A file holds what ``ctfs mount`` takes on its command line; flags the user actually gave
override the file (click's parameter source tells given flags from defaults)::

    source = "/srv/models/enc/llama"        # SRC
    mountpoint = "/run/ctfs/llama"          # MOUNTPOINT
    cache_size = "4GiB"                     # --cache-size (size string or bytes)
    readahead = 3                           # --readahead
    direct_io = false                       # --direct-io
    source_io = "auto"                      # --source-io (auto, buffered or direct)
    fuse_reply = "auto"                     # --fuse-reply (auto or copy)
    allow_plain = false                     # --allow-plain
    allow_unverified_plain = false          # --allow-unverified-plain
    allow_uids = ["vllm"]                   # --allow-uid (names or numbers)
    allow_gids = []                         # --allow-gid
    timeout = "30s"                         # --timeout
    recheck = "5m"                          # --recheck (provider re-check interval)
    log_level = "info"                      # --log-level
    metrics = "127.0.0.1:9101"              # --metrics
    # source = "s3://models/llama"           # object storage (ctfs.storage.s3):
    s3_endpoint = "https://s3.example.net"  # --s3-endpoint
    s3_path_style = true                    # --s3-path-style / --s3-virtual-hosted
    s3_region = "us-east-1"                 # --s3-region
    s3_timeout = "2m"                       # --s3-timeout
    s3_concurrency = 8                      # --s3-concurrency
    s3_readahead = "64MiB"                  # --s3-readahead
    cache_dir = "/var/cache/ctfs/llama"     # --cache-dir (ciphertext only)
    cache_dir_size = "50GiB"                # --cache-dir-size

    [provider]                              # --key-provider and its options
    name = "systemd-creds"
    credential = "jwks"                     # --credential

``[provider]`` keys other than ``name`` are the provider's options, spelled as its
command-line flags without the dashes (``key_file``, ``insecure_perms``, ``credential``,
``vault_addr``, ``vault_kv_path``...): exactly the keyword arguments of the provider's
constructor, which is how unknown keys are found. ``provider = "env"`` is short for a
table with only ``name``. Relative ``source``/``mountpoint`` and provider options named
``*_file``/``*_cacert`` are relative to the file's directory. Unknown keys and tables
are errors that name the key and its table.

``--config NAME`` without a ``/`` and without ``.toml`` means ``$CTFS_CONFIG_DIR/NAME.toml``
(default ``/etc/ctfs``).
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import CtfsError
from ..mount.fuse_reply import MODES as FUSE_REPLY_MODES
from ..storage.direct import MODES as SOURCE_IO_MODES
from ..units import parse_duration, parse_size

CONFIG_DIR = "/etc/ctfs"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(CtfsError):
    """The configuration file is missing, malformed, or has unknown keys."""


def config_dir() -> str:
    return os.environ.get("CTFS_CONFIG_DIR") or CONFIG_DIR


def resolve_path(value: str) -> str:
    """``--config`` value -> file path (a bare NAME is ``<config dir>/NAME.toml``)."""
    v = os.fspath(value)
    if os.sep in v or v.endswith(".toml") or os.path.exists(v):
        return v
    return os.path.join(config_dir(), f"{v}.toml")


# --- value checkers ------------------------------------------------------------------
def _typename(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(v), type(v).__name__)


def _bool(v, where):
    if not isinstance(v, bool):
        raise ConfigError(f"{where} must be true or false, not {_typename(v)}")
    return v


def _nonneg_int(v, where):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"{where} must be a non-negative integer, not {v!r}")
    return v


def _size(v, where):
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ConfigError(f"{where} must be a size (\"4GiB\" or a number of bytes), not {_typename(v)}")
    if isinstance(v, int):
        if v <= 0:
            raise ConfigError(f"{where} must be positive, not {v}")
        return v
    try:
        return parse_size(v)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _duration(v, where):
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ConfigError(f"{where} must be a duration (\"30s\", \"5m\" or seconds), not {_typename(v)}")
    if isinstance(v, (int, float)):
        if v < 0:
            raise ConfigError(f"{where} must not be negative")
        return float(v)
    try:
        return parse_duration(v)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def resolve_ids(items, kind: str) -> list[int]:
    """Numbers and names (also comma-separated) of users or groups (``kind``) as ids;
    raises LookupError(name) for an unknown name."""
    import grp
    import pwd
    out = []
    for item in items:
        for part in (str(item).split(",") if isinstance(item, str) else [item]):
            part = part.strip() if isinstance(part, str) else part
            if part == "":
                continue
            if isinstance(part, int) or part.isdigit():
                out.append(int(part))
                continue
            try:
                out.append(pwd.getpwnam(part).pw_uid if kind == "user" else grp.getgrnam(part).gr_gid)
            except KeyError:
                raise LookupError(part) from None
    return out


def _ids(kind: str) -> Callable:
    def check(v, where):
        items = v if isinstance(v, list) else [v]
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise ConfigError(f"{where} must list {kind} names or numbers, not {_typename(item)}")
        try:
            return resolve_ids(items, kind)
        except LookupError as e:
            raise ConfigError(f"{where}: no such {kind}: {e.args[0]}") from None
    return check


def _path(v, where):
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where} must be a path (a string)")
    return v


def _one_of(choices):
    """A checker for a string that must be one of CHOICES (any case); gives it lower-cased."""
    def check(v, where):
        if not isinstance(v, str) or v.lower() not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(choices)}, not {v!r}")
        return v.lower()
    return check


def _metrics(v, where):
    if v is False or v == "":
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise ConfigError(f"{where} must be an address string such as \"127.0.0.1:9101\"")
    from .metrics import parse_address
    try:
        parse_address(v)
    except CtfsError as e:
        raise ConfigError(f"{where}: {e}") from None
    return v


# file key -> (MountConfig field, click parameter of ``ctfs mount``, checker)
KEYS: dict[str, tuple[str, str, Callable]] = {
    "source": ("src", "src", _path),
    "mountpoint": ("mountpoint", "mountpoint", _path),
    "cache_size": ("cache_size", "cache_size", _size),
    "readahead": ("readahead", "readahead", _nonneg_int),
    "direct_io": ("direct_io", "direct_io", _bool),
    "source_io": ("source_io", "source_io", _one_of(SOURCE_IO_MODES)),
    "fuse_reply": ("fuse_reply", "fuse_reply", _one_of(FUSE_REPLY_MODES)),
    "allow_plain": ("allow_plain", "allow_plain", _bool),
    "allow_unverified_plain": ("allow_unverified_plain", "allow_unverified_plain", _bool),
    "allow_uids": ("allow_uids", "allow_uid", _ids("user")),
    "allow_gids": ("allow_gids", "allow_gid", _ids("group")),
    "timeout": ("timeout", "timeout", _duration),
    "recheck": ("recheck", "recheck", _duration),
    "log_level": ("log_level", "log_level", _one_of(LOG_LEVELS)),
    "metrics": ("metrics", "metrics", _metrics),
    "s3_endpoint": ("s3_endpoint", "s3_endpoint", _path),
    "s3_path_style": ("s3_path_style", "s3_path_style", _bool),
    "s3_region": ("s3_region", "s3_region", _path),
    "s3_timeout": ("s3_timeout", "s3_timeout", _duration),
    "s3_concurrency": ("s3_concurrency", "s3_concurrency", _nonneg_int),
    "s3_readahead": ("s3_readahead", "s3_readahead", _size),
    "cache_dir": ("cache_dir", "cache_dir", _path),
    "cache_dir_size": ("cache_dir_size", "cache_dir_size", _size),
}
PATH_KEYS = ("source", "mountpoint", "cache_dir")


@dataclass
class FileConfig:
    """What one configuration file says (only the keys it has)."""

    path: str
    values: dict = field(default_factory=dict)            # MountConfig field -> value
    provider: str | None = None                            # [provider] name
    provider_options: dict = field(default_factory=dict)  # [provider] other keys


def provider_option_names(name: str) -> set[str] | None:
    """The option keys provider ``name`` takes (None: it takes any keyword)."""
    from ..auth.providers import ProviderError, provider_class
    try:
        params = inspect.signature(provider_class(name)).parameters.values()
    except ProviderError as e:
        raise ConfigError(str(e)) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"key provider {name!r} cannot be inspected: {e}") from None
    named = {p.name for p in params
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    if not named and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return named


def _relative_to(base: str, value):
    if isinstance(value, str) and value and not os.path.isabs(value) and "://" not in value:
        return os.path.normpath(os.path.join(base, os.path.expanduser(value)))
    return value


def parse(data: dict, path: str = "<config>") -> FileConfig:
    """Validate a parsed TOML document."""
    base = os.path.dirname(os.path.abspath(path))
    fc = FileConfig(path=path)
    for key, value in data.items():
        if key == "provider":
            continue
        if key not in KEYS:
            kind = "table" if isinstance(value, dict) else "key"
            shown = f"[{key}]" if isinstance(value, dict) else repr(key)
            raise ConfigError(f"{path}: unknown {kind} {shown} at the top level "
                              f"(known keys: {', '.join(sorted([*KEYS, 'provider']))})")
        fieldname, _, check = KEYS[key]
        value = check(value, f"{path}: {key}")
        if key in PATH_KEYS:
            value = _relative_to(base, value)
        fc.values[fieldname] = value
    prov = data.get("provider")
    if prov is None:
        return fc
    if isinstance(prov, str):
        prov = {"name": prov}
    if not isinstance(prov, dict):
        raise ConfigError(f"{path}: provider must be a table ([provider]) or a provider name")
    name = prov.get("name", "file")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: name in [provider] must be a provider name (a string)")
    try:
        accepted = provider_option_names(name)
    except ConfigError as e:
        raise ConfigError(f"{path}: [provider] name: {e}") from None
    for key, value in prov.items():
        if key == "name":
            continue
        if accepted is not None and key not in accepted:
            raise ConfigError(f"{path}: unknown key {key!r} in [provider] (provider {name!r} takes: "
                              f"{', '.join(sorted(accepted)) or 'no options'})")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: {key} in [provider] must be a string, number or boolean")
        if key.endswith(("_file", "_cacert")):
            value = _relative_to(base, value)
        fc.provider_options[key] = value
    fc.provider = name
    return fc


def load(path: str) -> FileConfig:
    """Read and validate a configuration file (``--config`` value accepted as is)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError("reading --config files on Python < 3.11 needs the tomli package") from None
    path = resolve_path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse(data, path)


def given_parameters(ctx) -> set[str]:
    """Names of the click parameters the user actually gave (command line or environment)."""
    from click.core import ParameterSource
    given = set()
    for name in ctx.params:
        src = ctx.get_parameter_source(name)
        if src is not None and src not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            given.add(name)
    return given


def apply(cfg, fc: FileConfig | None, given: set[str]):
    """``cfg`` (a MountConfig built from the command line, defaults included) with every
    value of ``fc`` whose flag was not given; returns a new MountConfig."""
    if fc is None:
        return cfg
    changes: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cfg)}
    for fieldname, param, _ in KEYS.values():
        if fieldname in fc.values and param not in given and fieldname in names:
            changes[fieldname] = fc.values[fieldname]
    provider = cfg.provider
    if fc.provider is not None and "key_provider" not in given:
        provider = changes["provider"] = fc.provider
    if fc.provider_options and fc.provider == provider:
        opts = dict(cfg.provider_options)
        for key, value in fc.provider_options.items():
            if key not in given:
                opts[key] = value
        changes["provider_options"] = opts
    return dataclasses.replace(cfg, **changes)
