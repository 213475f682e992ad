"""The package's layers, read from its imports (``ast``, nothing imported).

Every import counts: module level, inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "replica_router"

# Decide, with no I/O: they may import each other and a few leaf modules of types.
PURE = {"lsn", "topology", "policy", "routing", "session"}
LEAVES = {"errors", "dsn", "classify", "_builtin_functions"}
# What a pure module must never import: drivers, pools, threads, sockets, event loops.
IO_MODULES = {
    "asyncio",
    "concurrent",
    "psycopg",
    "psycopg2",
    "psycopg_pool",
    "selectors",
    "socket",
    "subprocess",
    "threading",
}
# Integrations build on the public surface, never on the core's private modules.
PRIVATE_CORE = {"_cluster_base", "_connection_base"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(modules of this package, top-level outside packages) that ``path`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    internal: set[str] = set()
    external: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name
                (internal if target in known else external).add(
                    target if target in known else target.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "replica_router":
                external.add(target.split(".")[0])
                continue
            for alias in node.names:  # ``from . import consistency`` imports a module
                sub = f"{target}.{alias.name}"
                internal.add(sub if sub in known else target)
    internal.discard(name)
    return internal, external


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    known = set(modules)
    internal, external = {}, {}
    for name, path in modules.items():
        internal[name], external[name] = _imports(name, path, known)
    return internal, external


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _submodules(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without the package ``__init__`` modules' re-exports (importing a
    submodule runs its package's ``__init__``, which is not a dependency of ours)."""
    return {n: {d for d in deps if d != "replica_router"} for n, deps in graph.items()}


def test_the_import_graph_is_read() -> None:
    internal, external = _graph()
    assert "replica_router.cluster_async" in internal["replica_router.cluster"]
    assert "replica_router.routing" in internal["replica_router.cluster_async"]
    assert "psycopg" in external["replica_router.connection_async"]


def test_no_module_imports_one_that_imports_it_back() -> None:
    internal, _ = _graph()
    assert _cycles(_submodules(internal)) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_pure_decisions_do_no_io_and_depend_only_on_pure_modules() -> None:
    internal, external = _graph()
    allowed = {f"replica_router.{m}" for m in PURE | LEAVES}
    for module in PURE:
        name = f"replica_router.{module}"
        assert external[name] & IO_MODULES == set(), name
        assert internal[name] <= allowed, (name, internal[name] - allowed)


def test_integrations_use_no_private_core_module() -> None:
    internal, _ = _graph()
    for name, deps in internal.items():
        if name.startswith("replica_router.integrations."):
            private = {d for d in deps if d.rpartition(".")[2] in PRIVATE_CORE}
            assert private == set(), name


def test_integrations_call_no_private_cluster_member() -> None:
    """``cluster._x`` / ``self._cluster._x`` in an integration: the public seam is all
    an integration may use (``route_read``, ``record_write``, ``checkout``...)."""
    for path in (PACKAGE / "integrations").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                owner = ast.unparse(node.value)
                assert not owner.endswith("cluster"), (
                    f"{path.name}:{node.lineno} {owner}.{node.attr}"
                )
