"""The layers written down in pyproject.toml hold, and no import closes a cycle: imports
under ``TYPE_CHECKING`` and inside functions count (a cycle hidden that way is still one)."""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest
from importlinter import configuration
from importlinter.application.use_cases import lint_imports

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    # grimp counts every import statement: module level, TYPE_CHECKING and in functions.
    return grimp.build_graph("ovis_server", include_external_packages=False)


def cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """The strongly connected sets of more than one of ``modules`` (Tarjan's algorithm,
    without recursion): each holds a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root) & modules)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    imported = graph.find_modules_directly_imported_by(child) & modules
                    work.append((child, iter(sorted(imported))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_module_imports_itself_back(graph: grimp.ImportGraph) -> None:
    modules = {name for name in graph.modules if name.startswith("ovis_server.")}
    assert len(modules) > 100  # the graph is the package's, not an empty one
    assert cycles(graph, modules) == []


def test_no_package_imports_itself_back(graph: grimp.ImportGraph) -> None:
    """The same one level up: ovis_server.jobs and ovis_server.catalogue, say, never import
    each other both ways (through any of their modules)."""

    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    packages = {package(name) for name in graph.modules}
    collapsed = grimp.ImportGraph()
    for name in packages:
        collapsed.add_module(name)
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if package(imported) != package(module):
                collapsed.add_import(importer=package(module), imported=package(imported))
    assert cycles(collapsed, packages) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for name in ("a", "b", "c", "d"):
        graph.add_module(name)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="c")
    graph.add_import(importer="c", imported="a")
    graph.add_import(importer="c", imported="d")
    assert cycles(graph, {"a", "b", "c", "d"}) == [["a", "b", "c"]]


def test_the_import_contracts_are_kept(capsys: pytest.CaptureFixture[str]) -> None:
    configuration.configure()
    kept = lint_imports(config_filename=str(PYPROJECT), cache_dir=None, no_logo=True)
    report = capsys.readouterr().out
    assert kept, report
    assert "4 kept, 0 broken" in report
