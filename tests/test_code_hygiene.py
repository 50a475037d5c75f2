"""The repository stands alone and its modules keep their private names to themselves."""
from __future__ import annotations

import ast
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
TREES = ("ctfs", "benchmarks", "tests", "format", "examples", ".ci")


def _python_files():
    for tree in ("ctfs", "benchmarks", "tests", "format"):
        yield from (ROOT / tree).rglob("*.py")


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if names:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {names}")
    assert not bad, "\n".join(bad)


def test_nothing_reads_outside_the_repository():
    pattern = re.compile(r"\.\./" + "shared|CTFS_" + "SHARED")  # (split: this file is searched too)
    hits = [f"{p.relative_to(ROOT)}" for tree in TREES for p in (ROOT / tree).rglob("*")
            if p.is_file() and p.suffix in (".py", ".sh", ".md", ".toml", ".txt", "")
            and pattern.search(p.read_text(errors="replace"))]
    assert not hits, hits


def test_no_bytecode_is_committed():
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert files and not [f for f in files if "__pycache__" in f or f.endswith((".pyc", ".pyo"))]
