"""Tamper matrix: single-byte changes at thousands of positions (header, encrypted data,
digest-covered plain tensors), truncation and extension, for a v2 file with 4 KiB chunks
and a v1 file. For every case the in-process equivalent of a mount (``MountTree`` over a
directory holding the tampered file, with a ``ChunkCache``: building the tree is the mount's
authorisation) reads the whole view in 4 KiB reads. Every case must end in

* ``refused``: the tree is not built (``MountRefused``), or
* ``eio``: the mount is authorised and exactly the reads whose range intersects the
  tampered segment fail with EIO, every other read returning the original bytes, or
* ``equivalent``: the change does not alter the signed header (JSON whitespace in the
  header padding, an equivalent JSON escape): the
  mount may verify, and then every byte of the view is the original's.

What is expected of a case is computed independently of ctfs (stdlib JSON/base64 and the
layout of the original header), so a change ctfs wrongly accepts fails the test. No case
may ever serve a byte different from the original. A smaller set of cases is confirmed
through real FUSE mounts (EIO seen by a real reader, mounts refused by ``ctfs mount``).
"""
from __future__ import annotations

import collections
import errno
import json
import logging
import os
import random
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from ctfs.mount.cache import ChunkCache
from ctfs.format.keys import KeySet
from ctfs.mount.tree import MountRefused, MountTree
from ctfs.format.writer import EncryptOptions, encrypt_file
from mounting import ctfs, is_mounted, mounted, write_keys

