"""Runs a ``TestOneInput(data: bytes)`` harness under atheris (libFuzzer), or, where atheris is
not installed, under a plain random driver that accepts the same basic flags
(``-runs=N``, ``-seed=S``, ``-max_len=L``, corpus directories/files as positional
arguments) so the harnesses stay runnable everywhere."""
from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

try:
    import atheris  # type: ignore
except ImportError:  # pragma: no cover - depends on the machine
    atheris = None

#: scratch space of this run (seed files, the case file, the seed corpus), removed at the end
WORKDIR = tempfile.mkdtemp(prefix="ctfs-fuzz-",
                           dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)


def instrumented():
    """Context manager instrumenting the ctfs imports for coverage guidance (atheris only)."""
    import contextlib
    if atheris is not None:
        return atheris.instrument_imports(include=["ctfs"])
    return contextlib.nullcontext()


def _flags(argv):
    flags, paths = {}, []
    for a in argv[1:]:
        if a.startswith("-") and "=" in a:
            k, v = a[1:].split("=", 1)
            flags[k] = v
        elif not a.startswith("-"):
            paths.append(a)
    return flags, paths


def _corpus(paths):
    for p in paths:
        if os.path.isdir(p):
            for name in sorted(os.listdir(p)):
                with open(os.path.join(p, name), "rb") as f:
                    yield f.read()
        elif os.path.isfile(p):
            with open(p, "rb") as f:
                yield f.read()


def run(test_one_input, seeds: list[bytes], mutate) -> None:
    """``seeds``: valid inputs to start from; ``mutate(data, rng) -> bytes`` for the plain
    driver (atheris mutates by itself, starting from the seeds written to a temp corpus)."""
    try:
        if atheris is not None and os.environ.get("CTFS_FUZZ_PLAIN_DRIVER") != "1":
            _run_atheris(test_one_input, seeds)
        else:
            _run_plain(test_one_input, seeds, mutate)
    finally:
        shutil.rmtree(WORKDIR, ignore_errors=True)


def _run_atheris(test_one_input, seeds) -> None:
    argv = list(sys.argv)
    flags, paths = _flags(argv)
    if not paths:  # give libFuzzer the seeds as its corpus
        corpus = os.path.join(WORKDIR, "corpus")
        os.mkdir(corpus)
        for i, s in enumerate(seeds):
            with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
                f.write(s)
        argv.append(corpus)
    if "max_len" not in flags:
        argv.append(f"-max_len={max(len(s) for s in seeds) * 2 + 64}")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()  # libFuzzer exits from C (no Python clean-up): fuzz in a child
    if pid == 0:
        try:
            atheris.Setup(argv, test_one_input)
            atheris.Fuzz()
        finally:
            os._exit(70)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        sys.exit(code if code > 0 else 128 - code)


def _run_plain(test_one_input, seeds, mutate) -> None:
    flags, paths = _flags(sys.argv)
    runs = int(flags.get("runs", "10000"))
    rng = random.Random(int(flags.get("seed", str(time.time_ns()))))
    max_len = int(flags.get("max_len", "0")) or None
    pool = list(seeds) + list(_corpus(paths))
    for s in pool:
        test_one_input(s)
    done = len(pool)
    t0 = time.monotonic()
    while runs < 0 or done < runs:
        r = rng.random()
        if r < 0.1:
            data = rng.randbytes(rng.randrange(64))
        else:
            data = mutate(rng.choice(pool), rng)
        if max_len:
            data = data[:max_len]
        test_one_input(data)
        done += 1
    why = "atheris not installed" if atheris is None else "CTFS_FUZZ_PLAIN_DRIVER=1"
    print(f"plain random driver ({why}): {done} runs in {time.monotonic() - t0:.1f}s, no failure",
          file=sys.stderr)
