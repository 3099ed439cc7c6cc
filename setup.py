"""Build hook: compile the data plane's hottest modules with mypyc, when possible.

The modules on the request path (listed in doproxy/_compiled.py) are plain, fully typed
Python; mypyc turns them into one C extension that runs the same code with about half the
instructions per request (calls between them become native C calls).
The build falls back to pure Python, with a warning, when mypyc, a C compiler or the Python
headers are missing, or when DOPROXY_PURE_PYTHON is set. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

# The modules listed in doproxy/_compiled.py (which the pure-Python switch uses too).
COMPILED = [
    "doproxy/core/retry.py",
    "doproxy/core/balancers.py",
    "doproxy/proxy/scan.py",
    "doproxy/proxy/upstream.py",
    "doproxy/proxy/client.py",
    "doproxy/proxy/server.py",
]


def compiled_extensions() -> list:  # type: ignore[type-arg]
    if os.environ.get("DOPROXY_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify

        # One group: calls between the modules are native C calls. The group name puts its
        # shared library inside the package instead of at the top level.
        extensions = mypycify(COMPILED, opt_level="3", group_name="doproxy.dataplane")
    except Exception as e:  # mypyc missing or refusing the code: ship pure Python
        print(f"doproxy: not compiling the data plane ({e}); using pure Python", file=sys.stderr)
        return []
    for ext in extensions:
        ext.optional = True  # no compiler or headers: build_ext skips it, pure Python remains
    return extensions


setup(ext_modules=compiled_extensions())
