"""The data plane: listener, client-side HTTP/1.1, upstream pool, tunnels.

Its hot modules are usually compiled with mypyc (setup.py, doproxy/_compiled.py); with
DOPROXY_PURE_PYTHON set their Python source runs instead.
"""

from __future__ import annotations


def compiled() -> bool:
    """Is the data plane running as compiled code?"""
    from doproxy.proxy import client

    return not str(getattr(client, "__file__", "")).endswith(".py")
