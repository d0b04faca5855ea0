"""The package's import structure, read from source with `ast` (no module is imported).

Parsing instead of importing sees every import, including those inside functions and under
`if TYPE_CHECKING:` that an import-time check would miss, and needs neither torch nor a GPU.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


def find_repo_root(start: Path) -> Path:
    """The nearest folder at or above `start` holding pyproject.toml.

    Walking up (rather than a fixed `parents[1]`) keeps this working if the test moves into
    a subfolder of tests/.
    """
    for folder in [start, *start.parents]:
        if (folder / "pyproject.toml").is_file():
            return folder
    raise FileNotFoundError(f"no pyproject.toml at or above {start}")


REPO = find_repo_root(Path(__file__).resolve().parent)
PACKAGE_NAME = "grpo_ensemble"
PACKAGE = REPO / PACKAGE_NAME


@dataclass(frozen=True, order=True)
class Edge:
    """`source` imports `target` (both module names) at `path:line`."""

    source: str
    target: str
    path: Path
    line: int


def module_name(path: Path, package_root: Path, package: str) -> str:
    """`pkg/x/y.py` -> `pkg.x.y`; `pkg/x/__init__.py` -> `pkg.x`."""
    parts = list(path.relative_to(package_root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def discover_modules(package_root: Path, package: str) -> dict[str, Path]:
    """Every module of the package by name, packages (their `__init__.py`) included."""
    return {
        module_name(path, package_root, package): path
        for path in sorted(package_root.rglob("*.py"))
    }


def resolve_from(module: str, is_package: bool, level: int, target: str | None) -> str | None:
    """The absolute name a `from` import refers to; None if it climbs above the top level.

    Level 1 is the containing package: the module's parent, or the module itself when it is
    a package's `__init__.py`.
    """
    if level == 0:
        return target
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 >= len(parts):
        return None
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_in(
    tree: ast.AST, module: str, is_package: bool, modules: set[str]
) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import statement anywhere in `tree`.

    `ast.walk` visits function bodies, TYPE_CHECKING blocks and try/except alike. For
    `from P import name` the target is the submodule `P.name` when there is one, else `P`.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = resolve_from(module, is_package, node.level, node.module)
            if base is None:
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield (submodule if submodule in modules else base), node.lineno


def direct_imports(package_root: Path, package: str) -> list[Edge]:
    """Each import of a module of the package, as written (no parent packages added).

    A set, because `from P import a, b` names P once per imported name.
    """
    modules = discover_modules(package_root, package)
    names = set(modules)
    edges = set()
    for source, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for target, line in imports_in(tree, source, path.name == "__init__.py", names):
            if target in names:
                edges.add(Edge(source, target, path, line))
    return sorted(edges)


def is_inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def parent_packages(module: str) -> Iterator[str]:
    """`a.b.c` -> `a.b`, `a` (the packages Python initialises before `a.b.c`)."""
    parts = module.split(".")
    for end in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:end])


def import_edges(package_root: Path, package: str) -> list[Edge]:
    """The import graph: direct imports plus the parent `__init__`s they load.

    The top-level `__init__` is left out as an implied parent: it re-exports the public API
    from everywhere, so it would put every module on a cycle no author can act on. A parent
    that contains the importer is left out too: it is already loaded when the importer runs.
    """
    modules = set(discover_modules(package_root, package))
    edges = set()
    for edge in direct_imports(package_root, package):
        edges.add(edge)
        for parent in parent_packages(edge.target):
            if parent != package and parent in modules and not is_inside(edge.source, parent):
                edges.add(Edge(edge.source, parent, edge.path, edge.line))
    return sorted(edges)


def graph_of(edges: Iterable[Edge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    return graph


def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative so that a long import chain cannot hit the recursion limit."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(components)


def shortest_path(
    graph: dict[str, set[str]], start: str, goal: str, allowed: set[str]
) -> list[str]:
    """Breadth-first path start..goal through `allowed` nodes (one exists inside an SCC)."""
    came_from: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            break
        for child in sorted(graph[node] & allowed):
            if child not in came_from:
                came_from[child] = node
                queue.append(child)
    path = [goal]
    while (previous := came_from[path[-1]]) is not None:
        path.append(previous)
    return path[::-1]


def rotate(cycle: list[str]) -> list[str]:
    """The same cycle starting at its smallest module, so that each is reported once."""
    start = cycle.index(min(cycle))
    return cycle[start:] + cycle[:start]


def find_cycles(edges: Iterable[Edge]) -> list[list[str]]:
    """Cycles (as module lists, the first module not repeated) covering every edge on one.

    An SCC can hold many cycles; listing the shortest cycle through each of its edges shows
    every import that would have to go to break it, without listing every possible cycle.
    """
    graph = graph_of(edges)
    cycles: list[list[str]] = []
    for component in strongly_connected_components(graph):
        members = set(component)
        if len(component) == 1:
            if component[0] in graph[component[0]]:
                cycles.append(component)
            continue
        covered: set[tuple[str, str]] = set()
        for source in component:
            for target in sorted(graph[source] & members):
                if (source, target) in covered:
                    continue
                cycle = [source, *shortest_path(graph, target, source, members)[:-1]]
                covered.update(zip(cycle, cycle[1:] + cycle[:1], strict=True))
                if rotate(cycle) not in cycles:
                    cycles.append(rotate(cycle))
    return cycles


def describe_cycle(cycle: list[str], edges: Iterable[Edge], relative_to: Path) -> str:
    """`a -> b -> a`, then each edge with the file:line of the imports that make it."""
    sites: dict[tuple[str, str], list[str]] = {}
    for edge in edges:
        where = f"{edge.path.relative_to(relative_to)}:{edge.line}"
        sites.setdefault((edge.source, edge.target), []).append(where)
    closed = [*cycle, cycle[0]]
    lines = [" -> ".join(closed)]
    for source, target in zip(closed, closed[1:], strict=False):
        lines.append(f"    {source} -> {target}  ({', '.join(sites[source, target])})")
    return "\n".join(lines)


def test_no_import_cycles():
    modules = discover_modules(PACKAGE, PACKAGE_NAME)
    edges = import_edges(PACKAGE, PACKAGE_NAME)
    # Guards against a walk that silently finds nothing (wrong root, renamed package).
    assert len(modules) > 20, f"only {len(modules)} modules found under {PACKAGE}"
    assert len(edges) > 20, f"only {len(edges)} import edges found under {PACKAGE}"
    cycles = find_cycles(edges)
    tangled = [c for c in strongly_connected_components(graph_of(edges)) if len(c) > 1]
    report = "\n".join(
        [f"modules that import each other: {', '.join(c)}" for c in tangled]
        + [describe_cycle(cycle, edges, REPO) for cycle in cycles]
    )
    assert not cycles, f"{len(cycles)} import cycle(s) in {PACKAGE_NAME}:\n{report}"


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "pkg"


TINY_PACKAGE = {
    "pkg/__init__.py": "from .a import f\n",
    "pkg/a.py": "import os\n\n\ndef f():\n    import pkg.b\n\n    return pkg.b, os\n",
    "pkg/b.py": (
        "from typing import TYPE_CHECKING\n"
        "\n"
        "if TYPE_CHECKING:\n"
        "    from . import a\n"
        "try:\n"
        "    from .sub.c import x\n"
        "except ImportError:\n"
        "    x = None\n"
    ),
    "pkg/sub/__init__.py": "from .c import x\n",
    "pkg/sub/c.py": "import json\n\nfrom ..a import f as x\n",
}


def test_cycle_finder_finds_cycles(tmp_path: Path):
    package = write_package(tmp_path, TINY_PACKAGE)
    edges = import_edges(package, "pkg")
    found = {
        (edge.source, edge.target, edge.path.relative_to(tmp_path), edge.line) for edge in edges
    }
    assert found == {
        ("pkg", "pkg.a", Path("pkg/__init__.py"), 1),
        ("pkg.a", "pkg.b", Path("pkg/a.py"), 5),  # inside a function
        ("pkg.b", "pkg.a", Path("pkg/b.py"), 4),  # under TYPE_CHECKING
        ("pkg.b", "pkg.sub.c", Path("pkg/b.py"), 6),  # inside try
        ("pkg.b", "pkg.sub", Path("pkg/b.py"), 6),  # parent package of pkg.sub.c
        ("pkg.sub", "pkg.sub.c", Path("pkg/sub/__init__.py"), 1),  # `.` is pkg.sub itself
        ("pkg.sub.c", "pkg.a", Path("pkg/sub/c.py"), 3),  # `..` from pkg.sub is pkg
    }
    assert find_cycles(edges) == [
        ["pkg.a", "pkg.b"],
        ["pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"],
        ["pkg.a", "pkg.b", "pkg.sub.c"],
    ]
    assert describe_cycle(["pkg.a", "pkg.b"], edges, tmp_path).splitlines() == [
        "pkg.a -> pkg.b -> pkg.a",
        "    pkg.a -> pkg.b  (pkg/a.py:5)",
        "    pkg.b -> pkg.a  (pkg/b.py:4)",
    ]

    # Without the function-level import in a.py nothing leads back to pkg.a.
    (package / "a.py").write_text("def f():\n    return 1\n", encoding="utf-8")
    assert find_cycles(import_edges(package, "pkg")) == []


def test_cycle_finder_reports_self_loops():
    edges = [Edge("pkg.a", "pkg.a", Path("pkg/a.py"), 1), Edge("pkg.a", "pkg.b", Path("x"), 2)]
    assert find_cycles(edges) == [["pkg.a"]]


def is_engine_client(module: str, package: str) -> bool:
    """Every module but the engine's own and the built-in plugins (which register its `hf`
    generator): the trainer, the rollout and the rest reach the engine only through the
    generator interface and the plugin registry, so that the engine can change, or another
    generator replace it, without touching training."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != package:
        return False
    return parts[1] != "engine" and parts[1:3] != ["plugins", "builtin"]


