"""The house's floors, read from the code's imports with `ast` (nothing is imported or run):
no circle among megedit's modules, the runtime at the bottom, EditedModel, the server and the
baselines on the runtime and not on the harness, and no megedit import hidden inside a function."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "megedit"

# Imports inside functions that load an optional extra (FastAPI and uvicorn for `megedit serve`).
OPTIONAL_EXTRAS = {("megedit.serve", "megedit.serve.app"), ("megedit.serve", "megedit.serve.guard")}
# The CLI imports its verbs' modules on use: `megedit --help` and usage errors must not wait for
# torch (test_cli_interface.py checks it).
DEFERRING = "megedit.cli"

# what the runtime may stand on: running an LM, the neuron, prompt formats, files, errors
GROUND = ("megedit.arch", "megedit.errors", "megedit.io", "megedit.lm", "megedit.models", "megedit.neuron",
          "megedit.parallel", "megedit.data")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the megedit module imported
    line: int
    in_function: bool


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(source: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The megedit modules an `import from` names: the submodules it imports, else the module."""
    if node.level:
        parts = source.split(".") if is_package else source.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _owner(name: str) -> str | None:
    """The megedit module a dotted name lies in (a module, or a name inside one)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports_of(module: str) -> list[Import]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = _resolve(module, path.name == "__init__.py", node)
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            target = _owner(name) if name.startswith("megedit") else None
            if target and target != module:
                found.append(Import(module, target, node.lineno, id(node) in inside))
    return found


IMPORTS = [i for m in MODULES for i in _imports_of(m)]


def _under(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in IMPORTS:
        graph[i.source].add(i.target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph (its modules in order, the first repeated), None when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _reach(module: str) -> set[str]:
    graph, seen, todo = _graph(), set(), [module]
    while todo:
        for n in graph[todo.pop()] - seen:
            seen.add(n)
            todo.append(n)
    return seen


def test_the_parser_sees_the_imports_it_should():
    """A check of the checker: known arrows are found, relative and absolute alike."""
    arrows = {(i.source, i.target) for i in IMPORTS}
    assert ("megedit.edited", "megedit.runtime.subject") in arrows
    assert ("megedit.eval.runner", "megedit.runtime.decoding") in arrows
    assert ("megedit.living", "megedit.edited") in arrows
    assert ("megedit.edited", "megedit") in arrows  # `from . import __version__`
    assert len(MODULES) > 50


def test_no_circle_among_the_modules():
    """Imports inside functions and under TYPE_CHECKING count too: a circle they dodge is a circle."""
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_a_circle_would_be_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_the_runtime_stands_on_the_ground_floor_only():
    runtime = [i for i in IMPORTS if _under(i.source, ("megedit.runtime",))]
    assert runtime
    up = [i for i in runtime if not _under(i.target, GROUND + ("megedit.runtime",))]
    assert not up, f"the runtime imports from above it: {up}"


@pytest.mark.parametrize("packages", [("megedit.edited",), ("megedit.serve",), ("megedit.baselines",),
                                      ("megedit.runtime",)])
def test_the_product_the_server_and_the_baselines_do_not_import_the_harness(packages):
    wrong = [i for i in IMPORTS if _under(i.source, packages) and _under(i.target, ("megedit.eval",))]
    assert not wrong, f"{packages[0]} imports the harness: {wrong}"


@pytest.mark.parametrize("packages", [("megedit.eval",), ("megedit.serve",), ("megedit.baselines",),
                                      ("megedit.runtime",), ("megedit.stages",)])
def test_nothing_below_the_fitting_side_imports_edited(packages):
    wrong = [i for i in IMPORTS if _under(i.source, packages) and i.target == "megedit.edited"]
    assert not wrong, f"{packages[0]} stands on EditedModel: {wrong}"


def test_edited_reaches_no_scoring_fitting_driver_server_or_cli_module():
    """All EditedModel needs to route, generate and save, imports included, is inference: the
    runtime, the ground floor, and the router, generator and encoder networks it holds. Adding and
    removing edits (living.py) take an EditedModel; it does not reach them."""
    drivers = ("megedit.eval", "megedit.editor", "megedit.living", "megedit.serve", "megedit.cli",
               "megedit.baselines", "megedit.config", "megedit.stages.fit_neurons", "megedit.stages.routing",
               "megedit.stages.variants")
    assert not {m for m in _reach("megedit.edited") if _under(m, drivers)}


def test_no_megedit_import_inside_a_function():
    """Imports sit at the top of their module, where the floors can be read; only optional extras
    (and the CLI, which defers torch) import on use."""
    hidden = [i for i in IMPORTS if i.in_function and not _under(i.source, (DEFERRING,))
              and (i.source, i.target) not in OPTIONAL_EXTRAS]
    assert not hidden, "\n".join(f"{MODULES[i.source].relative_to(SRC.parent)}:{i.line} imports {i.target}"
                                 for i in hidden)