READ = 4096
CHUNK = 4096          # v2 chunk size (and digest chunk of its plain tensors)
V1_DIGEST_CHUNK = 2 << 20
NAME = "model.safetensors"
SEED = int(os.environ.get("CTFS_TAMPER_SEED", "20250611"))
V2_CASES = int(os.environ.get("CTFS_TAMPER_CASES", "3000"))
V1_CASES = max(200, V2_CASES // 5)
JSON_WS = b" \t\n\r"


def plain_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {  # source order = data order; sizes chosen so chunks straddle 4 KiB reads
        "enc.a": rng.standard_normal(2500).astype(np.float32),                       # 10000 B
        "plain.b": rng.standard_normal(3000).astype(np.float16),                     # 6000 B
        "enc.c": rng.integers(0, 1 << 16, (64, 100), dtype=np.uint16).view(np.float16),  # 12800 B
        "plain.d": np.arange(1000, dtype=np.int32),                                  # 4000 B
        "enc.e": rng.integers(0, 256, 5003, dtype=np.uint8),                         # 5003 B
        "plain.f": rng.standard_normal(333).astype(np.float64),                      # 2664 B
        "enc.empty": np.zeros((0, 3), dtype=np.float32),
        "plain.empty": np.zeros(0, dtype=np.int64),
    }


# --- the oracle: layout and expectations from the original file, without ctfs ----------------

class Layout:
    """What the original file looks like, parsed with the stdlib only."""

    def __init__(self, data: bytes, version: int):
        self.data = data
        (self.n,) = struct.unpack("<Q", data[:8])
        self.raw_header = data[8:8 + self.n]
        self.body_end = 8 + len(self.raw_header.rstrip(b" "))  # end of the JSON object
        self.doc = json.loads(self.raw_header)
        self.data_start = 8 + self.n
        meta = self.doc["__metadata__"]
        enc = json.loads(meta["__encryption__"])
        self.sig_span = self._value_span(b'"__signature__":"')
        self.segments = []  # (lo, hi) file offsets of every verification unit
        for name, t in self.doc.items():
            if name == "__metadata__":
                continue
            s, e = t["data_offsets"]
            if s == e:
                continue
            if name in enc:
                step = CHUNK if version == 2 else e - s      # v1: one tag per tensor
            else:
                step = CHUNK if version == 2 else V1_DIGEST_CHUNK
            for lo in range(s, e, step):
                self.segments.append((self.data_start + lo, self.data_start + min(lo + step, e)))
        self.segments.sort()
        self.encrypted_ranges = [(self.data_start + t["data_offsets"][0],
                                  self.data_start + t["data_offsets"][1])
                                 for n_, t in self.doc.items() if n_ in enc]

    def _value_span(self, prefix: bytes) -> tuple[int, int]:
        i = self.raw_header.index(prefix) + len(prefix)
        j = self.raw_header.index(b'"', i)
        return 8 + i, 8 + j

    def segment_of(self, pos: int) -> tuple[int, int]:
        for lo, hi in self.segments:
            if lo <= pos < hi:
                return lo, hi
        raise AssertionError(f"offset {pos} is in no segment")

    def region(self, pos: int) -> str:
        if pos < 8:
            return "length prefix"
        if pos < self.body_end:
            return "header JSON"
        if pos < self.data_start:
            return "header padding"
        return "encrypted data" if any(lo <= pos < hi for lo, hi in self.encrypted_ranges) \
            else "plain data"

    def header_equivalence(self, pos: int, new: int) -> str | None:
        """None if the changed header is not equivalent to the original; otherwise the reason
        it is ("whitespace": must verify; "encoding": may verify)."""
        raw = bytearray(self.raw_header)
        raw[pos - 8] = new
        try:
            doc = json.loads(bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        if not isinstance(doc, dict):
            return None
        a, b = dict(doc), dict(self.doc)
        try:
            am, bm = dict(a.pop("__metadata__")), dict(b.pop("__metadata__"))
            sa, sb = am.pop("__signature__"), bm.pop("__signature__")
        except (KeyError, TypeError):
            return None
        if a != b or am != bm:
            return None
        if sa == sb:
            return "whitespace" if new in JSON_WS and pos >= self.body_end else "encoding"
        return None  # another spelling of the signature: ctfs accepts canonical base64 only


# --- running one case -----------------------------------------------------------------------

def read_view(src: str, keys: KeySet) -> list[bytes | None] | None:
    """Mount in process and read the whole view in 4 KiB reads: None if refused, else
    one entry per read (None = EIO)."""
    cache = ChunkCache(1 << 20, readahead=3)
    try:
        try:
            tree = MountTree(src, keys, cache)
        except MountRefused:
            return None
        try:
            node = tree.lookup("/" + NAME)
            fh = tree.open("/" + NAME, 0, 0, os.getpid())
            out = []
            buf = bytearray(READ)
            for off in range(0, node.size, READ):
                try:
                    n = tree.read_into(fh, off, memoryview(buf))
                    out.append(bytes(buf[:n]))
                except OSError as e:
                    assert e.errno == errno.EIO, e
                    out.append(None)
            tree.release(fh)
            return out
        finally:
            tree.close()
    finally:
        cache.close()


def check_case(what: str, got, original: list[bytes], affected: tuple[int, int] | None,
               allowed: set[str]) -> str:
    """Classify ``got`` and check it against the expectation; returns the outcome."""
    if got is None:
        outcome = "refused"
    else:
        assert len(got) == len(original), f"{what}: view size changed"
        for i, (g, o) in enumerate(zip(got, original)):
            lo, hi = i * READ, i * READ + len(o)
            hit = affected is not None and lo < affected[1] and affected[0] < hi
            if g is None:
                assert hit, f"{what}: EIO on read {lo}..{hi}, which does not touch the tampered segment {affected}"
            else:
                assert g == o, f"{what}: read {lo}..{hi} served bytes different from the original"
                assert not hit, f"{what}: read {lo}..{hi} touches the tampered segment {affected} but succeeded"
        outcome = "eio" if affected is not None else "no effect"
    assert outcome in allowed, f"{what}: outcome {outcome!r}, expected one of {sorted(allowed)}"
    return outcome


def sample_positions(lay: Layout, n: int, rng: random.Random) -> list[tuple[int, int]]:
    """(position, new byte) pairs across every region, boundaries included."""
    size = len(lay.data)
    cases = [(p, rng.randrange(256)) for p in range(8)]           # every prefix byte
    sig_lo, sig_hi = lay.sig_span
    sig = lay.data[sig_lo:sig_hi]
    last = sig_lo + len(sig.rstrip(b"=")) - 1                      # malleable last base64 char
    for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/":
        cases.append((last, c))
    for lo, hi in lay.segments:                                    # segment boundaries
        for p in (lo, hi - 1):
            cases.append((p, rng.randrange(256)))
    for p in (lay.body_end - 1, lay.body_end, lay.data_start - 1, lay.data_start, size - 1):
        cases.append((p, rng.randrange(256)))
    while len(cases) < n:
        r = rng.random()
        if r < 0.30:
            p = rng.randrange(8, lay.body_end)                     # header JSON
        elif r < 0.40:
            p = rng.randrange(lay.body_end, lay.data_start)        # header padding
        else:
            p = rng.randrange(lay.data_start, size)                # data
        if p >= lay.body_end and p < lay.data_start and rng.random() < 0.4:
            new = rng.choice(JSON_WS)                              # whitespace in the padding
        else:
            new = rng.randrange(256)
        cases.append((p, new))
    return [(p, v if v != lay.data[p] else v ^ 0x01) for p, v in cases]


@pytest.fixture(autouse=True)
def quiet_integrity_log():
    """Thousands of expected integrity failures: keep the tree's error log out of the way."""
    log = logging.getLogger("ctfs.tree")
    old = log.disabled
    log.disabled = True
    yield
    log.disabled = old


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    d = tmp_path_factory.mktemp("tamper")
    plain = d / "plain.safetensors"
    save_file(plain_tensors(), str(plain), metadata={"format": "pt"})
    keys = KeySet.generate(name="tamper")
    files = {}
    for version in (2, 1):
        src = d / f"v{version}"
        src.mkdir()
        opts = EncryptOptions(version=version, chunk_size=CHUNK, include=["enc.*"])
        encrypt_file(str(plain), str(src / NAME), keys, opts)
        original = read_view(str(src), keys)
        assert original is not None and None not in original
        files[version] = (src, original)
    view = b"".join(files[2][1])
    src_bytes = plain.read_bytes()
    (n,) = struct.unpack("<Q", src_bytes[:8])
    v2_len = len(files[2][0].joinpath(NAME).read_bytes())
    assert view[v2_len - (len(src_bytes) - 8 - n):] == src_bytes[8 + n:]  # data = plaintext
    return {"dir": d, "keys": keys, "files": files,
            "key_file": write_keys(keys, d / "keys.jwk")}


def expectation(lay: Layout, pos: int, new: int) -> tuple[tuple[int, int] | None, set[str], str]:
    region = lay.region(pos)
    if region in ("encrypted data", "plain data"):
        return lay.segment_of(pos), {"eio"}, region
    if pos < 8:
        return None, {"refused"}, region
    eq = lay.header_equivalence(pos, new)
    if eq == "whitespace":
        return None, {"no effect"}, region + " (whitespace)"
    if eq == "encoding":
        return None, {"no effect", "refused"}, region + " (equivalent encoding)"
    return None, {"refused"}, region


@pytest.mark.parametrize("version", [2, 1])
def test_single_byte_changes(matrix, version):
    src, original = matrix["files"][version]
    path = src / NAME
    data = path.read_bytes()
    lay = Layout(data, version)
    rng = random.Random(SEED + version)
    cases = sample_positions(lay, V2_CASES if version == 2 else V1_CASES, rng)
    counts: collections.Counter = collections.Counter()
    by_region: collections.Counter = collections.Counter()
    fd = os.open(path, os.O_WRONLY)
    try:
        for pos, new in cases:
            affected, allowed, region = expectation(lay, pos, new)
            os.pwrite(fd, bytes([new]), pos)
            try:
                got = read_view(str(src), matrix["keys"])
            finally:
                os.pwrite(fd, data[pos:pos + 1], pos)
            what = f"v{version} byte {pos} ({region}) {data[pos]:#04x}->{new:#04x}"
            outcome = check_case(what, got, original, affected, allowed)
            counts[outcome] += 1
            by_region[(region, outcome)] += 1
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    print(f"\nv{version}: {len(cases)} single-byte cases: {dict(counts)}")
    for (region, outcome), k in sorted(by_region.items()):
        print(f"  {region:45s} {outcome:10s} {k}")
    # the matrix really covered every kind of outcome
    assert counts["refused"] > 50 and counts["eio"] > 50 and counts["no effect"] >= 3
    assert sum(counts.values()) == len(cases)


@pytest.mark.parametrize("version", [2, 1])
def test_truncate_and_extend(matrix, version):
    src, original = matrix["files"][version]
    path = src / NAME
    data = path.read_bytes()
    lay = Layout(data, version)
    size = len(data)
    cuts = sorted({0, 1, 7, 8, 9, 100, lay.body_end, lay.data_start - 1, lay.data_start,
                   lay.data_start + 1, size - CHUNK, size - 17, size - 16, size - 1})
    tails = [b"\0", b"\0" * 7, b" ", b"\0" * CHUNK, data[lay.data_start:]]
    try:
        for cut in cuts:
            path.write_bytes(data[:cut])
            assert read_view(str(src), matrix["keys"]) is None, f"truncated to {cut} bytes: not refused"
        for tail in tails:
            path.write_bytes(data + tail)
            assert read_view(str(src), matrix["keys"]) is None, f"extended by {len(tail)} bytes: not refused"
    finally:
        path.write_bytes(data)
    print(f"\nv{version}: {len(cuts) + len(tails)} truncation/extension cases: all refused")


# --- real FUSE confirmation -------------------------------------------------------------------

def test_real_mount_confirms(matrix, tmp_path):
    """~20 cases through real mounts: EIO seen by a real reader on exactly the affected reads
    (--direct-io: the kernel passes our reads through as they are); in the default mode the
    kernel reads whole pages and more, so a read may also fail near the bad segment, but
    never returns a wrong byte; header changes make ``ctfs mount`` refuse, naming the file."""
    rng = random.Random(SEED)
    src = tmp_path / "src"
    src.mkdir()
    expected = {}
    for version in (2, 1):
        vsrc, original = matrix["files"][version]
        data = (vsrc / NAME).read_bytes()
        lay = Layout(data, version)
        picks = [rng.randrange(lo, hi) for lo, hi in rng.sample(lay.segments, min(len(lay.segments), 8 if version == 2 else 6))]
        picks.append(rng.randrange(lay.body_end, lay.data_start))  # whitespace in the padding
        for k, pos in enumerate(picks):
            new = ord("\n") if pos < lay.data_start else data[pos] ^ (1 << rng.randrange(8))
            affected, allowed, region = expectation(lay, pos, new)
            assert allowed <= {"eio", "no effect"}
            name = f"v{version}-{k}-{region.replace(' ', '_').replace('(', '').replace(')', '')}.safetensors"
            changed = bytearray(data)
            changed[pos] = new
            (src / name).write_bytes(bytes(changed))
            expected[name] = (original, affected)
    for direct in (True, False):
        extra = ["--direct-io"] if direct else []
        with mounted(src, tmp_path / "mnt", matrix["key_file"], *extra) as mnt:
            for name, (original, affected) in expected.items():
                fd = os.open(os.path.join(mnt, name), os.O_RDONLY)
                try:
                    for i, o in enumerate(original):
                        lo, hi = i * READ, i * READ + len(o)
                        hit = affected is not None and lo < affected[1] and affected[0] < hi
                        try:
                            got = os.pread(fd, READ, lo)
                        except OSError as e:
                            assert e.errno == errno.EIO
                            assert hit or not direct, f"{name}: EIO at {lo} outside {affected}"
                            continue
                        assert not hit, f"{name}: read at {lo} touches {affected} but succeeded"
                        assert got == o[:len(got)] and (len(got) == len(o) or not direct), \
                            f"{name}: wrong bytes at {lo}"
                finally:
                    os.close(fd)
    # refused mounts: header JSON, length prefix, truncation, extension
    data = (matrix["files"][2][0] / NAME).read_bytes()
    lay = Layout(data, 2)
    cases = {"json": (rng.randrange(8, lay.body_end), None), "prefix": (3, None),
             "truncated": (None, data[:-1]), "extended": (None, data + b"\0")}
    os.makedirs(tmp_path / "mnt2", exist_ok=True)
    for label, (pos, whole) in cases.items():
        bad = tmp_path / f"bad-{label}"
        shutil.rmtree(bad, ignore_errors=True)
        bad.mkdir()
        if whole is None:
            changed = bytearray(data)
            changed[pos] ^= 0x20
            whole = bytes(changed)
        (bad / f"{label}.safetensors").write_bytes(whole)
        r = ctfs("mount", bad, tmp_path / "mnt2", "--key-file", matrix["key_file"], check=False)
        assert r.returncode != 0 and f"{label}.safetensors" in r.stderr, (label, r.stderr)
        assert "Traceback" not in r.stderr and not is_mounted(tmp_path / "mnt2")
