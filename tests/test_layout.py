"""The package's shape: no import circle, no reach into another module's private names.

Read from the source with ``ast``, so the rules hold for every import, including
those inside functions (an import inside a function still ties two modules
together); only imports under ``if TYPE_CHECKING:`` are left out, since they
never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dropgrad"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node that can run: what sits under ``if TYPE_CHECKING:`` is skipped."""
    found: list[ast.AST] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _resolve(module: str, level: int, name: str | None) -> str:
    """The absolute name of a relative import ``from <level dots><name> import ...``."""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{name}" if name else package


def imports_of(module: str) -> dict[str, str]:
    """The package modules ``module`` imports, each with the local name it is bound to."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: dict[str, str] = {}
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    found[alias.name] = alias.asname or alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node.level, node.module) if node.level else node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in MODULES:
                    found[submodule] = alias.asname or alias.name
                elif base in MODULES:
                    found.setdefault(base, "")
    found.pop(module, None)
    return found


def test_the_package_has_no_import_circle() -> None:
    graph = {module: set(imports_of(module)) for module in MODULES}
    # A package imports its own submodules; that is a parent, not a circle.
    for module in graph:
        graph[module] = {m for m in graph[module] if not m.startswith(module + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circle = path[path.index(target) :] + [target]
                pytest.fail("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_reads_another_modules_private_names(module: str) -> None:
    bound = {local: name for name, local in imports_of(module).items() if local}
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in _runtime_nodes(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            pytest.fail(f"{module} line {node.lineno} reads {bound[node.value.id]}.{node.attr}")
        if isinstance(node, ast.ImportFrom) and node.level:
            base = _resolve(module, node.level, node.module)
            for alias in node.names:
                private = alias.name.startswith("_") and f"{base}.{alias.name}" not in MODULES
                assert not private, f"{module} imports the private {base}.{alias.name}"


def test_the_checks_see_the_imports_they_judge() -> None:
    # A check that found no imports could not fail: the step's path must be visible.
    assert "dropgrad._plan" in imports_of("dropgrad.dropgrad_opt")
    assert "dropgrad.kernels" in imports_of("dropgrad._plan")
    assert "dropgrad.kernels._native" in imports_of("dropgrad.kernels._dispatch")