def engine_imports(package_root: Path, package: str) -> list[str]:
    """`file:line: source imports target` for each import of the engine by an engine client."""
    engine = f"{package}.engine"
    return [
        f"{edge.path.relative_to(package_root.parent)}:{edge.line}: "
        f"{edge.source} imports {edge.target}"
        for edge in direct_imports(package_root, package)
        if is_engine_client(edge.source, package) and is_inside(edge.target, engine)
    ]


def test_engine_seam_check_finds_imports(tmp_path: Path):
    package = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/engine/__init__.py": "",
            "pkg/engine/kv.py": "",
            "pkg/engine/hf.py": "from .kv import Cache\n",
            "pkg/plugins/__init__.py": "",
            "pkg/plugins/builtin/__init__.py": "",
            "pkg/plugins/builtin/gen.py": "from ...engine.hf import HF\n",
            "pkg/trainer/__init__.py": "",
            "pkg/trainer/loop.py": "def f():\n    from ..engine.kv import Cache\n",
            "pkg/rollout.py": "from pkg import engine\n",
            "pkg/trainer/step.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
            "    import pkg.engine.kv\n",
            "pkg/other.py": "import os\n",
        },
    )
    assert engine_imports(package, "pkg") == [
        "pkg/rollout.py:1: pkg.rollout imports pkg.engine",
        "pkg/trainer/loop.py:2: pkg.trainer.loop imports pkg.engine.kv",
        "pkg/trainer/step.py:4: pkg.trainer.step imports pkg.engine.kv",
    ]


def test_engine_behind_the_seam():
    offending = engine_imports(PACKAGE, PACKAGE_NAME)
    assert not offending, (
        f"modules outside {PACKAGE_NAME}.engine and the built-in plugins import the engine "
        "directly; go through the generator interface (its capabilities) and the plugin "
        "registry instead:\n" + "\n".join(offending)
    )
