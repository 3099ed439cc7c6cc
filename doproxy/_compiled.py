"""Which modules the install compiles with mypyc, and how to run their source instead.

COMPILED is the one list of them: setup.py compiles it (one mypyc group, so calls between them
are native C calls) and the Makefile reinstalls when one of them changes, both reading it with
`ast` (scripts/compiled-sources), so it stays a plain tuple of string literals. With
DOPROXY_PURE_PYTHON set, `use_source()` puts a finder first on sys.meta_path that loads these
modules from their .py files even where a compiled module sits next to them: the test suite
measures coverage that way, and it is a quick way to rule the compiler out when debugging.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# The request path, end to end: balancing, the retry budget and the HTTP/1.1 rules (pure
# core), write batching, the backends and their pool (every response adds to a backend's
# counters: from compiled code, an interpreted Backend's attributes were generic getattr and
# setattr calls with boxed numbers), the state every connection shares, both sides of a proxied
# exchange, and the listener.
COMPILED = (
    "doproxy.core.retry",
    "doproxy.core.balancers",
    "doproxy.core.http11",
    "doproxy.core.forwarding",
    "doproxy.proxy.writes",
    "doproxy.proxy.backend",
    "doproxy.proxy.state",
    "doproxy.proxy.upstream",
    "doproxy.proxy.client",
    "doproxy.proxy.server",
)

_ROOT = Path(__file__).resolve().parent.parent


def source_path(name: str) -> Path:
    return _ROOT.joinpath(*name.split(".")).with_suffix(".py")


class _SourceFirst(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname))


def use_source() -> None:
    if not any(isinstance(f, _SourceFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFirst())
