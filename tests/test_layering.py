"""The layering rules of ARCHITECTURE.md, enforced by reading imports with `ast`.

- The pure core imports no asyncio, sockets, ssl, time, threads or anything above it.
- Nothing imports upward: core < data plane < control plane < app < cli, and inside the data
  plane each module has its own layer (DATA_PLANE below).
- The imports make no circle, except the one the data plane needs: client <-> upstream, whose
  calls on every response are native C calls once mypyc compiles them as one group.

Every import counts, including those under `if TYPE_CHECKING:` and inside functions: a type
named in an annotation ties two modules together as much as a call does.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "doproxy"

FORBIDDEN_IN_CORE = {
    "asyncio",
    "socket",
    "ssl",
    "time",
    "selectors",
    "threading",
    "uvloop",
    "httptools",
    "os",
    "subprocess",
}

# The data plane's modules from the bottom up: a module imports only from its own rank or
# below (and from the core). Two modules share a rank only when they must call each other.
DATA_PLANE = {
    "doproxy.proxy.writes": 0,  # write batching: knows no other module
    "doproxy.proxy.access": 0,  # access log sink
    "doproxy.proxy.backend": 1,  # backends and the pool: dial, eject
    "doproxy.proxy.state": 2,  # what all connections share (the listener's base class)
    "doproxy.proxy.upstream": 3,  # one backend connection ...
    "doproxy.proxy.client": 3,  # ... and one client connection, calling each other
    "doproxy.proxy.server": 4,  # the listener, on top
    "doproxy.proxy": 5,  # the package: compiled() looks at client
}

# The only circle the imports may make.
ALLOWED_CIRCLES = [{"doproxy.proxy.client", "doproxy.proxy.upstream"}]


def layer_of(module: str) -> tuple[int, int]:
    """(layer, rank): core/errors 0, data plane 1, control plane 2, app 3, cli 4; the rank
    orders the data plane's modules (DATA_PLANE)."""
    parts = module.split(".")
    if parts[0] != "doproxy":
        raise ValueError(module)
    sub = parts[1] if len(parts) > 1 else ""
    if sub in ("core", "errors", "", "_compiled"):  # _compiled: which modules mypyc builds
        return 0, 0
    if sub == "proxy":
        return 1, DATA_PLANE[module]
    if sub in ("app", "runtime", "worker"):  # worker: a worker process's composition root
        return 3, 0
    if sub in ("cli", "__main__"):
        return 4, 0
    return 2, 0  # config, inventory, demo_backend, and later health, providers, admin...


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


SOURCES = sorted(PKG.rglob("*.py"))
MODULES = {module_name(p) for p in SOURCES}


def imports(path: Path, modules: set[str] | None = None) -> list[str]:
    """Every module `path` imports, anywhere in it. `from package import module` names the
    module when it is one of `modules`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            if modules:
                out.extend(
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if f"{node.module}.{a.name}" in modules
                )
    return out


def ours(name: str) -> str | None:
    """The module of ours that an import names (a name inside one counts as the module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SOURCES:
        me = module_name(path)
        targets = {ours(i) for i in imports(path, MODULES) if i.split(".")[0] == "doproxy"}
        graph[me] = {t for t in targets if t is not None and t != me}
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_sources_found() -> None:
    assert any(p.parts[-2] == "core" for p in SOURCES)
    assert any(p.parts[-2] == "proxy" for p in SOURCES)


def test_every_data_plane_module_has_a_rank() -> None:
    proxy = {m for m in MODULES if m.startswith("doproxy.proxy")}
    assert proxy == set(DATA_PLANE), "give each data-plane module its rank in DATA_PLANE"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_no_upward_imports(path: Path) -> None:
    me = module_name(path)
    mine = layer_of(me)
    for imp in imports(path, MODULES):
        target = ours(imp) if imp.split(".")[0] == "doproxy" else None
        if target is None or target == me:
            continue
        assert layer_of(target) <= mine, (
            f"{me} (layer {mine}) imports {target} (layer {layer_of(target)})"
        )


def test_no_circles_but_client_and_upstream() -> None:
    assert [c for c in circles(import_graph()) if c not in ALLOWED_CIRCLES] == []


@pytest.mark.parametrize(
    "path", [p for p in SOURCES if "core" in p.parts], ids=lambda p: module_name(p)
)
def test_core_is_pure(path: Path) -> None:
    for imp in imports(path):
        top = imp.split(".")[0]
        assert top not in FORBIDDEN_IN_CORE, f"{module_name(path)} imports {imp}"
        if top == "doproxy":
            assert imp.startswith(("doproxy.core", "doproxy.errors")), imp


def test_the_checker_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio\nfrom doproxy.app import serve\n")
    assert imports(bad) == ["asyncio", "doproxy.app"]
    assert layer_of("doproxy.app") > layer_of("doproxy.core.balancers")
    assert layer_of("doproxy.proxy.server") > layer_of("doproxy.proxy.client")
    assert layer_of("doproxy.proxy.client") > layer_of("doproxy.proxy.backend")


def test_the_checker_finds_circles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert circles(graph) == [{"a", "b", "c"}]
    assert circles({"a": {"b"}, "b": set()}) == []
