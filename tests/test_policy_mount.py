"""The embedded Rego policy decides at mount time, with ctfs's input document."""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from ctfs.format.keys import KeySet
from mounting import ctfs, is_mounted, mounted, write_keys

POLICY = '''package model
default allow := false
allow if {
    input.provider == "file"
    endswith(input.mount_path, "/serving")
    input.file_name == "model.safetensors"
}
reason := sprintf("provider %v at %v may not read %v", [input.provider, input.mount_path, input.file_name])
'''


def test_policy_denies_mount_with_its_reason_and_allows_with_matching_input(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(plain / "model.safetensors"))
    (tmp_path / "p.rego").write_text(POLICY)
    kf = write_keys(KeySet.generate(), tmp_path / "k.jwk")
    ctfs("encrypt", plain, tmp_path / "enc", "--key-file", kf, "--policy", tmp_path / "p.rego")
    shown = ctfs("inspect", tmp_path / "enc" / "model.safetensors").stdout
    assert 'input.file_name == "model.safetensors"' in shown

    denied = tmp_path / "elsewhere"
    denied.mkdir()
    p = ctfs("mount", tmp_path / "enc", denied, "--key-file", kf, check=False)
    assert p.returncode != 0 and not is_mounted(denied)
    assert "denied by the embedded policy" in p.stderr
    assert f"provider file at {denied} may not read model.safetensors" in p.stderr

    with mounted(tmp_path / "enc", tmp_path / "serving", kf) as mnt:
        data = open(os.path.join(mnt, "model.safetensors"), "rb").read()
        assert data.endswith(torch.arange(1000, dtype=torch.float32).numpy().tobytes())
