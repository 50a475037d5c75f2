"""Which mounts exist: ``/proc/self/mountinfo``, and mount points named without touching them."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    dev: str  # "major:minor" (the bdi name for FUSE mounts)
    mountpoint: str
    fstype: str
    source: str
    options: str = ""  # super options, e.g. "rw,user_id=0,group_id=0"


def _unescape(field: str) -> str:
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounts() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split()
            try:
                sep = parts.index("-", 6)
                entries.append(MountEntry(
                    int(parts[0]), parts[2], _unescape(parts[4]),
                    parts[sep + 1], _unescape(parts[sep + 2]), parts[sep + 3],
                ))
            except (ValueError, IndexError):
                continue
    return entries


def abs_mountpoint(mountpoint: str) -> str:
    """Absolute, symlink-resolved path without stat()ing the (maybe dead) mount itself."""
    p = os.path.abspath(os.fspath(mountpoint))
    if p == "/":
        return p
    return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))


def find_mount(mountpoint: str) -> Optional[MountEntry]:
    mp = abs_mountpoint(mountpoint)
    found = None
    for e in _mounts():  # later entries are mounted on top of earlier ones
        if e.mountpoint == mp:
            found = e
    return found
