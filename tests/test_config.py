"""/etc/ctfs/NAME.toml: parsing, validation (unknown keys name the key and its table), and
merging with the command line (only flags actually given override the file)."""
from __future__ import annotations

import os

import pytest

import ctfs.cli
import ctfs.service
from ctfs.ops.config import ConfigError, load, parse, resolve_path


def write(tmp_path, text, name="m.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_every_key_parses_and_converts(tmp_path):
    fc = load(write(tmp_path, '''
source = "enc"
mountpoint = "/mnt/x"
cache_size = "8MiB"
readahead = 0
direct_io = true
source_io = "Buffered"
fuse_reply = "copy"
allow_plain = true
allow_unverified_plain = false
allow_uids = ["root", 5, "7,8"]
allow_gids = "root"
timeout = "1m"
recheck = 30
log_level = "DEBUG"
metrics = "127.0.0.1:9101"

[provider]
name = "file"
key_file = "keys/k.jwk"
insecure_perms = true
'''))
    assert fc.values == {
        "src": str(tmp_path / "enc"), "mountpoint": "/mnt/x", "cache_size": 8 << 20, "readahead": 0,
        "direct_io": True, "source_io": "buffered", "fuse_reply": "copy", "allow_plain": True,
        "allow_unverified_plain": False, "allow_uids": [0, 5, 7, 8], "allow_gids": [0], "timeout": 60.0, "recheck": 30.0,
        "log_level": "debug", "metrics": "127.0.0.1:9101"}
    assert fc.provider == "file"
    assert fc.provider_options == {"key_file": str(tmp_path / "keys/k.jwk"), "insecure_perms": True}
    assert parse({"cache_size": 4096}).values["cache_size"] == 4096
    assert parse({"provider": "env"}).provider == "env"


@pytest.mark.parametrize("text, words", [
    ('cachesize = "1GiB"', ["'cachesize'", "top level", "cache_size"]),
    ('[mount]\nsource = "x"', ["[mount]", "unknown table", "top level"]),
    ('[provider]\nname = "file"\nkeyfile = "k"', ["'keyfile'", "[provider]", "key_file"]),
    ('[provider]\nname = "vault"\nvault_adr = "http://x"', ["'vault_adr'", "[provider]", "vault_addr"]),
    ('[provider]\nname = "systemd-creds"\ncredentials = "x"', ["'credentials'", "[provider]", "credential"]),
    ('[provider]\nname = "nope"', ["unknown key provider 'nope'"]),
    ('direct_io = "yes"', ["direct_io", "true or false"]),
    ('source_io = "mmap"', ["source_io", "auto, buffered, direct", "'mmap'"]),
    ('fuse_reply = "zero"', ["fuse_reply", "auto, copy", "'zero'"]),
    ('cache_size = "lots"', ["cache_size", "not a size"]),
    ('timeout = "soon"', ["timeout", "not a duration"]),
    ('readahead = -1', ["readahead", "non-negative"]),
    ('allow_uids = ["no-such-user-ctfs"]', ["allow_uids", "no such user: no-such-user-ctfs"]),
    ('log_level = "loud"', ["log_level", "debug, info"]),
    ('metrics = "0.0.0.0"', ["metrics", "HOST:PORT"]),
    ('source = [1]', ["source", "path"]),
    ('source = "x" x', ["not valid TOML"]),
])
def test_errors_name_the_key_and_table(tmp_path, text, words):
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as ei:
        load(path)
    msg = str(ei.value)
    assert msg.startswith(path)
    for w in words:
        assert w in msg, msg


def test_missing_file_and_config_names(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no such configuration file"):
        load(str(tmp_path / "absent.toml"))
    monkeypatch.setenv("CTFS_CONFIG_DIR", str(tmp_path))
    assert resolve_path("model") == str(tmp_path / "model.toml")
    assert resolve_path("./model") == "./model" and resolve_path("x.toml") == "x.toml"
    monkeypatch.delenv("CTFS_CONFIG_DIR")
    assert resolve_path("model") == "/etc/ctfs/model.toml"


# --- the command line over the file ---------------------------------------------------------
@pytest.fixture
def captured(monkeypatch):
    got = {}

    def fake_run(cfg, on_ready=None):
        got["cfg"] = cfg
        return 0
    monkeypatch.setattr(ctfs.service, "run", fake_run)
    monkeypatch.setattr(ctfs.cli, "setup_logging", lambda level: got.setdefault("log_level", level))
    return got


@pytest.fixture
def conf(tmp_path):
    (tmp_path / "enc").mkdir()
    (tmp_path / "other").mkdir()
    return write(tmp_path, f'''
source = "{tmp_path / 'enc'}"
mountpoint = "mnt"
cache_size = "8MiB"
readahead = 5
direct_io = true
log_level = "debug"
metrics = "127.0.0.1:9555"
[provider]
name = "systemd-creds"
credential = "from-file"
''')


def test_mount_takes_src_and_mountpoint_from_the_file(tmp_path, conf, captured):
    assert ctfs.cli.main(["mount", "--foreground", "--config", conf]) == 0
    cfg = captured["cfg"]
    assert (cfg.src, cfg.mountpoint) == (str(tmp_path / "enc"), str(tmp_path / "mnt"))
    assert (cfg.cache_size, cfg.readahead, cfg.direct_io) == (8 << 20, 5, True)
    assert cfg.provider == "systemd-creds" and cfg.provider_options["credential"] == "from-file"
    assert cfg.metrics == "127.0.0.1:9555" and cfg.foreground
    assert captured["log_level"] == "debug"  # --log-level from the file


def test_given_flags_override_the_file_and_defaults_do_not(tmp_path, conf, captured):
    argv = ["mount", str(tmp_path / "other"), str(tmp_path / "m2"), "--foreground", "--config", conf,
            "--cache-size", "2MiB", "--readahead", "3", "--log-level", "warning", "--credential", "cli"]
    assert ctfs.cli.main(argv) == 0
    cfg = captured["cfg"]
    assert (cfg.src, cfg.mountpoint) == (str(tmp_path / "other"), str(tmp_path / "m2"))
    assert cfg.cache_size == 2 << 20
    assert cfg.readahead == 3          # given, even though it equals the default
    assert cfg.direct_io is True       # not given: the file's
    assert cfg.provider == "systemd-creds" and cfg.provider_options["credential"] == "cli"
    assert captured["log_level"] == "warning"


def test_another_provider_on_the_command_line_drops_the_files_options(tmp_path, conf, captured):
    assert ctfs.cli.main(["mount", "-f", "--config", conf, "--key-provider", "file",
                          "--key-file", "/k.jwk"]) == 0
    cfg = captured["cfg"]
    assert cfg.provider == "file" and cfg.provider_options["key_file"] == "/k.jwk"
    assert "credential" not in cfg.provider_options


def test_mount_argument_errors(tmp_path, conf, captured, capsys):
    assert ctfs.cli.main(["mount", "-f"]) != 0
    assert "SRC and MOUNTPOINT are required" in capsys.readouterr().err
    assert ctfs.cli.main(["mount", "-f", "--config", conf, str(tmp_path)]) != 0
    assert "both SRC and MOUNTPOINT, or neither" in capsys.readouterr().err
    bad = write(tmp_path, 'mountpoint = "x"\nbogus = 1\n', "bad.toml")
    assert ctfs.cli.main(["mount", "-f", "--config", bad]) == 1
    err = capsys.readouterr().err
    assert "unknown key 'bogus'" in err and "Traceback" not in err
    assert "cfg" not in captured


def test_umount_reads_the_mountpoint_from_the_file(tmp_path, conf, monkeypatch, capsys):
    from ctfs.mount import mountd
    seen = []
    monkeypatch.setattr(mountd, "unmount", lambda mp: seen.append(mp))
    assert ctfs.cli.main(["umount", "--config", conf]) == 0
    assert seen == [str(tmp_path / "mnt")]
    assert ctfs.cli.main(["umount", str(tmp_path / "x")]) == 0 and seen[-1] == str(tmp_path / "x")
    assert ctfs.cli.main(["umount"]) != 0
    assert "MOUNTPOINT or --config" in capsys.readouterr().err
    nomp = write(tmp_path, 'source = "x"\n', "nomp.toml")
    assert ctfs.cli.main(["umount", "--config", nomp]) == 1
    assert "no mountpoint" in capsys.readouterr().err
    assert os.path.exists(conf)
