"""Smoke test of the benchmark harness: ``python -m benchmarks --quick`` runs every section
end to end (real mounts, gocryptfs when installed, the reference wheel, transformers) and
writes results.json and results.md."""
from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECTIONS = ("serialise", "load", "fs", "frameworks")


def medians(node, path=""):
    """Every (path, median) of the figures under node."""
    if isinstance(node, dict):
        if "median" in node and "runs" in node:
            yield path, node["median"]
            return
        for k, v in node.items():
            yield from medians(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from medians(v, f"{path}[{i}]")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("hold", [False, True], ids=["as-is", "hold-page-reporting"])
def test_quick_benchmark_run(tmp_path, hold):
    import hashlib
    import platform
    import re
    import shutil

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    order_file = pathlib.Path("/sys/module/page_reporting/parameters/page_reporting_order")
    order_before = order_file.read_text() if order_file.exists() else None
    committed = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in (ROOT / "benchmarks" / "results").rglob("*")
                 if f.is_file()}
    # the held run names no --out: a quick run then writes to a new temporary directory
    out_args = [] if hold else ["--out", str(tmp_path / "results")]
    p = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", *out_args,
                        "--workdir", str(tmp_path), *(["--hold-page-reporting"] if hold else [])],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert p.returncode == 0, f"benchmarks failed ({p.returncode}):\n{p.stderr[-6000:]}"
    if hold:
        out = pathlib.Path(re.search(r"--quick: results go to (\S+) ", p.stderr).group(1))
        assert not out.is_relative_to(ROOT) and out.is_dir()
    else:
        out = tmp_path / "results"
    # the committed full results are untouched, whatever --out says
    assert committed == {f: hashlib.sha256(f.read_bytes()).hexdigest()
                         for f in (ROOT / "benchmarks" / "results").rglob("*") if f.is_file()}
    # progress on stderr, one line per step
    assert p.stderr.count("[bench") >= 20, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    plots = res["plots"]
    png = {name: (out / name).read_bytes()[:8] for name in plots}
    if hold:
        shutil.rmtree(out)
    assert not res["errors"], res["errors"]
    # provenance: the code, the command, the CPU flags, the kernel and the versions
    prov = res["provenance"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert prov["commit"] == head and isinstance(prov["dirty"], bool)
    assert prov["command"] == "python -m benchmarks --quick " + " ".join(
        [*out_args, "--workdir", str(tmp_path), *(["--hold-page-reporting"] if hold else [])])
    flags = open("/proc/cpuinfo").read().split("\nflags", 1)[1].split("\n", 1)[0].split()
    assert prov["cpu_flags"] == {f: f in flags for f in ("aes", "vaes", "pclmulqdq", "vpclmulqdq", "avx2",
                                                          "avx512f", "avx512vl", "sha_ni")}
    assert prov["kernel"] == platform.release() and prov["date"].startswith(res["started"][:10])
    assert prov["versions"]["ctfs"] and prov["versions"]["cryptography"] and prov["versions"]["gocryptfs"]
    assert prov["page_reporting"]["available"] is (order_before is not None)
    assert "## Provenance" in md and f"commit `{head}`" in md
    # every peer a section names has figures: nothing skipped but vLLM, which --quick leaves out
    skipped = [(p_, v) for p_, v in _walk(res["sections"]) if p_.endswith("/skipped")]
    assert skipped == [("/frameworks/vllm/skipped", "--quick (pass --vllm to include it)")], skipped
    # every plot was drawn
    assert sorted(plots) == ["frameworks.png", "fs.png", "load.png", "serialise.png"], plots
    assert all(magic == b"\x89PNG\r\n\x1a\n" for magic in png.values()), png
    m = res["machine"]
    for key in ("cpu_model", "logical_cpus", "ram_bytes", "kernel", "versions"):
        assert m.get(key), key
    assert m["versions"]["ctfs"] and m["versions"]["cryptotensors"]
    # free page reporting: recorded; held off only on request (--hold-page-reporting), and
    # then put back afterwards
    pr = m["page_reporting"]
    held = hold and order_before is not None and os.geteuid() == 0
    assert pr["available"] is (order_before is not None) and pr["held"] is held
    assert pr.get("restored") is (True if held else None)
    if order_before is not None:
        assert pr["order_before"] == int(order_before)
        assert order_file.read_text() == order_before
    for section in SECTIONS:
        sec = res["sections"].get(section)
        assert isinstance(sec, dict) and "error" not in json.dumps(list(sec)), (section, sec)
        figs = list(medians(sec))
        numeric = [(p_, v) for p_, v in figs if isinstance(v, (int, float)) and math.isfinite(v)]
        assert numeric, f"no numeric figures in {section}: {figs}"
        for p_, v in numeric:
            assert v >= 0, (section, p_, v)
    # every figure is the median of --repeat (3) runs
    ser = res["sections"]["serialise"]["tiny"]["variants"]
    for name in ("st_np", "st_pt", "ref_enc_np", "ref_enc_pt", "ctfs_encrypt"):
        assert len(ser[name]["time_s"]["runs"]) == 3, name
        assert ser[name]["peak_rss"]["median"] > 0, name
    load = res["sections"]["load"]["tiny"]["variants"]
    assert set(load) >= {"st_np", "st_pt", "ref_np", "ref_pt", "ctfs_api", "mount_cold", "mount_warm"}
    for name in load:
        assert load[name]["time_s"]["median"] > 0, name
    assert load["mount_cold"]["daemon_peak_rss"]["median"] > 0
    # tensorizer's encrypted load is a peer (a test/bench dependency), paired per run
    tz = load["tz_enc"]["time_s"]["runs"]
    assert len(tz) == 3 and all(t > 0 for t in tz)
    tzp = res["sections"]["load"]["tiny"]["pairs"]["tz_enc_over_mount_cold"]
    assert tzp["runs"] == pytest.approx([a / b for a, b in zip(tz, load["mount_cold"]["time_s"]["runs"])])
    assert any(g["goal"].endswith("over tensorizer's encrypted load, worst run") for g in res["goals"])
    fs = res["sections"]["fs"]["fs"]
    assert sorted(fs) == ["ctfs", "fuse_floor", "gocryptfs", "plain"]
    for kind in ("ctfs", "gocryptfs", "fuse_floor"):
        for mode in ("seq_cold", "seq_warm", "rand_cold", "rand_warm"):
            assert len(fs[kind]["read_gbps"][mode]["runs"]) == 3, (kind, mode)  # --quick: --fs-repeat = --repeat
            assert fs[kind]["read_gbps"][mode]["median"] > 0, (kind, mode)
        # the daemon's minor faults and context switches per GB, beside its CPU
        assert fs[kind]["daemon_minflt_per_gb"]["seq_cold"]["median"] > 0, kind
        assert fs[kind]["daemon_ctxsw_per_gb"]["seq_cold"]["median"] > 0, kind
    # each ctfs step paired with the gocryptfs step right after it: per-pair ratios
    pairs = res["sections"]["fs"]["pairs"]
    for mode in ("seq_cold", "seq_warm", "rand_cold", "rand_warm"):
        r = pairs["read_gbps"][mode]
        want = [a / b for a, b in zip(fs["ctfs"]["read_gbps"][mode]["runs"], fs["gocryptfs"]["read_gbps"][mode]["runs"])]
        assert r["runs"] == pytest.approx(want) and r["min"] <= r["median"] <= r["max"], mode
    cold = next(g for g in res["goals"] if g["goal"] == "fs cold read: ctfs / gocryptfs")
    assert cold["value"] == pairs["read_gbps"]["seq_cold"]["median"] and "median of 3 pairs" in cold["detail"]
    assert "Per-pair ratios, ctfs / gocryptfs" in md
    for mode in ("seq_cold", "seq_warm", "rand_cold"):
        assert fs["ctfs"]["read_gbps"][mode]["median"] > 0, mode
    assert fs["ctfs"]["daemon_cpu_s_per_gb"]["seq_cold"]["median"] > 0
    assert fs["plain"]["read_gbps"]["seq_warm"]["median"] > 0
    # the FUSE-layer floor (no decryption) is measured beside ctfs in the same run
    assert fs["fuse_floor"]["read_gbps"]["seq_cold"]["median"] > 0
    assert fs["fuse_floor"]["daemon_cpu_s_per_gb"]["seq_cold"]["median"] >= 0
    tf = res["sections"]["frameworks"]["transformers"]["variants"]
    assert tf["plain"]["time_s"]["median"] > 0 and tf["mount_cold"]["time_s"]["median"] > 0
    goals = {g["goal"] for g in res["goals"]}
    assert any("ctfs encrypt peak RSS" in g for g in goals)
    assert any("transformers" in g for g in goals)
    assert "| goal | measured | target | result |" in md
    assert "## Serialisation" in md and "## Filesystem throughput" in md and "paper" in md
    assert "PASS" in md or "FAIL" in md
    run_line = next(line for line in md.splitlines() if line.startswith("Run "))
    assert ("--hold-page-reporting" in run_line) is hold  # the command line shown says so
    # nothing left behind: no mounts under the work directory, work directory removed
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()
    assert not [d for d in os.listdir(tmp_path) if d.startswith("ctfs-bench-")]


def _walk(node, path=""):
    """Every (path, leaf value) under node."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


def test_fuse_floor_tree_reads():
    """The floor server's tree (no mount) serves SIZE bytes of its repeating pattern,
    across block boundaries and short at EOF, like any Tree."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.fuse_floor import NAME, FloorTree

    size = (2 << 20) * 3 + 12345
    t = FloorTree(size)
    assert t.lookup("/" + NAME).size == size and t.lookup("/").kind == "dir"
    assert t.lookup("/other") is None and t.listdir("/") == [NAME]
    block = bytes(t._block)
    want = (block * 4)[:size]
    fh = t.open("/" + NAME, 0, 0, 0)
    got = bytearray()
    off = 0
    while off < size:
        out = memoryview(bytearray(1 << 20 | 777))  # odd size: reads straddle 2 MiB blocks
        n = t.read_into(fh, off, out)
        assert n == min(len(out), size - off)
        got += out[:n]
        off += n
    assert bytes(got) == want
    assert t.read_into(fh, size, memoryview(bytearray(10))) == 0
    with pytest.raises(OSError) as e:
        t.open("/nope", 0, 0, 0)
    assert e.value.errno == errno.ENOENT


@pytest.mark.parametrize("argv, want", [
    ([], 10), (["--repeat", "3"], 10), (["--repeat", "12"], 12), (["--quick"], 3),
    (["--quick", "--repeat", "2"], 2), (["--fs-repeat", "2"], 2), (["--repeat", "9", "--fs-repeat", "4"], 4),
])
def test_fs_repeat_default(argv, want):
    """Filesystem figures take at least 10 runs (ctfs/gocryptfs pairs) by default (short and the noisiest)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.runner import parse_args
    assert parse_args(argv).fs_repeat == want


def test_fs_repeat_must_be_positive(capsys):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.runner import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["--fs-repeat", "0"])
    assert e.value.code == 2 and "--fs-repeat must be >= 1" in capsys.readouterr().err


def _fake_params(tmp_path, order="9", kib="100"):
    d = tmp_path / "page_reporting"
    d.mkdir()
    (d / "page_reporting_order").write_text(order + "\n")
    (d / "reported_kib").write_text(kib + "\n")
    return d


def test_page_reporting_hold_and_restore(tmp_path):
    """The benchmark holds free page reporting off (order above the largest buddy order)
    for the run and puts the old value back, recording both."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.util import PageReportingHold
    d = _fake_params(tmp_path)
    with PageReportingHold(params=str(d)) as h:
        assert (d / "page_reporting_order").read_text() == "11\n"
        (d / "reported_kib").write_text("164\n")
    assert (d / "page_reporting_order").read_text() == "9\n"
    assert h.record == {"available": True, "held": True, "order_before": 9, "held_at": 11,
                        "reported_kib_before": 100, "reported_kib_during": 64, "restored": True}
    h.restore()  # idempotent: nothing left to restore
    assert (d / "page_reporting_order").read_text() == "9\n"


def test_page_reporting_hold_falls_back_and_can_be_declined(tmp_path):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.util import PageReportingHold

    class Upstream(PageReportingHold):  # upstream kernels cap the order at MAX_PAGE_ORDER (10)
        def _write(self, name, value):
            return int(value) <= 10 and super()._write(name, value)

    d = _fake_params(tmp_path, order="9")
    with Upstream(params=str(d)) as h:
        assert (d / "page_reporting_order").read_text() == "10\n"
    assert h.record["held_at"] == 10 and (d / "page_reporting_order").read_text() == "9\n"

    with PageReportingHold(enabled=False, params=str(d)) as h:
        assert (d / "page_reporting_order").read_text() == "9\n"
    assert h.record == {"available": True, "held": False, "order_before": 9, "reported_kib_before": 100}

    with PageReportingHold(params=str(tmp_path / "absent")) as h:
        pass
    assert h.record == {"available": False, "held": False}


def test_hold_page_reporting_option():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.runner import parse_args
    assert parse_args([]).hold_page_reporting is False
    assert parse_args(["--hold-page-reporting"]).hold_page_reporting is True


@pytest.mark.slow
def test_quick_s3_benchmark_run(tmp_path):
    """``python -m benchmarks --quick --only s3``: every method against one SeaweedFS server,
    both network profiles, per-run ratios and goals; tensorizer's encrypted load (a test
    dependency) among them."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "results"
    p = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "s3", "--out", str(out),
                        "--workdir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=540)
    assert p.returncode == 0, f"benchmarks failed ({p.returncode}):\n{p.stderr[-6000:]}"
    res = json.loads((out / "results.json").read_text())
    assert not res["errors"], res["errors"]
    sec = res["sections"]["s3"]
    assert "errors" not in sec, sec.get("errors")
    want = {"ctfs_s3", "ctfs_s3_cached", "ctfs_local", "rclone_crypt", "s3fs", "runai_c4", "runai_c8",
            "raw_gets", "tensorizer_enc"}
    for profile in ("loopback", "wan"):
        r = sec["profiles"][profile]
        assert set(r["read_gbps"]) == want, r["read_gbps"].keys()
        for name, f in r["read_gbps"].items():
            assert len(f["runs"]) == 3 and all(x > 0 for x in f["runs"]), (profile, name, f)
            assert r["client_cpu_s_per_gb"][name]["median"] > 0
        assert r["pairs"]["ctfs_s3 / rclone_crypt"]["median"] > 0
    tf = sec["transformers"]
    assert set(tf["time_s"]) == {"plain_local", "ctfs_s3", "ctfs_s3_cached", "rclone_crypt", "s3fs"}
    assert all(len(f["runs"]) == 3 and f["min"] > 0 for f in tf["time_s"].values()), tf
    assert tf["ratios"]["ctfs_s3 / plain_local"]["median"] > 0
    assert sec["skipped"] == {}
    assert sec["profiles"]["loopback"]["pairs"]["ctfs_s3 / tensorizer_enc"]["median"] > 0
    goals = {g["goal"] for g in res["goals"]}
    assert "s3 loopback: ctfs_s3 / rclone_crypt" in goals and "s3 wan: ctfs_s3 / raw_gets" in goals
    assert "## Object storage" in (out / "results.md").read_text()
