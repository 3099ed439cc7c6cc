"""Build hook: compile the data plane's hottest modules with mypyc, when possible.

The modules on the request path (listed in doproxy/_compiled.py) are plain, fully typed
Python; mypyc turns them into one C extension that runs the same code with about half the
instructions per request (calls between them become native C calls).
The build falls back to pure Python, with a warning, when mypyc, a C compiler or the Python
headers are missing, or when DOPROXY_PURE_PYTHON is set. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

from setuptools import setup


def compiled_modules() -> list[str]:
    """The source files of doproxy/_compiled.py's COMPILED, the one list of compiled modules
    (the pure-Python switch and the Makefile read it too). Read with `ast`: the build must not
    import the package it is building."""
    path = Path(__file__).resolve().parent / "doproxy" / "_compiled.py"
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets
        ):
            return [name.replace(".", "/") + ".py" for name in ast.literal_eval(node.value)]
    raise RuntimeError(f"no COMPILED in {path}")


def compiled_extensions() -> list:  # type: ignore[type-arg]
    if os.environ.get("DOPROXY_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify

        # One group: calls between the modules are native C calls. The group name puts its
        # shared library inside the package instead of at the top level.
        extensions = mypycify(compiled_modules(), opt_level="3", group_name="doproxy.dataplane")
    except Exception as e:  # mypyc missing or refusing the code: ship pure Python
        print(f"doproxy: not compiling the data plane ({e}); using pure Python", file=sys.stderr)
        return []
    for ext in extensions:
        ext.optional = True  # no compiler or headers: build_ext skips it, pure Python remains
    return extensions


setup(ext_modules=compiled_extensions())
