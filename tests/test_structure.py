"""The package's layering: no import loop between its parts (a part is a top-level module or a
subpackage of ``dp360rt``) and none between the modules inside a part, counting imports inside
functions too, since a lazy import hides a loop without removing it. Imports under
``if TYPE_CHECKING:`` are annotations only (never run) and are not counted."""
from __future__ import annotations

import ast
from pathlib import Path

import dp360rt

ROOT = Path(dp360rt.__file__).parent
# The one loop left, and why: PanoHead's fixture verifier (panohead/verify.py) replays the
# projector case through the inversion package, which is itself built on the PanoHead generator.
ALLOWED = {("panohead", "invert")}


def part_graph() -> dict[str, set[str]]:
    """part -> the parts it imports (relative and absolute ``dp360rt`` imports, at any depth)."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("").parts
        pkg = rel[:-1]
        part = rel[1] if len(rel) > 2 or (len(rel) == 2 and rel[1] != "__init__") else None
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = (list(pkg[:len(pkg) - node.level + 1]) if node.level else []) + (node.module or "").split(".")
                names = [target]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".") for a in node.names]
            else:
                continue
            for t in names:
                t = [x for x in t if x]
                if len(t) >= 2 and t[0] == "dp360rt" and part and t[1] != part:
                    graph.setdefault(part, set()).add(t[1])
    return graph


def _runtime_imports(tree: ast.AST):
    """The Import/ImportFrom nodes of a module that run (all but those under ``if TYPE_CHECKING:``)."""
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in typing_only]


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the package's modules it imports, by dotted name (a package is its ``__init__``;
    ``from .x import y`` points at ``x.y`` when that is a module, else at ``x``; the compiled
    extension counts as a module of its own)."""
    top = root.name
    files = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = path
    modules = set(files) | {f"{top}.{p.name.split('.')[0]}" for p in root.glob("*.so")} | {f"{top}._C"}

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
            else:
                targets = [a.name for a in node.names]
            for t in targets:
                o = owner(t) if t.split(".")[0] == top else None
                if o and o != name:
                    graph.setdefault(name, set()).add(o)
    return graph


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import loop as a path a -> ... -> a (each found once per starting edge)."""
    found = []
    for a, bs in graph.items():
        for b in bs:
            if (a, b) in ALLOWED:
                continue
            path = _path(graph, b, a)
            if path:
                found.append([a] + path)
    return found


def _path(graph, start, goal):
    seen, stack = {start}, [[start]]
    while stack:
        p = stack.pop()
        if p[-1] == goal:
            return p
        for n in graph.get(p[-1], ()):
            if n not in seen and (p[-1], n) not in ALLOWED:
                seen.add(n)
                stack.append(p + [n])
    return None


def test_no_import_loops():
    graph = part_graph()
    assert {"engine", "cli", "sampler", "model", "verify", "export"} <= set(graph)   # the scan saw the package
    assert loops(graph) == [], "import loops between dp360rt's parts: " + "; ".join(" -> ".join(p) for p in loops(graph))


def test_no_import_loops_between_modules():
    graph = module_graph()
    assert {"dp360rt.nerf.model", "dp360rt.panohead.weights", "dp360rt.serve.cli"} <= set(graph)  # the scan saw them
    found = loops(graph)
    assert found == [], "import loops between dp360rt's modules: " + "; ".join(" -> ".join(p) for p in found)


def test_the_module_check_finds_a_loop_inside_a_package(tmp_path):
    """A lazy import that closes a loop inside one subpackage is found; a TYPE_CHECKING one is not."""
    pkg = tmp_path / "pkg" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import B\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\nB = 1\n")
    assert loops(module_graph(tmp_path / "pkg")) == []
    (pkg / "b.py").write_text("B = 1\ndef f():\n    from .a import A\n    return A\n")
    assert loops(module_graph(tmp_path / "pkg")) == [["pkg.sub.a", "pkg.sub.b", "pkg.sub.a"], ["pkg.sub.b", "pkg.sub.a", "pkg.sub.b"]]


def test_the_loop_check_finds_a_loop():
    assert loops({"a": {"b"}, "b": {"c"}, "c": {"a"}}) and not loops({"a": {"b"}, "b": {"c"}})
