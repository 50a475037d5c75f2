"""The package's layers (ARCHITECTURE.md): imports only go down, and no module imports
itself back through others, counting the imports inside functions too."""
from __future__ import annotations

import ast
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "ctfs"

#: lowest first; a module may import its own layer and the ones before it
LAYERS = [
    ("base", ("ctfs.errors", "ctfs.units")),
    ("format", ("ctfs.format",)),
    ("storage", ("ctfs.storage",)),
    ("mount", ("ctfs.mount",)),
    ("auth", ("ctfs.auth",)),
    ("ops", ("ctfs.ops",)),
    ("top", ("ctfs", "ctfs.api", "ctfs.cli", "ctfs.service", "ctfs.keys")),
]


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(mod: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or (p != "ctfs" and mod.startswith(p + "."))) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{mod} is in no layer: add it to LAYERS and ARCHITECTURE.md"
    return best[0]


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports(mod: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Every ctfs module MOD imports, anywhere in its body."""
    is_pkg = path.name == "__init__.py"
    package = mod if is_pkg else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "ctfs"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ctfs":
                continue
            for a in node.names:  # "from pkg import submodule" imports the submodule
                sub = f"{target}.{a.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m != mod}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: {t for t in imports(m, p, known) if t in known} for m, p in mods.items()}


def test_every_module_is_in_a_layer():
    for m in modules():
        layer(m)


def test_imports_only_go_down():
    up = [f"{m} ({LAYERS[layer(m)][0]}) imports {t} ({LAYERS[layer(t)][0]})"
          for m, targets in graph().items() for t in sorted(targets) if layer(t) > layer(m)]
    assert not up, "\n".join(up)


def test_format_imports_nothing_else():
    g = graph()
    bad = [f"{m} imports {t}" for m, ts in g.items() if m.startswith("ctfs.format")
           for t in ts if not (t.startswith("ctfs.format") or t == "ctfs.errors")]
    assert not bad, bad


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(g[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checks above can fail: a format module importing the mount, and a pair of
    modules importing each other inside functions, are both reported."""
    pkg = tmp_path / "ctfs"
    for d in ("format", "mount"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "format" / "a.py").write_text("def f():\n    from ..mount import b\n")
    (pkg / "mount" / "b.py").write_text("def g():\n    from ..format import a\n")
    me = sys.modules[__name__]
    monkeypatch.setattr(me, "ROOT", tmp_path)
    monkeypatch.setattr(me, "PKG", pkg)
    g = graph()
    assert g["ctfs.format.a"] == {"ctfs.mount.b"} and g["ctfs.mount.b"] == {"ctfs.format.a"}
    with pytest.raises(AssertionError, match=re.escape("ctfs.format.a (format) imports ctfs.mount.b (mount)")):
        test_imports_only_go_down()
    with pytest.raises(AssertionError, match=re.escape("ctfs.format.a -> ctfs.mount.b -> ctfs.format.a")):
        test_no_import_cycles()
