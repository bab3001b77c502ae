"""The package's layering: no import loop between its parts (a part is a top-level module or a
subpackage of ``dp360rt``), counting imports inside functions too, since a lazy import hides a
loop without removing it."""
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
    assert {"pipeline", "runtime", "sampler", "model", "verify", "export"} <= set(graph)   # the scan saw the package
    assert loops(graph) == [], "import loops between dp360rt's parts: " + "; ".join(" -> ".join(p) for p in loops(graph))


def test_the_loop_check_finds_a_loop():
    assert loops({"a": {"b"}, "b": {"c"}, "c": {"a"}}) and not loops({"a": {"b"}, "b": {"c"}})
