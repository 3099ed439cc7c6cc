"""The layering rules of ARCHITECTURE.md, enforced by reading imports with `ast`.

- The pure core imports no asyncio, sockets, ssl, time, threads or anything above it.
- Nothing imports upward: core < data plane < control plane < app < cli.
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


def layer_of(module: str) -> int:
    """core/errors 0, data plane 1, control plane 2, app 3, cli 4."""
    parts = module.split(".")
    if parts[0] != "doproxy":
        raise ValueError(module)
    sub = parts[1] if len(parts) > 1 else ""
    if sub in ("core", "errors", "", "_compiled"):  # _compiled: which modules mypyc builds
        return 0
    if sub == "proxy":
        return 1
    if sub in ("app", "runtime", "worker"):  # worker: a worker process's composition root
        return 3
    if sub in ("cli", "__main__"):
        return 4
    return 2  # config, inventory, demo_backend, and later health, providers, admin...


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


SOURCES = sorted(PKG.rglob("*.py"))


def test_sources_found() -> None:
    assert any(p.parts[-2] == "core" for p in SOURCES)
    assert any(p.parts[-2] == "proxy" for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_no_upward_imports(path: Path) -> None:
    me = module_name(path)
    mine = layer_of(me)
    for imp in imports(path):
        if imp.split(".")[0] != "doproxy":
            continue
        assert layer_of(imp) <= mine, f"{me} (layer {mine}) imports {imp} (layer {layer_of(imp)})"


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
