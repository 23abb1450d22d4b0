"""The house without cycles: every import in ``src/sfcd`` (module-level or inside a function) points down the floors
the README's architecture section describes, and no modules import each other round a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import sfcd

SRC = Path(sfcd.__file__).parent

# Floor of each top-level part of the package, lowest first. A part may import only from a lower floor (or itself).
FLOORS = [
    ("errors",),
    ("io", "paths", "devices", "conf"),
    ("config", "training"),
    ("data",),
    ("models",),
    ("activations", "report"),
    ("sae",),
    ("features", "crosscoders"),
    ("circuits",),
    ("graphs",),
    ("development",),
    ("study",),
    ("stages",),
    ("cli",),
]
FLOOR = {part: i for i, parts in enumerate(FLOORS) for part in parts}


def module_name(path: Path, src: Path = SRC) -> str:
    parts = ["sfcd", *path.relative_to(src).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(src: Path = SRC) -> dict[str, set[str]]:
    """Every ``sfcd`` module each module imports, wherever the import statement stands."""
    found: dict[str, set[str]] = {}
    for path in sorted(src.rglob("*.py")):
        name = module_name(path, src)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out = found.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name.split(".")[0] == "sfcd"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] == "sfcd":
                    out.add(target)
                    out |= {f"{target}.{a.name}" for a in node.names}  # ``from sfcd.x import module``
    modules = set(found)
    resolved = {}
    for name, targets in found.items():
        keep = set()
        for t in targets:
            while t not in modules and "." in t:
                t = t.rpartition(".")[0]
            if t in modules and t != name and t != "sfcd":
                keep.add(t)
        resolved[name] = keep
    return resolved


def part(module: str) -> str:
    return module.split(".")[1]


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{a} -> {b}"
        for a, bs in graph.items()
        for b in bs
        if a != "sfcd" and part(a) != part(b) and FLOOR[part(b)] >= FLOOR[part(a)]
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_part_of_the_package_has_a_floor():
    parts = {part(m) for m in imports() if m != "sfcd"}
    assert parts <= set(FLOOR), f"parts of sfcd with no floor in this test and the README: {sorted(parts - set(FLOOR))}"


def test_every_import_points_down_the_floors():
    assert upward(imports()) == []


def test_no_modules_import_each_other_round_a_cycle():
    assert cycles(imports()) == []


def test_the_checks_see_a_function_level_import_up_and_a_cycle(tmp_path):
    """The reader finds what the two tests above must refuse: an import inside a function from a lower floor to a
    higher one, and a cycle of relative imports inside one part."""
    pkg = tmp_path / "sfcd"
    (pkg / "data").mkdir(parents=True)
    (pkg / "study.py").write_text("X = 1\n")
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("def f():\n    from sfcd.study import X\n    return X\nfrom .b import g\n")
    (pkg / "data" / "b.py").write_text("from sfcd.data import a\n\ndef g():\n    return a\n")
    graph = imports(pkg)
    assert upward(graph) == ["sfcd.data.a -> sfcd.study"]
    assert cycles(graph) == [["sfcd.data.a", "sfcd.data.b"]]
