"""The data plane: listener, client-side HTTP/1.1, upstream pool, tunnels.

scan.py, upstream.py and client.py are usually compiled with mypyc (see setup.py). With
DOPROXY_PURE_PYTHON set, the Python source is used even when the compiled modules are there:
the test suite measures coverage that way, and it is a quick way to rule the compiler out when
debugging.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

COMPILED = ("scan", "upstream", "client")  # in import order, as setup.py compiles them

if os.environ.get("DOPROXY_PURE_PYTHON"):
    for _name in COMPILED:
        if f"{__name__}.{_name}" in sys.modules:
            continue
        _spec = importlib.util.spec_from_file_location(
            f"{__name__}.{_name}", Path(__file__).with_name(f"{_name}.py")
        )
        assert _spec is not None and _spec.loader is not None
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[_spec.name] = _module
        _spec.loader.exec_module(_module)


def compiled() -> bool:
    """Is the data plane running as compiled code?"""
    from doproxy.proxy import client

    return not str(getattr(client, "__file__", "")).endswith(".py")
