"""The package's import graph follows the layering of the design (STYLE.md):

cli/demo -> train -> teachers, pruning, inheritance, data -> losses -> ops -> kernels
(kernels/limits.py, plain constants, may be read from any layer).

Every import statement counts, the ones inside functions too, so a lazy import cannot hide
a cycle or a dependency in the wrong direction.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each part of the library may import from the library (itself always allowed).
ALLOWED = {
    "kernels": set(),
    "atomic_io": set(),
    "ops": {"kernels"},
    "distributed": set(),
    "losses": {"ops", "distributed"},
    "inheritance": {"atomic_io"},
    "pruning": {"ops", "inheritance"},
    "data": {"atomic_io"},
    "teachers": {"kernels", "ops", "losses", "inheritance", "data", "atomic_io"},
    "train": {
        "kernels",
        "ops",
        "losses",
        "distributed",
        "pruning",
        "inheritance",
        "data",
        "atomic_io",
        "teachers",
    },
    "demo": {"ops", "losses", "pruning", "inheritance", "data", "train", "teachers"},
    "cli_config": {"kernels", "train"},
    "cli": {
        "kernels",
        "train",
        "teachers",
        "data",
        "demo",
        "inheritance",
        "cli_config",
        "atomic_io",
    },
    "__main__": {"cli", "demo"},
    "__init__": set(),
}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for tinyclip_fast/ and kernels/ (installed as
    tinyclip_fast.kernels)."""
    files = {}
    for path in (ROOT / "tinyclip_fast").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(p for p in parts if p != "__init__") or "tinyclip_fast"] = path
    for path in (ROOT / "kernels").rglob("*.py"):
        parts = ("tinyclip_fast", *path.relative_to(ROOT).with_suffix("").parts)
        files[".".join(p for p in parts if p != "__init__")] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The library modules ``name`` imports (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import module` imports a module; `from module import name` the module.
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def part(module: str) -> str:
    """The layer a module belongs to: its subpackage, or the top-level module's name."""
    pieces = module.split(".")
    return "__init__" if len(pieces) == 1 else pieces[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def test_every_part_is_known(graph):
    assert {part(m) for m in graph} <= set(ALLOWED), {part(m) for m in graph} - set(ALLOWED)


def test_layers_point_one_way(graph):
    wrong = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if part(target) != part(module) and part(target) not in ALLOWED[part(module)]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle(graph):
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_only_the_entry_points_import_the_demo(graph):
    users = {m for m, targets in graph.items() if any(part(t) == "demo" for t in targets)}
    assert {part(m) for m in users} <= {"cli", "__main__", "demo"}, sorted(users)


def test_kernels_import_nothing_from_the_library(graph):
    for module, targets in graph.items():
        if part(module) == "kernels":
            assert all(part(t) == "kernels" for t in targets), (module, targets)


def test_the_checker_sees_lazy_and_relative_imports(graph):
    # Guards the test itself: a lazy import inside a function and a relative import count.
    assert "tinyclip_fast.kernels.affinity_loss" in graph["tinyclip_fast.ops.affinity_loss"]
    assert "tinyclip_fast.kernels" in graph["tinyclip_fast.kernels.affinity_loss"]
    assert "tinyclip_fast.demo.plugins" in graph["tinyclip_fast.cli"]
